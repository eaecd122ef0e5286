"""Training as a pure function of the data weights: the explicit state, the pure step, and
the training loop with its checkpoint schedule.

    s_{t+1} = train_step(s_t, batch_t, w[batch_t])      s = TrainState(params, buffers, opt)

`train_step` builds no graph of its own and mutates nothing, so torch.func / autograd can
differentiate it with respect to the whole state and the batch weights (metagrad.py). The
weighted loss (DESIGN.md §1) is normalised by the nominal batch size, never by Σw, so a
dropped example (w_i = 0) keeps its slot in its batch.

This module does not differentiate through training (metagrad.py) and does not choose
which states to recompute (replay.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

from magic_cli.config import Config


class TrainState(NamedTuple):
    params: dict  # name -> Tensor
    buffers: dict  # name -> Tensor (e.g. BatchNorm running statistics)
    opt: dict  # optimizer state: nested dicts of tensors


class Batch(NamedTuple):
    x: object  # (B, *input_shape), augmented if the dataset augments
    y: object  # (B,) or (B, L) targets
    t: int  # step index: drives the LR schedule and Adam's bias correction


def per_example_loss(logits, y):
    """Cross-entropy of each example: (B,). Sequences (B, L, V) give the mean token loss."""
    import torch.nn.functional as F

    n_classes = logits.shape[-1]
    losses = F.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1), reduction="none")
    return losses.view(y.shape[0], -1).mean(1)


def per_example_margin(logits, y):
    """Correct-class margin logit_y - logsumexp(other logits): (B,), token mean for sequences."""
    import torch

    n_classes = logits.shape[-1]
    flat, target = logits.reshape(-1, n_classes), y.reshape(-1)
    correct = flat.gather(1, target[:, None]).squeeze(1)
    others = flat.scatter(1, target[:, None], float("-inf"))
    return (correct - torch.logsumexp(others, dim=1)).view(y.shape[0], -1).mean(1)


OUTPUT_FUNCTIONS = {"loss": per_example_loss, "margin": per_example_margin}


def make_grad_fn(model, batch_size: int, loss_reduction: str) -> Callable:
    """grad_fn(params, buffers, x, y, weights) -> (d L / d params, new_buffers), with the weighted
    loss L = scale * sum_i weights_i * loss_i, scale = 1/B (mean) or 1 (sum)."""
    import torch.func

    scale = 1.0 / batch_size if loss_reduction == "mean" else 1.0

    def weighted_loss(params, buffers, x, y, weights):
        logits, new_buffers = model.apply(params, buffers, x, train=True)
        return (weights * per_example_loss(logits, y)).sum() * scale, new_buffers

    return torch.func.grad(weighted_loss, has_aux=True)


def make_train_step(grad_fn: Callable, optimizer) -> Callable:
    """The pure step: train_step(state, batch, weights) -> state. weights: (B,)."""

    def train_step(state: TrainState, batch: Batch, weights) -> TrainState:
        grads, new_buffers = grad_fn(state.params, state.buffers, batch.x, batch.y, weights)
        new_params, new_opt = optimizer.update(grads, state.opt, state.params, batch.t)
        return TrainState(new_params, new_buffers, new_opt)

    return train_step


@dataclass
class Problem:
    """Everything a training run is a function of, built from the config: data, model,
    optimizer, batch schedule and base data weights, on the run's device and dtype."""

    config: Config
    dataset: object
    model: object
    optimizer: object
    schedule: object  # LongTensor (T, B): example ids of each step
    weights: object  # (N,) data weights used in training (ones unless train.data_weights)
    grad_fn: Callable  # (params, buffers, x, y, weights) -> (grads, new_buffers)
    train_step: Callable  # (state, batch, weights) -> state
    device: object
    dtype: object

    @property
    def total_steps(self) -> int:
        return int(self.schedule.shape[0])

    @classmethod
    def build(cls, config: Config) -> "Problem":
        import numpy as np
        import torch

        from magic_cli.data import batch_schedule, load_dataset
        from magic_cli.models import build_model
        from magic_cli.optim import build_optimizer

        dtype = getattr(torch, config.dtype)
        device = torch.device(config.device)
        ds = load_dataset(config.dataset, config.seed, dtype)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            setattr(ds, name, getattr(ds, name).to(device))
        model = build_model(config.model, ds.input_shape, ds.n_classes)
        tc = config.train
        schedule = batch_schedule(ds.n_train, tc.batch_size, tc.epochs, config.seed)
        optimizer = build_optimizer(config.optimizer, int(schedule.shape[0]))
        if tc.data_weights is None:
            weights = torch.ones(ds.n_train, dtype=dtype, device=device)
        else:
            w = np.load(tc.data_weights, allow_pickle=False)
            if not isinstance(w, np.ndarray) or w.shape != (ds.n_train,):
                raise ValueError(f"train.data_weights must be a .npy of {ds.n_train} weights, got "
                                 f"{getattr(w, 'shape', 'an .npz archive')}")
            weights = torch.as_tensor(w, dtype=dtype, device=device)
        grad_fn = make_grad_fn(model, tc.batch_size, tc.loss_reduction)
        step = make_train_step(grad_fn, optimizer)
        return cls(config, ds, model, optimizer, schedule, weights, grad_fn, step, device, dtype)

    def init_state(self) -> TrainState:
        """s_0: initialisation from derive_seed(seed, "init"), identical on every device."""
        from magic_cli.determinism import generator

        params, buffers = self.model.init(generator(self.config.seed, "init"))
        cast = lambda d: {k: v.to(device=self.device, dtype=self.dtype) for k, v in d.items()}  # noqa: E731
        params, buffers = cast(params), cast(buffers)
        return TrainState(params, buffers, self.optimizer.init(params))

    def batch(self, t: int) -> Batch:
        idx = self.schedule[t].to(self.device)
        x = self.dataset.x_train[idx]
        if self.dataset.augment is not None:
            x = self.dataset.augment(x, idx, self.config.seed, t)
        return Batch(x, self.dataset.y_train[idx], t)

    def step(self, state: TrainState, t: int, weights=None) -> TrainState:
        """One training step at t with the full weight vector `weights` (N,), default the run's."""
        w = self.weights if weights is None else weights
        return self.train_step(state, self.batch(t), w[self.schedule[t].to(self.device)])

    def run(self, weights=None, keep: set | frozenset = frozenset(), progress=None):
        """Train from s_0; return (final state, {t: s_t for t in keep}, seconds of the loop)."""
        import torch

        state, kept = self.init_state(), {}
        start = time.perf_counter()
        with torch.no_grad():
            for t in range(self.total_steps):
                if t in keep:
                    kept[t] = state
                state = self.step(state, t, weights)
                if progress is not None:
                    progress(t + 1)
        seconds = time.perf_counter() - start
        if self.total_steps in keep:
            kept[self.total_steps] = state
        return state, kept, seconds

    def outputs(self, state: TrainState, x=None, y=None, chunk: int = 1024) -> dict:
        """Each example's loss, margin and correctness under `state` in eval mode (test split by
        default): float64 numpy (n,), computed in chunks of `chunk` examples."""
        import numpy as np
        import torch

        x = self.dataset.x_test if x is None else x
        y = self.dataset.y_test if y is None else y
        parts = {"loss": [], "margin": [], "correct": []}
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                xs, ys = x[start:start + chunk], y[start:start + chunk]
                logits, _ = self.model.apply(state.params, state.buffers, xs, train=False)
                for name, fn in OUTPUT_FUNCTIONS.items():
                    parts[name].append(fn(logits, ys).double().cpu().numpy())
                correct = (logits.argmax(-1) == ys).double().reshape(ys.shape[0], -1).mean(1)  # token mean for LMs
                parts["correct"].append(correct.cpu().numpy())
        return {name: np.concatenate(values) for name, values in parts.items()}


# --- state <-> flat tensor dict (checkpoint files) -----------------------------------------

def flatten_state(state: TrainState) -> dict:
    """{'params/fc0.weight': T, 'opt/mu/fc0.weight': T, ...}"""
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = node

    for field in TrainState._fields:
        walk(field, getattr(state, field))
    return flat


def unflatten_state(flat: dict, template: TrainState) -> TrainState:
    """Inverse of flatten_state, shaped like `template` (a state of the same run)."""

    def build(prefix, node):
        if isinstance(node, dict):
            return {k: build(f"{prefix}/{k}", v) for k, v in node.items()}
        return flat[prefix]

    return TrainState(*(build(f, getattr(template, f)) for f in TrainState._fields))


def states_equal(a: TrainState, b: TrainState) -> bool:
    import torch

    fa, fb = flatten_state(a), flatten_state(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


# --- the `magic train` stage ---------------------------------------------------------------

def save_checkpoints(path, states: dict) -> None:
    """Stack the stored states {t: state} into one tensor dict: 'steps' (n,) + each leaf (n, ...)."""
    import torch

    from magic_cli.run_dir import save_tensors

    steps = sorted(states)
    flats = [flatten_state(states[t]) for t in steps]
    stacked = {k: torch.stack([f[k] for f in flats]) for k in flats[0]}
    save_tensors(path, {"steps": torch.tensor(steps), **stacked})


def load_checkpoints(path, template: TrainState, device) -> dict:
    """{t: loader} for the states of save_checkpoints; the file is memory-mapped, each state
    is materialised on `device` only when its loader is called."""
    from magic_cli.run_dir import load_tensors

    data = load_tensors(path, mmap=True)
    steps = data.pop("steps").tolist()

    def loader(i):
        return lambda: unflatten_state({k: v[i].to(device) for k, v in data.items()}, template)

    return {t: loader(i) for i, t in enumerate(steps)}


def train_stage(config: Config, run, overrides: list[str], progress_factory=None) -> dict:
    """Train, write every artifact of train/ atomically, and return the metrics."""
    import numpy as np

    from magic_cli.config import to_yaml
    from magic_cli.determinism import enable_determinism
    from magic_cli.meta import run_meta
    from magic_cli.progress import no_progress
    from magic_cli.replay import root_boundaries
    from magic_cli.run_dir import save_json, save_npy, save_tensors, save_text

    determinism = enable_determinism(config.device, config.threads)
    problem = Problem.build(config)
    T = problem.total_steps
    keep = set(root_boundaries(config.checkpoint.name, T, config.checkpoint.k))
    with (progress_factory or no_progress)("train", T) as advance:
        final, kept, seconds = problem.run(keep=keep, progress=advance)
    ds = problem.dataset
    outputs = problem.outputs(final)
    train_out = problem.outputs(final, ds.x_train, ds.y_train)
    metrics = {
        "test_accuracy": float(np.mean(outputs.pop("correct"))),
        "train_accuracy": float(np.mean(train_out["correct"])),
        "test_loss": float(np.mean(outputs["loss"])),
        "train_loss": float(np.mean(train_out["loss"])),
        "steps": T,
        "n_train": ds.n_train,
        "n_test": ds.n_test,
        "train_seconds": seconds,
        "checkpoint": config.checkpoint.name,
        "stored_states": len(kept),
    }
    save_text(run.config_yaml, to_yaml(config.raw))
    save_text(run.overrides_txt, "".join(f"{o}\n" for o in overrides))
    save_json(run.meta_json, run_meta(config, determinism))
    save_checkpoints(run.checkpoints, kept)
    save_tensors(run.final_state, flatten_state(final))
    for name, values in outputs.items():
        save_npy(run.train_outputs(name), values)
    save_json(run.metrics_json, metrics)
    # Written last: its presence marks a finished training run.
    save_json(run.fingerprint_json, {"fingerprint": config.fingerprint(), "slice": config.training_slice(),
                                     "steps": T, "stored_steps": sorted(kept)})
    return metrics

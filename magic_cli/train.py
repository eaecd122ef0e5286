"""Training as a pure function of the data weights: the explicit state, the pure step, and
the training loop with its checkpoint schedule.

    s_{t+1} = train_step(s_t, batch_t, w[batch_t])      s = TrainState(params, buffers, opt)

`train_step` builds no graph of its own and mutates nothing, so torch.func / autograd can
differentiate it with respect to the whole state and the batch weights (metagrad.py). The
weighted loss (DESIGN.md §1) is normalised by the nominal batch size, never by Σw, so a
dropped example (w_i = 0) keeps its slot in its batch.

This module does not assemble a run from its config (assemble.py), does not differentiate
through training (metagrad.py) and does not choose which states to recompute (replay.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

from magic_cli.config import Config
from magic_cli.contracts import Model
from magic_cli.errors import ArtifactError, NonDeterminismError, NonFiniteError, StageError

if TYPE_CHECKING:
    from magic_cli.data import Dataset
    from magic_cli.optim import Optimizer


class TrainState(NamedTuple):
    params: dict  # name -> Tensor
    buffers: dict  # name -> Tensor (e.g. BatchNorm running statistics)
    opt: dict  # optimizer state: nested dicts of tensors


class Batch(NamedTuple):
    x: object  # (B, *input_shape), augmented if the dataset augments
    y: object  # (B,) or (B, L) targets
    t: int  # step index: drives the LR schedule and Adam's bias correction


IGNORE = -100  # a target that is not supervised (padding, prompt tokens): Hugging Face's label convention


def _token_losses(logits, y):
    """Next-token (or class) cross-entropy of every target and the supervision mask, both (B, L)
    (L = 1 for classification); unsupervised targets (IGNORE) count 0."""
    import torch.nn.functional as F

    n_classes = logits.shape[-1]
    losses = F.cross_entropy(logits.reshape(-1, n_classes), y.reshape(-1), reduction="none", ignore_index=IGNORE)
    return losses.view(y.shape[0], -1), (y != IGNORE).view(y.shape[0], -1)


def per_example_loss(logits, y):
    """Cross-entropy of each example: (B,). Sequences (B, L, V) give the mean loss over the
    example's supervised tokens (targets IGNORE are left out; an example without any gives 0)."""
    losses, mask = _token_losses(logits, y)
    return losses.sum(1) / mask.sum(1).clamp(min=1)


def per_example_margin(logits, y):
    """Correct-class margin logit_y - logsumexp(other logits): (B,), the mean over supervised
    tokens for sequences."""
    import torch

    n_classes = logits.shape[-1]
    mask = (y != IGNORE).reshape(-1)
    flat, target = logits.reshape(-1, n_classes), y.reshape(-1).clamp(min=0)
    correct = flat.gather(1, target[:, None]).squeeze(1)
    others = flat.scatter(1, target[:, None], float("-inf"))
    margins = torch.where(mask, correct - torch.logsumexp(others, dim=1), 0.0).view(y.shape[0], -1)
    return margins.sum(1) / mask.view(y.shape[0], -1).sum(1).clamp(min=1)


def per_example_correct(logits, y):
    """The share of an example's supervised targets predicted right (argmax): (B,)."""
    mask = (y != IGNORE).reshape(y.shape[0], -1)
    right = (logits.argmax(-1) == y).reshape(y.shape[0], -1) & mask
    return right.sum(1).double() / mask.sum(1).clamp(min=1)


OUTPUT_FUNCTIONS = {"loss": per_example_loss, "margin": per_example_margin}
LOSS_REDUCTIONS = ("mean", "sum", "token_mean")


def make_grad_fn(model, batch_size: int, loss_reduction: str, eager: bool = False) -> Callable:
    """grad_fn(params, buffers, x, y, weights) -> (d L / d params, new_buffers) of the weighted
    batch loss L (DESIGN.md §1), with ℓ_b an example's mean loss over its supervised tokens:

        mean        (1/B) Σ_b w_b ℓ_b          B the nominal batch size, never Σw
        sum         Σ_b w_b ℓ_b                the paper's LM setting (sets the scale of eps_root)
        token_mean  Σ_b w_b Σ_t ℓ_bt / n_tok   n_tok the batch's supervised tokens, zero-weight
                                               examples' tokens counted (so n_tok is not a function of w)

    The default is torch.func.grad, which torch.func can transform (the reverse pass, vmap).
    eager=True computes the same gradients with torch.autograd.grad on detached leaves: bit-equal
    (tests/test_train.py), and 1.1-1.6x faster for training, replay and ground truth, which never
    transform the step.
    """
    import torch
    import torch.func

    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"train.loss_reduction={loss_reduction!r} is not valid")

    def weighted_loss(params, buffers, x, y, weights):
        logits, new_buffers = model.apply(params, buffers, x, train=True)
        if loss_reduction == "token_mean":
            losses, mask = _token_losses(logits, y)
            return (weights * losses.sum(1)).sum() / mask.sum().clamp(min=1), new_buffers
        scale = 1.0 / batch_size if loss_reduction == "mean" else 1.0
        return (weights * per_example_loss(logits, y)).sum() * scale, new_buffers

    if not eager:
        return torch.func.grad(weighted_loss, has_aux=True)

    def eager_grad(params, buffers, x, y, weights):
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss, new_buffers = weighted_loss(leaves, buffers, x, y, weights)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return dict(zip(leaves, grads)), {k: v.detach() for k, v in new_buffers.items()}

    return eager_grad


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
    dataset: "Dataset"
    model: Model
    optimizer: "Optimizer"
    schedule: object  # LongTensor (T, B): example ids of each step
    weights: object  # (N,) data weights used in training (ones unless train.data_weights)
    grad_fn: Callable  # (params, buffers, x, y, weights) -> (grads, new_buffers)
    train_step: Callable  # (state, batch, weights) -> state, transformable by torch.func
    eager_step: Callable  # the same step, bit-equal, by plain autograd: what run() uses (no graph)
    device: object
    dtype: object

    @property
    def total_steps(self) -> int:
        return int(self.schedule.shape[0])

    @classmethod
    def build(cls, config: Config) -> "Problem":
        """Assemble the run from the config (assemble.py)."""
        from magic_cli.assemble import assemble

        return assemble(config)

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
        """One training step at t with the full weight vector `weights` (N,), default the run's.
        Under no_grad (training, replay, ground truth) the eager step; where a graph is being built
        through the step (the unrolled checks), the transformable one. Both give the same bits."""
        import torch

        w = self.weights if weights is None else weights
        step = self.train_step if torch.is_grad_enabled() else self.eager_step
        return step(state, self.batch(t), w[self.schedule[t].to(self.device)])

    def run(self, weights=None, keep: set | frozenset = frozenset(), progress=None, check=None):
        """Train from s_0; return (final state, {t: s_t for t in keep}, seconds of the loop).

        check(t, s_t), if given, sees every state t = 0..T (e.g. to compare with stored ones)."""
        import torch

        state, kept = self.init_state(), {}
        start = time.perf_counter()
        with torch.no_grad():
            for t in range(self.total_steps):
                if t in keep:
                    kept[t] = state
                if check is not None:
                    check(t, state)
                state = self.step(state, t, weights)
                if progress is not None:
                    progress(t + 1)
        seconds = time.perf_counter() - start
        if self.total_steps in keep:
            kept[self.total_steps] = state
        if check is not None:
            check(self.total_steps, state)
        return state, kept, seconds

    def run_batch(self, weights) -> list:
        """The final states of G trainings at once, one per row of `weights` (G, N): the training
        step vmapped over the states and the batch weights (the batches are shared). Deterministic
        for the same rows in the same order; the batched kernels may round otherwise than run()."""
        import torch
        from torch.func import vmap
        from torch.utils._pytree import tree_map

        G = int(weights.shape[0])
        state = tree_map(lambda v: v.expand(G, *v.shape).clone(), self.init_state())
        step = vmap(self.train_step, in_dims=(0, None, 0))
        with torch.no_grad():
            for t in range(self.total_steps):
                state = step(state, self.batch(t), weights[:, self.schedule[t].to(self.device)])
        return [tree_map(lambda v, g=g: v[g], state) for g in range(G)]

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
                parts["correct"].append(per_example_correct(logits, ys).cpu().numpy())  # token share for LMs
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


# --- checkpoint files ------------------------------------------------------------------------

PARAMETERISED = ("replay", "binomial")  # strategies whose tag carries their parameter


def checkpoint_tag(strategy: str, param: int) -> str:
    """The name of a strategy's checkpoint folder: all | sqrt | replay<k> | binomial<memory>."""
    return f"{strategy}{param}" if strategy in PARAMETERISED else strategy


def state_size(state: TrainState) -> int:
    """Bytes of one training state in memory (parameters, buffers, optimizer state)."""
    return sum(v.numel() * v.element_size() for v in flatten_state(state).values())


def checkpoint_param(config: Config, template: TrainState | None = None) -> int:
    """The strategy's parameter (config.checkpoint.param). A binomial memory given in bytes is the
    number of whole training states that fit in it: a pure function of the config, since a state's
    size follows from its shapes and dtype (`template`, a state; built from the config if None)."""
    from magic_cli.errors import ConfigError

    ck = config.checkpoint
    if ck.name != "binomial" or ck.memory_bytes is None:
        return ck.param
    if template is None:
        template = Problem.build(config).init_state()
    size = state_size(template)
    states = ck.memory_bytes // size
    if states < 3:
        raise ConfigError(f"checkpoint.memory={ck.memory} holds {states} training state{'s' * (states != 1)} of "
                          f"{size:,} bytes; checkpoint=binomial needs room for at least 3 ({3 * size:,} bytes)")
    return states


def config_checkpoint_tag(config: Config, template: TrainState | None = None) -> str:
    """checkpoint_tag of config.checkpoint, its memory in bytes resolved (checkpoint_param)."""
    return checkpoint_tag(config.checkpoint.name, checkpoint_param(config, template))


def checkpoint_names(tag: str, total_steps: int) -> list[str]:
    """The files of a strategy's stored states, relative to train/: one per root boundary."""
    from magic_cli.replay import root_boundaries

    strategy, param = _strategy_of(tag)
    return [f"checkpoints_{tag}/state_{t:06d}.pt" for t in root_boundaries(strategy, total_steps, param)]


def _step_of(name: str) -> int:
    return int(name.rsplit("_", 1)[1][:-len(".pt")])


def state_bytes(state: TrainState) -> bytes:
    from magic_cli.run_dir import tensors_bytes

    return tensors_bytes(flatten_state(state))


def load_checkpoints(run, tag: str, total_steps: int, template: TrainState, device, expect: dict) -> dict:
    """{t: loader} of a strategy's stored states: every file is verified now (digest and run), and
    read into memory on `device` only when its loader is called (the states stay on disk)."""
    from magic_cli.run_dir import verify

    paths = {_step_of(n): run.train_dir / n for n in checkpoint_names(tag, total_steps)}
    for path in paths.values():
        verify(path, expect, REPAIR)
    return {t: (lambda path=path: load_state(path, template, device)) for t, path in paths.items()}


def load_state(path, template: TrainState, device) -> TrainState:
    from magic_cli.run_dir import load_tensors

    return unflatten_state({k: v.to(device) for k, v in load_tensors(path).items()}, template)


REPAIR = "run `magic train` with the same overrides to repair it"


def load_final_and_stored(problem: Problem, run, record: dict) -> tuple[TrainState, dict]:
    """The verified final state and the verified checkpoints of config.checkpoint, derived from
    the states `train` stored when this strategy's files do not exist yet."""
    from magic_cli.run_dir import verify

    expect = {"fingerprint": record["fingerprint"]}
    verify(run.final_state, expect, REPAIR)
    template = problem.init_state()  # the shape of a state (also s_0)
    final = load_state(run.final_state, template, problem.device)
    T = problem.total_steps
    tag = config_checkpoint_tag(problem.config, template)
    if tag != record["checkpoint_tag"] and not all((run.train_dir / n).exists() for n in checkpoint_names(tag, T)):
        derive_checkpoints(problem, run, record, final, template)
    return final, load_checkpoints(run, tag, T, template, problem.device, expect)


def derive_checkpoints(problem: Problem, run, record: dict, final: TrainState, template: TrainState) -> None:
    """Write the checkpoints of config.checkpoint by replaying training from s_0, checking every
    state against those `train` stored (and the final one) bit for bit. A state is put in place
    only once a stored state after it has been reproduced; until then it is a temporary file."""
    from magic_cli.run_dir import Staged

    expect = {"fingerprint": record["fingerprint"]}
    ck, T = problem.config.checkpoint, problem.total_steps
    source = record["checkpoint_tag"]
    stored = load_checkpoints(run, source, T, template, problem.device, expect)
    tag = config_checkpoint_tag(problem.config, template)
    wanted = {_step_of(n): run.train_dir / n for n in checkpoint_names(tag, T) if not (run.train_dir / n).exists()}
    staged = Staged()

    def check(t, state):
        expected = final if t == T else stored[t]() if t in stored else None
        if expected is not None:
            if not states_equal(state, expected):
                raise NonDeterminismError(f"training is not deterministic here: the state after step {t} differs "
                                          f"from the one in checkpoints_{source}/; checkpoints for "
                                          f"checkpoint={ck.name} cannot be derived")
            staged.commit()  # every state staged so far led to this verified one
        if t in wanted:
            staged.add(wanted[t], state_bytes(state), {**expect, "step": t})
            if expected is not None:
                staged.commit()

    try:
        problem.run(check=check)
    finally:
        staged.discard()


# --- the `magic train` stage ---------------------------------------------------------------

def train_stage(config: Config, run, overrides: list[str], overwrite: bool = False, progress_factory=None) -> dict:
    """Train and write train/, or verify a finished run and redo exactly what is missing or damaged.

    Returns the metrics, with "status": trained | already | repaired and "repaired": [file names].
    Every artifact is written with its sidecar (sha256, fingerprint); the record
    train/fingerprint.json is written last and marks a finished run. An intact artifact is never
    rewritten: a retraining that would produce other bytes is refused as non-deterministic.
    """
    import shutil

    created = not run.root.exists()
    run.claim()
    try:
        return _train_stage(config, run, overrides, overwrite, progress_factory)
    except BaseException:
        if created:  # a refused first training leaves nothing behind, not even the folder
            shutil.rmtree(run.root, ignore_errors=True)
        raise


def _train_stage(config, run, overrides, overwrite, progress_factory) -> dict:
    from magic_cli.run_dir import load_record, status

    with run.lock(exclusive=True):
        run.clean(exclusive=True)
        fingerprint = config.fingerprint()
        record = None
        if run.fingerprint_json.exists():
            try:
                record = load_record(run.fingerprint_json)
            except ArtifactError:
                record = None  # a damaged record is rewritten below, once training is checked again
        if overwrite:
            run.clear()
            record = None
        elif record is not None and record["fingerprint"] != fingerprint:
            raise StageError(f"{run.root} holds a run trained with a different config; choose another name=/out_dir= "
                             "or pass --overwrite (which deletes its attributions and ground truth)")
        # (the strategy's tag only for a finished run: with checkpoint.memory in bytes it builds the problem)
        names = sorted({*(record["files"] if record else []), run.final_state.name,
                        *(checkpoint_names(config_checkpoint_tag(config), record["steps"]) if record else []),
                        *(run.train_outputs(o).name for o in OUTPUT_FUNCTIONS)})
        expect = {"fingerprint": fingerprint}
        states = {name: status(run.train_dir / name, expect) for name in names}
        if not overwrite and "stale" in states.values():
            raise StageError(f"{run.root} holds files of a run trained with a different config; choose another "
                             "out_dir or pass --overwrite")
        if record is not None and all(s == "ok" for s in states.values()):
            return {**record["metrics"], "status": "already", "repaired": []}
        return _train_and_write(config, run, overrides, record, names, states, progress_factory)


def _train_and_write(config, run, overrides, record, names, states, progress_factory) -> dict:
    import time

    import numpy as np

    from magic_cli.config import to_yaml
    from magic_cli.determinism import enable_determinism
    from magic_cli.meta import run_meta
    from magic_cli.progress import no_progress
    from magic_cli.run_dir import (
        Staged,
        load_json,
        npy_bytes,
        save_artifact,
        save_json,
        save_record,
        save_text,
        sha256_bytes,
        sidecar,
    )
    from magic_cli.run_dir import status as file_status

    determinism = enable_determinism(config.device, config.threads)
    problem = Problem.build(config)
    T, fingerprint = problem.total_steps, config.fingerprint()
    expect = {"fingerprint": fingerprint}
    tag = config_checkpoint_tag(config, problem.init_state())
    names = sorted(set(names) | set(checkpoint_names(tag, T)))
    states = {n: states[n] if n in states else file_status(run.train_dir / n, expect) for n in names}

    def check_intact(name, data):  # an intact file: retraining must reproduce it exactly
        if load_json(sidecar(run.train_dir / name))["sha256"] != sha256_bytes(data):
            raise NonDeterminismError(f"training is not deterministic here: retraining gives another {name} "
                                      f"than the one stored in {run.train_dir}; nothing was changed")

    # Checkpoint states go to disk as training reaches them (one file each, never all in memory):
    # staged as temporary files, put in place once everything else is checked.
    by_step: dict = {}
    for name in (n for n in names if n.startswith("checkpoints_")):
        by_step.setdefault(_step_of(name), []).append(name)
    staged, sink_seconds = Staged(), [0.0]

    def sink(t, state):
        begin = time.perf_counter()
        if t in by_step:
            data = state_bytes(state)
            for name in by_step[t]:
                if states[name] == "ok":
                    check_intact(name, data)
                else:
                    staged.add(run.train_dir / name, data, {**expect, "step": t})
        sink_seconds[0] += time.perf_counter() - begin

    try:
        with (progress_factory or no_progress)("train", T) as advance:
            final, _, seconds = problem.run(progress=advance, check=sink)
        seconds -= sink_seconds[0]  # the loop's own time, without writing the states
        ds = problem.dataset
        outputs = problem.outputs(final)
        train_out = problem.outputs(final, ds.x_train, ds.y_train)
        _check_converged(problem, final, train_out)
        data = {run.final_state.name: state_bytes(final),
                **{run.train_outputs(o).name: npy_bytes(outputs[o]) for o in OUTPUT_FUNCTIONS}}
        for name in (n for n in data if states[n] == "ok"):
            check_intact(name, data[name])
        staged.commit()
    finally:
        staged.discard()
    repaired = _summary([n for n in names if states[n] != "ok" and (states[n] != "missing" or record is not None)])
    for name in (n for n in data if states[n] != "ok"):
        save_artifact(run.train_dir / name, data[name], expect)
    seconds_now = {"train_seconds": seconds}
    metrics = record["metrics"] if record is not None else {
        "test_accuracy": float(np.mean(outputs["correct"])),
        "train_accuracy": float(np.mean(train_out["correct"])),
        "test_loss": float(np.mean(outputs["loss"])),
        "train_loss": float(np.mean(train_out["loss"])),
        "steps": T,
        "n_train": ds.n_train,
        "n_test": ds.n_test,
    }  # deterministic: the record holds no timing (metrics.json does)
    save_text(run.config_yaml, to_yaml(config.raw))
    save_text(run.overrides_txt, "".join(f"{o}\n" for o in overrides))
    save_json(run.meta_json, run_meta(config, determinism))
    save_json(run.metrics_json, {**metrics, **seconds_now})
    # Written last: its presence marks a finished training run.
    save_record(run.fingerprint_json, {
        "fingerprint": fingerprint, "slice": config.training_slice(), "steps": T, "metrics": metrics,
        "files": names, "checkpoint_tag": record["checkpoint_tag"] if record else tag})
    status = "trained" if record is None and not repaired else "repaired"
    return {**metrics, **seconds_now, "status": status, "repaired": repaired}


def _summary(names: list[str]) -> list[str]:
    """File names for a message: the states of one checkpoint folder as 'checkpoints_<tag>/ (n states)'."""
    out, folders = [], {}
    for name in names:
        folder, sep, _ = name.partition("/")
        if sep:
            folders[folder] = folders.get(folder, 0) + 1
        else:
            out.append(name)
    return out + [f"{f}/ ({n} state{'s' if n > 1 else ''})" for f, n in folders.items()]


def _strategy_of(tag: str) -> tuple[str, int]:
    """(strategy, parameter) of a checkpoint tag (checkpoint_tag's inverse)."""
    for strategy in PARAMETERISED:
        if tag.startswith(strategy):
            return strategy, int(tag[len(strategy):])
    return tag, 4


DIVERGED = 3.0  # a final train loss above this multiple of the loss at initialisation: diverged


def _check_converged(problem: Problem, final: TrainState, train_out: dict) -> None:
    """Refuse a run whose scores would mean nothing: a non-finite state, or a training loss that
    ends above DIVERGED times its value at initialisation. (A short run may end slightly above
    it: eval-mode BatchNorm with barely updated running statistics.)"""
    import math

    import numpy as np
    import torch

    lr = f"optimizer.lr={problem.config.optimizer.lr:g}"
    if not all(bool(torch.isfinite(v).all()) for v in flatten_state(final).values()):
        raise NonFiniteError(f"training produced NaN/Inf parameters ({lr}): lower optimizer.lr")
    start = float(np.mean(problem.outputs(problem.init_state(), problem.dataset.x_train,
                                          problem.dataset.y_train)["loss"]))
    end = float(np.mean(train_out["loss"]))
    if not math.isfinite(end) or end > DIVERGED * start:
        raise NonFiniteError(f"training diverged: train loss {start:.4g} at initialisation, {end:.4g} after "
                             f"training ({lr}); lower optimizer.lr")

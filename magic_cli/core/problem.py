"""Training as a pure function of the data weights: the explicit state, the pure step, and the
`Problem` (everything one training run is a function of).

    s_{t+1} = train_step(s_t, batch_t, w[batch_t])      s = TrainState(params, buffers, opt)

`train_step` builds no graph of its own and mutates nothing, so torch.func / autograd can
differentiate it with respect to the whole state and the batch weights (metagrad.py). The
weighted loss (DESIGN.md §1) is normalised by the nominal batch size, never by Σw, so a
dropped example (w_i = 0) keeps its slot in its batch.

This module does not assemble a run from its config (stages/assemble.py), does not
differentiate through training (metagrad.py), does not choose which states to recompute
(replay.py) and touches no file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch
import torch.func
from torch.func import vmap
from torch.utils._pytree import tree_map

from magic_cli.contracts import Dataset, Model
from magic_cli.core.losses import LOSS_REDUCTIONS, OUTPUT_FUNCTIONS, per_example_correct, per_example_loss, token_losses
from magic_cli.core.optim import Optimizer
from magic_cli.determinism import generator

if TYPE_CHECKING:
    from torch import Tensor

    from magic_cli.config import Config


class TrainState(NamedTuple):
    params: dict  # name -> Tensor
    buffers: dict  # name -> Tensor (e.g. BatchNorm running statistics)
    opt: dict  # optimizer state: nested dicts of tensors


class Batch(NamedTuple):
    x: "Tensor"  # (B, *input_shape), augmented if the dataset augments
    y: "Tensor"  # (B,) or (B, L) targets
    t: int  # step index: drives the LR schedule and Adam's bias correction


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
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"train.loss_reduction={loss_reduction!r} is not valid")

    def weighted_loss(params, buffers, x, y, weights):
        logits, new_buffers = model.apply(params, buffers, x, train=True)
        if loss_reduction == "token_mean":
            losses, mask = token_losses(logits, y)
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

    config: "Config"
    dataset: Dataset
    model: Model
    optimizer: Optimizer
    schedule: "Tensor"  # LongTensor (T, B): example ids of each step
    weights: "Tensor"  # (N,) data weights used in training (ones unless train.data_weights)
    grad_fn: Callable  # (params, buffers, x, y, weights) -> (grads, new_buffers)
    train_step: Callable  # (state, batch, weights) -> state, transformable by torch.func
    eager_step: Callable  # the same step, bit-equal, by plain autograd: what run() uses (no graph)
    device: torch.device
    dtype: torch.dtype

    @property
    def total_steps(self) -> int:
        return int(self.schedule.shape[0])

    def init_state(self) -> TrainState:
        """s_0: initialisation from derive_seed(seed, "init"), identical on every device."""
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
        w = self.weights if weights is None else weights
        step = self.train_step if torch.is_grad_enabled() else self.eager_step
        return step(state, self.batch(t), w[self.schedule[t].to(self.device)])

    def run(self, weights=None, keep: set | frozenset = frozenset(), progress=None, check=None):
        """Train from s_0; return (final state, {t: s_t for t in keep}, seconds of the loop).

        check(t, s_t), if given, sees every state t = 0..T (e.g. to compare with stored ones)."""
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
    fa, fb = flatten_state(a), flatten_state(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def state_size(state: TrainState) -> int:
    """Bytes of one training state in memory (parameters, buffers, optimizer state)."""
    return sum(v.numel() * v.element_size() for v in flatten_state(state).values())

"""Approximate attribution baselines in MAGIC's harness and sign convention.

Every method returns scores (N, J) estimating d f_j / d w_i: the change of test output j
(attribute.output: loss or margin) per unit of weight added to training example i, so
`magic score` compares them with MAGIC without special cases. How each native output is
converted (the scale matters only for the slope, never for the LDS):

    grad-dot  -eta/B * <grad f_j, grad l_i> at the final model: one SGD step of size eta = optimizer.lr
              on the example's share of a batch (B = train.batch_size for mean reduction, 1 for sum).
    tracin    TracIn-CP: the same sum over the states at the start (or end) of every epoch (or of the
              last K), each with the mean learning rate of its epoch (every example is visited once
              per epoch).
    trak      TRAK (Park et al. 2023): tau_ij = phi_j^T (Phi^T Phi + lambda I)^-1 phi_i * Q_i with
              phi = P^T grad(margin), random Gaussian P (proj_dim), Q_i = 1 - p_i(y_i); tau estimates
              d margin_j / d w_i. For the loss output it is multiplied by d loss_j / d margin_j =
              -(1 - p_j(y_j)). An ensemble averages tau over the last `checkpoints` epoch states.
    source    SOURCE (Bae et al. 2024): training unrolled approximately in `segments` runs of steps,
              each with its own EK-FAC curvature H_l, gradients and step size; see source().
    ekfac     Influence functions, d f_j / d w_i = -(1/N) grad f_j^T (H + lambda)^-1 grad l_i, with H the
              Gauss-Newton Hessian of the mean training loss approximated by EK-FAC (Grosse et al.
              2023): K-FAC factors A = E[a a^T], G = E_y~p[g g^T] per linear or convolutional layer
              (per token in sequences, per output pixel in convolutions; true Fisher: for a classifier
              an exact expectation over the model's label distribution, for a sequence one label drawn
              per token) and eigenvalues refit in their Kronecker eigenbasis. Damping lambda = damping *
              mean eigenvalue (relative) or damping itself.

Gradients are taken in eval mode (BatchNorm uses running statistics), per example with
torch.func.vmap(grad(...)), and dot products are accumulated in float64.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
from torch.func import grad, vmap

from magic_cli.contracts import IGNORE
from magic_cli.core.losses import OUTPUT_FUNCTIONS, per_example_loss
from magic_cli.core.optim import lr_factor
from magic_cli.core.problem import Problem, TrainState
from magic_cli.determinism import generator
from magic_cli.errors import ConfigError
from magic_cli.models.layers import Taps

CHUNK = 256  # examples per vmap(grad) call


class Clock:
    """The seconds a baseline spends on the training set's side (per-example training gradients,
    curvature factors, epoch states): the cost that does not grow with the number of test ids."""

    def __init__(self):
        self.fixed = 0.0

    @contextlib.contextmanager
    def training_side(self):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # kernels run async
        sync()
        begin = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.fixed += time.perf_counter() - begin

    def timed(self, items):
        """Yield from an iterator, the time spent producing each item counted as training side."""
        items = iter(items)
        while True:
            with self.training_side():
                item = next(items, _END)
            if item is _END:
                return
            yield item


_END = object()


def memoized(memo: dict | None, key: tuple, compute: Callable):
    """compute(), or its value under `key` in `memo`: what a caller evaluating several
    hyperparameter values on one trained run (magic tune) shares between them. The key names
    everything the value depends on besides that run; None computes every time."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def per_example_grads(problem: Problem, state: TrainState, x, y, fn: Callable, chunk: int = CHUNK):
    """Yield (start, {param: (n, *shape)}) per-example gradients of fn(logits, y) in eval mode."""

    def single(params, xi, yi):
        logits, _ = problem.model.apply(params, state.buffers, xi[None], train=False)
        return fn(logits, yi[None]).sum()

    per_example = vmap(grad(single), in_dims=(None, 0, 0))
    for start in range(0, x.shape[0], chunk):
        yield start, per_example(state.params, x[start:start + chunk], y[start:start + chunk])


def _flat(grads: dict):
    return torch.cat([g.flatten(1).double() for g in grads.values()], dim=1)  # (n, P)


def _grad_dot(problem: Problem, state: TrainState, test_ids, output: str, clock: Clock):
    """(N, J) float64: <grad l_i, grad f_j> at `state`."""

    ds = problem.dataset
    ids = torch.as_tensor(test_ids, device=problem.device)
    (_, g_test), = per_example_grads(problem, state, ds.x_test[ids], ds.y_test[ids], OUTPUT_FUNCTIONS[output],
                                    chunk=len(test_ids))
    g_test = _flat(g_test)  # (J, P)
    out = torch.zeros(ds.n_train, len(test_ids), dtype=torch.float64, device=problem.device)
    for start, g in clock.timed(per_example_grads(problem, state, ds.x_train, ds.y_train, OUTPUT_FUNCTIONS["loss"])):
        g = _flat(g)
        out[start:start + g.shape[0]] = g @ g_test.T
    return out


def _step_scale(problem: Problem) -> float:
    """d theta per unit of one example's weight is -lr/B * grad (mean reduction) or -lr * grad (sum).
    token_mean weighs example b by n_b / n_tok (its supervised tokens over the batch's), which
    these first-order approximations take at its mean, 1/B."""
    tc = problem.config.train
    return 1.0 if tc.loss_reduction == "sum" else 1.0 / tc.batch_size


def grad_dot(problem: Problem, final: TrainState, test_ids, output: str, options: dict, clock: Clock | None = None):
    scale = problem.config.optimizer.lr * _step_scale(problem)
    return -scale * _grad_dot(problem, final, test_ids, output, clock or Clock())


def _epoch_states(problem: Problem) -> tuple[list[int], dict]:
    """The steps at the start of each epoch and the states there (one deterministic training run)."""
    if problem.config.train.order_file is not None:
        raise ConfigError("tracin and trak with attribute.trak.checkpoints > 1 use epoch boundaries, which "
                          "train.order_file does not have")
    spe = problem.total_steps // problem.config.train.epochs
    starts = [e * spe for e in range(problem.config.train.epochs)]
    _, kept, _ = problem.run(keep=set(starts) | {problem.total_steps})
    return starts, kept


def _mean_lr(problem: Problem, start: int, end: int) -> float:
    """The schedule's mean learning rate over the training steps [start, end)."""
    cfg = problem.config.optimizer
    return cfg.lr * sum(lr_factor(cfg.schedule, t, problem.total_steps) for t in range(start, end)) / (end - start)


def tracin(problem: Problem, final: TrainState, test_ids, output: str, options: dict, clock: Clock | None = None):
    """TracIn-CP over epochs; options (config.TracinConfig): states (start | end of each epoch),
    checkpoints (the last K epochs; 0 = all), lr_weighting (each epoch's mean learning rate, else
    optimizer.lr)."""
    clock = clock or Clock()
    with clock.training_side():
        starts, kept = _epoch_states(problem)
    ends = starts[1:] + [problem.total_steps]
    epochs = list(zip(starts, ends))
    last = int(options["checkpoints"])
    if last > len(epochs):
        raise ConfigError(f"attribute.tracin.checkpoints={last} exceeds the {len(epochs)} epochs of this run")
    at_end = options["states"] == "end"
    cfg = problem.config.optimizer
    total = 0.0
    for start, end in epochs[-last:] if last else epochs:
        lr = _mean_lr(problem, start, end) if options["lr_weighting"] else cfg.lr
        state = kept[end] if at_end else kept[start]
        total = total - lr * _step_scale(problem) * _grad_dot(problem, state, test_ids, output, clock)
    return total


# --- TRAK --------------------------------------------------------------------------------------

def trak_projection(params: dict, proj_dim: int, seed: int, model_index: int) -> dict:
    """The random Gaussian projection, one (numel, proj_dim) block per parameter, / sqrt(proj_dim)."""
    return {k: torch.randn(v.numel(), proj_dim, generator=generator(seed, "trak", model_index, k),
                           dtype=torch.float64).to(v.device) / math.sqrt(proj_dim)
            for k, v in params.items()}


def _project(grads: dict, projection: dict):
    return sum(g.flatten(1).double() @ projection[k] for k, g in grads.items())  # (n, proj_dim)


def _correct_prob(problem: Problem, state: TrainState, x, y):
    with torch.no_grad():
        logits, _ = problem.model.apply(state.params, state.buffers, x, train=False)
        p = torch.softmax(logits.double(), dim=-1)
        return p.gather(-1, y[..., None]).squeeze(-1).reshape(y.shape[0], -1).mean(1)  # (n,)


def trak(problem: Problem, final: TrainState, test_ids, output: str, options: dict, clock: Clock | None = None):
    ds = problem.dataset
    clock = clock or Clock()
    ids = torch.as_tensor(test_ids, device=problem.device)
    n_models, proj_dim, damping = int(options["checkpoints"]), int(options["proj_dim"]), float(options["damping"])
    if n_models > problem.config.train.epochs + 1:
        raise ConfigError(f"attribute.trak.checkpoints={n_models} exceeds the {problem.config.train.epochs + 1} "
                         f"epoch states of this run: set attribute.trak.checkpoints={problem.config.train.epochs + 1} "
                         "or fewer")
    if n_models == 1:
        states = [final]
    else:
        with clock.training_side():
            starts, kept = _epoch_states(problem)
        steps = (starts + [problem.total_steps])[-n_models:]
        states = [kept[t] for t in steps]
    margin = OUTPUT_FUNCTIONS["margin"]
    tau = 0.0
    for m, state in enumerate(states):
        with clock.training_side():
            projection = trak_projection(state.params, proj_dim, problem.config.seed, m)
            phi = torch.cat([_project(g, projection) for _, g in
                             per_example_grads(problem, state, ds.x_train, ds.y_train, margin)])  # (N, k)
            kernel = phi.T @ phi
            kernel = kernel + damping * kernel.diagonal().mean() * torch.eye(proj_dim, dtype=kernel.dtype,
                                                                             device=kernel.device)
            q = 1.0 - _correct_prob(problem, state, ds.x_train, ds.y_train)  # (N,)
        (_, g_test), = per_example_grads(problem, state, ds.x_test[ids], ds.y_test[ids], margin, chunk=len(ids))
        phi_test = _project(g_test, projection)  # (J, k)
        tau = tau + (phi @ torch.linalg.solve(kernel, phi_test.T)) * q[:, None]  # (N, J)
    tau = tau / len(states)
    if output == "margin":
        return tau
    return tau * -(1.0 - _correct_prob(problem, final, ds.x_test[ids], ds.y_test[ids]))[None, :]


# --- EK-FAC influence --------------------------------------------------------------------------

def _kfac_layers(problem: Problem, state: TrainState) -> dict:
    """{layer: transposed} for the layers K-FAC covers: those the model taps (models/layers.Taps)
    whose weight is trained: linear layers (per example or per token), convolutions (per output
    pixel), Hugging Face's Conv1D (a linear layer stored (in, out): transposed). Other parameters
    (embeddings, normalisation scales and shifts, tied weights) are left out of the curvature and
    of the gradients' inner products, as kronfluence leaves out the modules it does not track."""
    taps = Taps(batch=1)
    with torch.enable_grad():
        problem.model.apply(state.params, state.buffers, problem.dataset.x_train[:1], train=False, taps=taps)
    layers = {name: name in taps.transposed for name in taps.offsets if f"{name}.weight" in state.params}
    if not layers:
        raise ConfigError("ekfac and source need trained linear or convolutional layers; this model has none")
    return layers


def _sampled_labels(logits, y, gen):
    """One label per supervised position drawn from the model's distribution (IGNORE elsewhere):
    a sequence's true Fisher is an expectation over V^T label sequences, estimated with one draw
    per position (as kronfluence does); a classifier's is enumerated exactly instead."""
    p = torch.softmax(logits.detach().double().reshape(-1, logits.shape[-1]), -1).cpu()
    drawn = torch.multinomial(p, 1, generator=gen).view(y.shape).to(y.device)
    return torch.where(y == IGNORE, y, drawn)


def _layer_factors(problem: Problem, state: TrainState, layers, chunk: int = CHUNK, tag: int = 0):
    """Yield per chunk: ({layer: a_bar (n, T, in+1)}, {layer: g (C, n, T, out)}, p (n, C)) in eval mode,
    T the layer's positions per example (1 for a linear layer on a vector, the tokens of a sequence,
    the output pixels of a convolution).

    For a classifier, g[y] is the gradient of loss(logits, y) with respect to the layer's output,
    for every label y: expectations over y ~ p give the true Fisher exactly. For a sequence model
    (logits (n, L, V)), C = 1: the gradient of the example's loss (the mean over its supervised
    tokens) at labels drawn from the model (_sampled_labels, seeded by the run's seed and `tag`:
    the same draws in both passes of ekfac_factors), with p = 1.
    """
    ds = problem.dataset
    gen = generator(problem.config.seed, "kfac-labels", tag)
    for start in range(0, ds.n_train, chunk):
        x = ds.x_train[start:start + chunk]
        with torch.enable_grad():
            taps = Taps(batch=x.shape[0])
            logits, _ = problem.model.apply(state.params, state.buffers, x, train=False, taps=taps)
            offsets = [taps.offsets[n] for n in layers]
            if logits.dim() == 2:
                log_p = torch.log_softmax(logits, dim=-1)
                grads = [torch.autograd.grad(-log_p[:, y].sum(), offsets, retain_graph=True, allow_unused=True,
                                             materialize_grads=True)  # a layer off the output's path: 0
                         for y in range(logits.shape[1])]
                p = log_p.detach().double().exp()
            else:
                drawn = _sampled_labels(logits, ds.y_train[start:start + chunk], gen)
                grads = [torch.autograd.grad(per_example_loss(logits, drawn).sum(), offsets, allow_unused=True,
                                             materialize_grads=True)]
                p = torch.ones(x.shape[0], 1, dtype=torch.float64, device=logits.device)
        a_bar = {}
        for name in layers:
            a = taps.inputs[name].detach().double()  # (n, T, in)
            a_bar[name] = torch.cat([a, torch.ones_like(a[..., :1])], -1) if f"{name}.bias" in state.params else a
        g = {name: torch.stack([Taps.output_grad(gr[i]) for gr in grads]).double()
             for i, name in enumerate(layers)}  # (C, n, T, out)
        yield a_bar, g, p


def ekfac_factors(problem: Problem, state: TrainState, tag: int = 0) -> dict:
    """{layer: (Q_A, Q_G, Lambda, transposed)} with Lambda (out, in+1) the refit eigenvalues: the mean
    over examples (and labels y ~ p) of the squared per-example gradient in the Kronecker eigenbasis.
    `tag` seeds the labels drawn for a sequence model (one per SOURCE segment)."""

    layers = _kfac_layers(problem, state)
    n = problem.dataset.n_train
    A, G = {}, {}
    for a_bar, g, p in _layer_factors(problem, state, layers, tag=tag):
        for name in layers:
            a = a_bar[name]
            A[name] = A.get(name, 0.0) + torch.einsum("nti,ntj->ij", a, a) / n
            gw = g[name] * p.T[:, :, None, None].sqrt()  # (C, n, T, out), weighted by sqrt p(y)
            G[name] = G.get(name, 0.0) + torch.einsum("cnto,cntp->op", gw, gw) / n
    bases = {name: (torch.linalg.eigh(A[name])[1], torch.linalg.eigh(G[name])[1]) for name in layers}
    lam = {}
    for a_bar, g, p in _layer_factors(problem, state, layers, tag=tag):
        for name in layers:
            q_a, q_g = bases[name]
            a_rot, g_rot = a_bar[name] @ q_a, g[name] @ q_g  # (n, T, in), (C, n, T, out)
            if a_rot.shape[1] == 1:  # one position: the per-example gradient g a^T has rank one
                c = g_rot[:, :, 0] ** 2 * p.T[:, :, None]  # (C, n, out)
                lam[name] = lam.get(name, 0.0) + torch.einsum("cno,ni->oi", c, a_rot[:, 0] ** 2) / n
                continue
            for y in range(g_rot.shape[0]):  # a sum over positions: square the whole gradient
                m = torch.einsum("nto,nti->noi", g_rot[y], a_rot)
                lam[name] = lam.get(name, 0.0) + torch.einsum("n,noi->oi", p[:, y], m * m) / n
    return {name: (bases[name][0], bases[name][1], lam[name], layers[name]) for name in layers}


def _layer_matrix(grads: dict, name: str, transposed: bool = False):
    """Per-example gradients of a layer as (n, out, in[+1]): a convolution's weight flattened to
    (out, C k k) as its patches are, a weight stored (in, out) transposed, a bias as the last column."""

    w = grads[f"{name}.weight"].double()
    w = w.flatten(2) if w.dim() == 5 else w
    w = w.transpose(-1, -2) if transposed else w
    b = grads.get(f"{name}.bias")
    return torch.cat([w, b.double()[..., None]], dim=-1) if b is not None else w


def ekfac(problem: Problem, final: TrainState, test_ids, output: str, options: dict, clock: Clock | None = None,
          memo: dict | None = None):
    ds = problem.dataset
    ids = torch.as_tensor(test_ids, device=problem.device)
    clock = clock or Clock()
    with clock.training_side():
        factors = memoized(memo, ("ekfac-factors",), lambda: ekfac_factors(problem, final))
    damping, relative = float(options["damping"]), bool(options["relative_damping"])
    (_, g_test), = per_example_grads(problem, final, ds.x_test[ids], ds.y_test[ids], OUTPUT_FUNCTIONS[output],
                                    chunk=len(ids))
    ihvp = {}
    for name, (q_a, q_g, lam, transposed) in factors.items():
        v = _layer_matrix(g_test, name, transposed)  # (J, out, in+1)
        lam_d = lam + (damping * lam.mean() if relative else damping)
        ihvp[name] = q_g @ ((q_g.T @ v @ q_a) / lam_d) @ q_a.T
    out = torch.zeros(ds.n_train, len(test_ids), dtype=torch.float64, device=problem.device)
    for start, g in clock.timed(per_example_grads(problem, final, ds.x_train, ds.y_train, OUTPUT_FUNCTIONS["loss"])):
        for name, (*_, transposed) in factors.items():
            m = _layer_matrix(g, name, transposed)  # (n, out, in+1)
            out[start:start + m.shape[0]] += torch.einsum("noi,joi->nj", m, ihvp[name])
    return -out / ds.n_train



# --- SOURCE: approximate unrolling by segments ---------------------------------------------------

def segment_bounds(total_steps: int, segments: int) -> list[tuple[int, int]]:
    """[start, end) of each of `segments` equal runs of training steps."""
    edges = [round(total_steps * s / segments) for s in range(segments + 1)]
    return list(zip(edges[:-1], edges[1:]))


def source_filters(lam, horizon: float, damping: float):
    """SOURCE's two functions of a segment's curvature eigenvalues lam (+ damping), for a segment
    of `horizon` = a * K (its effective step size times its steps):
        carry(lam) = exp(-horizon lam)                 how a change made before the segment survives it
        made(lam)  = (1 - exp(-horizon lam)) / lam     what the example's gradient adds during it
    made -> horizon as lam -> 0 (plain gradient descent) and -> 1 / lam as horizon -> inf (influence)."""
    lam = lam + damping
    x = horizon * lam
    carry = torch.exp(-x)
    small = x.abs() < 1e-8
    made = torch.where(small, torch.full_like(lam, horizon), -torch.expm1(-x) / torch.where(small, 1.0, lam))
    return carry, made


def _in_eigenbasis(v, q_a, q_g, scale):
    """Q_G ((Q_G^T V Q_A) * scale) Q_A^T for V (J, out, in[+1])."""
    return q_g @ ((q_g.T @ v @ q_a) * scale) @ q_a.T


def segment_factors(problem: Problem, segments: list) -> list:
    """Each segment's EK-FAC factors at its state, its labels drawn with its own tag."""
    return [ekfac_factors(problem, state, tag) for tag, (state, _) in enumerate(segments)]


def source_from(problem: Problem, segments: list, test_grads: dict, damping: float, relative: bool,
                clock: Clock | None = None, factors: list | None = None):
    """SOURCE scores (N, J) from the segments [(state at the segment's end, horizon a * K: a number, or
    one per layer)], first to last, and the test gradients at the final state: -(1/N) sum over segments l of
    < made_l(H_l) carry_{l+1..L}(H) grad f, grad l_i(theta_l) >, with H_l the EK-FAC Gauss-Newton
    Hessian of the mean training loss at the segment's state."""
    clock = clock or Clock()
    ds = problem.dataset
    with clock.training_side():
        if factors is None:  # given: computed for these states before
            factors = segment_factors(problem, segments)
    layers = {name: f[3] for name, f in factors[-1].items()}  # {layer: transposed}
    u = {name: _layer_matrix(test_grads, name, layers[name]) for name in layers}  # grad f, carried back
    out = torch.zeros(ds.n_train, next(iter(u.values())).shape[0], dtype=torch.float64, device=problem.device)
    for (state, horizon), factor in reversed(list(zip(segments, factors))):
        made_v, carried = {}, {}
        for name in layers:
            q_a, q_g, lam, _ = factor[name]
            h = horizon[name] if isinstance(horizon, dict) else horizon
            carry, made = source_filters(lam, h, damping * lam.mean() if relative else damping)
            made_v[name] = _in_eigenbasis(u[name], q_a, q_g, made)
            carried[name] = _in_eigenbasis(u[name], q_a, q_g, carry)
        train_grads = per_example_grads(problem, state, ds.x_train, ds.y_train, OUTPUT_FUNCTIONS["loss"])
        for start, g in clock.timed(train_grads):
            for name, transposed in layers.items():
                m = _layer_matrix(g, name, transposed)  # (n, out, in+1)
                out[start:start + m.shape[0]] += torch.einsum("noi,joi->nj", m, made_v[name])
        u = carried
    return -out / ds.n_train


def _per_layer(problem: Problem, state: TrainState, t: int, horizon: float, layers):
    """A segment's horizon: for Adam, one per layer (linear or convolutional), scaled by the layer's
    mean preconditioner; for SGD with momentum mu, the steady-state step lr / (1 - mu)."""
    cfg = problem.config.optimizer
    if cfg.name != "adam":
        return horizon / (1.0 - cfg.momentum)
    c2 = 1.0 - cfg.betas[1] ** max(t, 1)
    out = {}
    for name in layers:
        nu = [state.opt["nu"][k] for k in (f"{name}.weight", f"{name}.bias") if k in state.opt["nu"]]
        scale = torch.cat([(1.0 / (torch.sqrt(v.double() / c2 + cfg.eps_root) + cfg.eps)).flatten() for v in nu])
        out[name] = horizon * float(scale.mean())
    return out


def source(problem: Problem, final: TrainState, test_ids, output: str, options: dict, clock: Clock | None = None,
           memo: dict | None = None):
    """SOURCE (Bae et al. 2024): training split into `segments` equal runs of steps, each with the
    EK-FAC curvature, training gradients and effective step size at its end: the schedule's mean
    learning rate (per example a share c * B of a batch, c = 1/B for mean reduction), times, for
    Adam, each layer's mean preconditioner 1 / (sqrt(v_hat + eps_root) + eps) at the segment's end
    (SOURCE's SGD unrolling with Adam's step size per layer)."""
    clock = clock or Clock()
    ds = problem.dataset
    ids = torch.as_tensor(test_ids, device=problem.device)
    n_segments = int(options["segments"])
    if n_segments > problem.total_steps:
        raise ConfigError(f"attribute.source.segments={n_segments} exceeds the {problem.total_steps} training steps")
    bounds = segment_bounds(problem.total_steps, n_segments)
    with clock.training_side():
        _, kept, _ = memoized(memo, ("source-states", n_segments),
                              lambda: problem.run(keep={end for _, end in bounds}))
    batch = problem.config.train.batch_size
    layers = _kfac_layers(problem, final)
    segments = []
    for start, end in bounds:
        lr = _mean_lr(problem, start, end)
        horizon = lr * _step_scale(problem) * batch * (end - start)
        segments.append((kept[end], _per_layer(problem, kept[end], end, horizon, layers)))
    (_, g_test), = per_example_grads(problem, final, ds.x_test[ids], ds.y_test[ids], OUTPUT_FUNCTIONS[output],
                                    chunk=len(ids))
    with clock.training_side():
        factors = memoized(memo, ("source-factors", n_segments), lambda: segment_factors(problem, segments))
    return source_from(problem, segments, g_test, float(options["damping"]), bool(options["relative_damping"]), clock,
                       factors)

"""Approximate attribution baselines in MAGIC's harness and sign convention.

Every method returns scores (N, J) estimating d f_j / d w_i: the change of test output j
(attribute.output: loss or margin) per unit of weight added to training example i, so
`magic score` compares them with MAGIC without special cases. How each native output is
converted (the scale matters only for the slope, never for the LDS):

    grad-dot  -eta/B * <grad f_j, grad l_i> at the final model: one SGD step of size eta = optimizer.lr
              on the example's share of a batch (B = train.batch_size for mean reduction, 1 for sum).
    tracin    TracIn-CP: the same sum over the states at the start of every epoch, each with the
              mean learning rate of its epoch (every example is visited once per epoch).
    trak      TRAK (Park et al. 2023): tau_ij = phi_j^T (Phi^T Phi + lambda I)^-1 phi_i * Q_i with
              phi = P^T grad(margin), random Gaussian P (proj_dim), Q_i = 1 - p_i(y_i); tau estimates
              d margin_j / d w_i. For the loss output it is multiplied by d loss_j / d margin_j =
              -(1 - p_j(y_j)). An ensemble averages tau over the last `checkpoints` epoch states.
    ekfac     Influence functions, d f_j / d w_i = -(1/N) grad f_j^T (H + lambda)^-1 grad l_i, with H the
              Gauss-Newton Hessian of the mean training loss approximated by EK-FAC (Grosse et al.
              2023): K-FAC factors A = E[a a^T], G = E_y~p[g g^T] per linear layer (true Fisher: an exact
              expectation over the model's label distribution, no sampling) and eigenvalues refit in
              their Kronecker eigenbasis. Damping lambda = damping * mean eigenvalue (relative) or
              damping itself.

Gradients are taken in eval mode (BatchNorm uses running statistics), per example with
torch.func.vmap(grad(...)), and dot products are accumulated in float64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import grad, vmap

from magic_cli.core.losses import OUTPUT_FUNCTIONS
from magic_cli.core.optim import lr_factor
from magic_cli.core.problem import Problem, TrainState
from magic_cli.determinism import generator
from magic_cli.errors import ConfigError
from magic_cli.models.layers import Taps

CHUNK = 256  # examples per vmap(grad) call


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


def _grad_dot(problem: Problem, state: TrainState, test_ids, output: str):
    """(N, J) float64: <grad l_i, grad f_j> at `state`."""

    ds = problem.dataset
    ids = torch.as_tensor(test_ids, device=problem.device)
    (_, g_test), = per_example_grads(problem, state, ds.x_test[ids], ds.y_test[ids], OUTPUT_FUNCTIONS[output],
                                    chunk=len(test_ids))
    g_test = _flat(g_test)  # (J, P)
    out = torch.zeros(ds.n_train, len(test_ids), dtype=torch.float64, device=problem.device)
    for start, g in per_example_grads(problem, state, ds.x_train, ds.y_train, OUTPUT_FUNCTIONS["loss"]):
        g = _flat(g)
        out[start:start + g.shape[0]] = g @ g_test.T
    return out


def _step_scale(problem: Problem) -> float:
    """d theta per unit of one example's weight is -lr/B * grad (mean reduction) or -lr * grad (sum).
    token_mean weighs example b by n_b / n_tok (its supervised tokens over the batch's), which
    these first-order approximations take at its mean, 1/B."""
    tc = problem.config.train
    return 1.0 if tc.loss_reduction == "sum" else 1.0 / tc.batch_size


def grad_dot(problem: Problem, final: TrainState, test_ids, output: str, options: dict):
    scale = problem.config.optimizer.lr * _step_scale(problem)
    return -scale * _grad_dot(problem, final, test_ids, output)


def _epoch_states(problem: Problem) -> tuple[list[int], dict]:
    """The steps at the start of each epoch and the states there (one deterministic training run)."""
    if problem.config.train.order_file is not None:
        raise ConfigError("tracin and trak with attribute.trak.checkpoints > 1 use epoch boundaries, which "
                          "train.order_file does not have")
    spe = problem.total_steps // problem.config.train.epochs
    starts = [e * spe for e in range(problem.config.train.epochs)]
    _, kept, _ = problem.run(keep=set(starts) | {problem.total_steps})
    return starts, kept


def tracin(problem: Problem, final: TrainState, test_ids, output: str, options: dict):
    starts, kept = _epoch_states(problem)
    ends = starts[1:] + [problem.total_steps]
    cfg = problem.config.optimizer
    total = 0.0
    for start, end in zip(starts, ends):
        lr = cfg.lr * sum(lr_factor(cfg.schedule, t, problem.total_steps) for t in range(start, end)) / (end - start)
        total = total - lr * _step_scale(problem) * _grad_dot(problem, kept[start], test_ids, output)
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


def trak(problem: Problem, final: TrainState, test_ids, output: str, options: dict):
    ds = problem.dataset
    ids = torch.as_tensor(test_ids, device=problem.device)
    n_models = int(options.get("checkpoints", 1))
    proj_dim, damping = int(options.get("proj_dim", 1024)), float(options.get("damping", 0.1))
    if n_models > problem.config.train.epochs + 1:
        raise ConfigError(f"attribute.trak.checkpoints={n_models} exceeds the {problem.config.train.epochs + 1} "
                         "epoch states of this run")
    if n_models == 1:
        states = [final]
    else:
        starts, kept = _epoch_states(problem)
        steps = (starts + [problem.total_steps])[-n_models:]
        states = [kept[t] for t in steps]
    margin = OUTPUT_FUNCTIONS["margin"]
    tau = 0.0
    for m, state in enumerate(states):
        projection = trak_projection(state.params, proj_dim, problem.config.seed, m)
        phi = torch.cat([_project(g, projection) for _, g in
                         per_example_grads(problem, state, ds.x_train, ds.y_train, margin)])  # (N, k)
        (_, g_test), = per_example_grads(problem, state, ds.x_test[ids], ds.y_test[ids], margin, chunk=len(ids))
        phi_test = _project(g_test, projection)  # (J, k)
        kernel = phi.T @ phi
        kernel = kernel + damping * kernel.diagonal().mean() * torch.eye(proj_dim, dtype=kernel.dtype,
                                                                         device=kernel.device)
        q = 1.0 - _correct_prob(problem, state, ds.x_train, ds.y_train)  # (N,)
        tau = tau + (phi @ torch.linalg.solve(kernel, phi_test.T)) * q[:, None]  # (N, J)
    tau = tau / len(states)
    if output == "margin":
        return tau
    return tau * -(1.0 - _correct_prob(problem, final, ds.x_test[ids], ds.y_test[ids]))[None, :]


# --- EK-FAC influence --------------------------------------------------------------------------

def _linear_layers(params: dict) -> list[str]:
    names = sorted({k.rsplit(".", 1)[0] for k in params if k.endswith(".weight") and params[k].dim() == 2})
    covered = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    outside = [k for k in params if k not in covered]
    if outside:
        raise ConfigError(f"ekfac supports models whose parameters all sit in linear layers; "
                         f"{', '.join(outside[:3])} do not")
    return names


def _layer_factors(problem: Problem, state: TrainState, layers: list[str], chunk: int = CHUNK):
    """Yield per chunk: ({layer: a_bar (n, in+1)}, {layer: g (C, n, out)}, p (n, C)) in eval mode.

    g[y] is the gradient of loss(logits, y) with respect to the layer's output, for every label y:
    expectations over y ~ p give the true Fisher exactly.
    """
    ds = problem.dataset
    for start in range(0, ds.n_train, chunk):
        x = ds.x_train[start:start + chunk]
        with torch.enable_grad():
            offsets = {name: torch.zeros(x.shape[0], state.params[f"{name}.weight"].shape[0], dtype=problem.dtype,
                                         device=problem.device, requires_grad=True) for name in layers}
            taps = Taps(offsets)
            logits, _ = problem.model.apply(state.params, state.buffers, x, train=False, taps=taps)
            if logits.dim() != 2:
                raise ConfigError("ekfac supports classifiers with one label per example")
            log_p = torch.log_softmax(logits, dim=-1)
            grads = [torch.autograd.grad(-log_p[:, y].sum(), [offsets[n] for n in layers], retain_graph=True)
                     for y in range(logits.shape[1])]
        a_bar = {}
        for name in layers:
            a = taps.inputs[name].detach().double()
            a_bar[name] = torch.cat([a, torch.ones_like(a[:, :1])], 1) if f"{name}.bias" in state.params else a
        g = {name: torch.stack([gr[i] for gr in grads]).double() for i, name in enumerate(layers)}  # (C, n, out)
        yield a_bar, g, log_p.detach().double().exp()


def ekfac_factors(problem: Problem, state: TrainState) -> dict:
    """{layer: (Q_A, Q_G, Lambda)} with Lambda (out, in+1) the refit eigenvalues."""

    layers = _linear_layers(state.params)
    n = problem.dataset.n_train
    A, G = {}, {}
    for a_bar, g, p in _layer_factors(problem, state, layers):
        for name in layers:
            A[name] = A.get(name, 0.0) + a_bar[name].T @ a_bar[name] / n
            gw = g[name] * p.T[:, :, None].sqrt()  # (C, n, out), weighted by sqrt p(y)
            G[name] = G.get(name, 0.0) + torch.einsum("cno,cnp->op", gw, gw) / n
    bases = {name: (torch.linalg.eigh(A[name])[1], torch.linalg.eigh(G[name])[1]) for name in layers}
    lam = {}
    for a_bar, g, p in _layer_factors(problem, state, layers):
        for name in layers:
            q_a, q_g = bases[name]
            d = (a_bar[name] @ q_a) ** 2  # (n, in+1)
            c = (g[name] @ q_g) ** 2 * p.T[:, :, None]  # (C, n, out)
            lam[name] = lam.get(name, 0.0) + torch.einsum("cno,ni->oi", c, d) / n
    return {name: (bases[name][0], bases[name][1], lam[name]) for name in layers}


def _layer_matrix(grads: dict, name: str):
    """Per-example gradients of a linear layer as (n, out, in[+1]) with the bias as the last column."""

    w = grads[f"{name}.weight"].double()
    b = grads.get(f"{name}.bias")
    return torch.cat([w, b.double()[..., None]], dim=-1) if b is not None else w


def ekfac(problem: Problem, final: TrainState, test_ids, output: str, options: dict):
    ds = problem.dataset
    ids = torch.as_tensor(test_ids, device=problem.device)
    factors = ekfac_factors(problem, final)
    damping, relative = float(options.get("damping", 0.1)), bool(options.get("relative_damping", True))
    (_, g_test), = per_example_grads(problem, final, ds.x_test[ids], ds.y_test[ids], OUTPUT_FUNCTIONS[output],
                                    chunk=len(ids))
    ihvp = {}
    for name, (q_a, q_g, lam) in factors.items():
        v = _layer_matrix(g_test, name)  # (J, out, in+1)
        lam_d = lam + (damping * lam.mean() if relative else damping)
        ihvp[name] = q_g @ ((q_g.T @ v @ q_a) / lam_d) @ q_a.T
    out = torch.zeros(ds.n_train, len(test_ids), dtype=torch.float64, device=problem.device)
    for start, g in per_example_grads(problem, final, ds.x_train, ds.y_train, OUTPUT_FUNCTIONS["loss"]):
        for name in factors:
            m = _layer_matrix(g, name)  # (n, out, in+1)
            out[start:start + m.shape[0]] += torch.einsum("noi,joi->nj", m, ihvp[name])
    return -out / ds.n_train


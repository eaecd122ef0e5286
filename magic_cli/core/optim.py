"""Pure optimizers (optax-shaped) and learning-rate schedules.

An optimizer is two pure functions over tensor dicts; nothing is updated in place, so a
training step built on them can be differentiated through (torch.optim cannot):

    init(params)                        -> opt_state
    update(grads, opt_state, params, t) -> (new_params, new_opt_state)
    vjp(grads, opt_state, params, t, ct_params, ct_opt) -> (ct_params, ct_opt_state, ct_grads)

`vjp` is the hand-derived vector-Jacobian product of `update`: given cotangents of its
outputs (with any number of leading batch dims, one per test example), it returns the
cotangents of (params, opt_state, grads). It consumes its cotangent arguments: they are
updated in place (the reverse pass owns them and never reads them again). The reverse pass spends much of its time here
with many test examples at once, so the per-element coefficients are computed once and
the batched work is a few fused multiply-adds; tests check it against autograd.

Unlike optax, `update` returns the new parameters rather than the increments: the step
index t feeds the learning-rate schedule and Adam's bias correction, so the optimizer
state holds only tensors.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from typing import Callable, NamedTuple

import torch

from magic_cli.names import OPTIMIZERS


class Optimizer(NamedTuple):
    init: Callable
    update: Callable
    vjp: Callable


def lr_factor(schedule, t: int, total_steps: int) -> float:
    """The learning-rate multiplier at step t (0-based) of total_steps: a pure function.

    onecycle         start_factor -> 1 linearly over the warmup fraction, then linearly to
                     end_factor at the last step (the paper's one-cycle linear schedule)
    cosine           the same warm-up, then a cosine from 1 to end_factor
    warmup_linear    0 -> 1 over the warmup, then linearly to end_factor after the last step
                     (transformers' get_linear_schedule_with_warmup when end_factor = 0)
    warmup_constant  0 -> 1 over the warmup, then 1 (get_constant_schedule_with_warmup)
    """
    if schedule.name == "constant":
        return 1.0
    warm = int(round(schedule.warmup * total_steps))
    if schedule.name in ("warmup_linear", "warmup_constant"):
        if t < warm:
            return t / warm
        if schedule.name == "warmup_constant":
            return 1.0
        frac = (t - warm) / max(1, total_steps - warm)  # 0 at the peak, 1 one step after the last
        return 1.0 + (schedule.end_factor - 1.0) * frac
    if t < warm:
        return schedule.start_factor + (1.0 - schedule.start_factor) * t / warm
    frac = (t - warm) / max(1, total_steps - 1 - warm)  # 0 at the peak, 1 at the last step
    if schedule.name == "onecycle":
        return 1.0 + (schedule.end_factor - 1.0) * frac
    if schedule.name == "cosine":
        return schedule.end_factor + (1.0 - schedule.end_factor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"optimizer.schedule.name={schedule.name!r} is not valid")


def decay_of(weight_decay: float, no_decay: tuple) -> Callable[[str], float]:
    """name -> the weight decay of that parameter: 0 for names matching a no_decay pattern."""

    @functools.lru_cache(maxsize=None)
    def wd_of(name: str) -> float:
        return 0.0 if any(fnmatch.fnmatchcase(name, pat) for pat in no_decay) else weight_decay

    return wd_of


def sgd(lr: Callable[[int], float], momentum: float, nesterov: bool, weight_decay: float,
        no_decay: tuple = ()) -> Optimizer:
    """torch.optim.SGD (dampening 0): g += wd*p; buf = mu*buf + g; p -= lr*(g + mu*buf | buf).
    Parameters whose names match a `no_decay` pattern have wd = 0."""
    wd_of = decay_of(weight_decay, no_decay)

    def init(params):
        if momentum == 0:
            return {}

        return {"momentum": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(grads, state, params, t):
        new_params, new_buf = {}, {}
        for k, p in params.items():
            wd = wd_of(k)
            g = grads[k] + wd * p if wd else grads[k]
            if momentum:
                buf = momentum * state["momentum"][k] + g
                new_buf[k] = buf
                g = g + momentum * buf if nesterov else buf
            new_params[k] = p - lr(t) * g
        return new_params, ({"momentum": new_buf} if momentum else {})

    def vjp(grads, state, params, t, ct_params, ct_state):
        # p' = p - lr*d, d = g~ + mu*buf' (nesterov) | buf' | g~;  buf' = mu*buf + g~;  g~ = g + wd*p
        ct_p, ct_buf, ct_g = {}, {}, {}
        for k in params:
            pp = ct_params[k]
            if momentum:
                ct_buf_new = ct_state["momentum"][k] - (lr(t) * momentum) * pp if nesterov else \
                    ct_state["momentum"][k] - lr(t) * pp
                ct_gt = ct_buf_new - lr(t) * pp if nesterov else ct_buf_new
                ct_buf[k] = momentum * ct_buf_new
            else:
                ct_gt = -lr(t) * pp
            ct_g[k] = ct_gt
            wd = wd_of(k)
            ct_p[k] = pp + wd * ct_gt if wd else pp
        return ct_p, ({"momentum": ct_buf} if momentum else {}), ct_g

    return Optimizer(init, update, vjp)


def adam(lr: Callable[[int], float], betas: tuple, eps: float, eps_root: float,
         weight_decay: float, no_decay: tuple = ()) -> Optimizer:
    """Adam(W) with eps_root inside the square root (optax's scale_by_adam):

        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
        p -= lr_t * ( m_hat / (sqrt(v_hat + eps_root) + eps) + wd*p )

    eps_root > 0 keeps the derivative of sqrt finite where v = 0 (needed for metagradients);
    with eps_root = 0 and wd = 0 this is torch.optim.Adam, with wd > 0 torch.optim.AdamW.
    Parameters whose names match a `no_decay` pattern have wd = 0.
    """
    b1, b2 = betas
    wd_of = decay_of(weight_decay, no_decay)

    def init(params):
        return {"mu": {k: torch.zeros_like(p) for k, p in params.items()},
                "nu": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(grads, state, params, t):
        c1, c2 = 1.0 - b1 ** (t + 1), 1.0 - b2 ** (t + 1)
        new_params, mu, nu = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            mu[k] = b1 * state["mu"][k] + (1.0 - b1) * g
            nu[k] = b2 * state["nu"][k] + (1.0 - b2) * (g * g)
            direction = (mu[k] / c1) / (torch.sqrt(nu[k] / c2 + eps_root) + eps)
            wd = wd_of(k)
            if wd:
                direction = direction + wd * p
            new_params[k] = p - lr(t) * direction
        return new_params, {"mu": mu, "nu": nu}

    def vjp(grads, state, params, t, ct_params, ct_state):
        # With m' = b1*m + (1-b1)*g, v' = b2*v + (1-b2)*g^2, r = sqrt(v'/c2 + eps_root), d = r + eps:
        #   dp'/dm' = -lr/(c1*d)   dp'/dv' = lr*m'/(2*c1*c2*d^2*r)   dp'/dp = 1 - lr*wd

        c1, c2 = 1.0 - b1 ** (t + 1), 1.0 - b2 ** (t + 1)
        ct_p, ct_mu, ct_nu, ct_g = {}, {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            mu = b1 * state["mu"][k] + (1.0 - b1) * g
            nu = b2 * state["nu"][k] + (1.0 - b2) * (g * g)
            r = torch.sqrt(nu / c2 + eps_root)
            d = r + eps
            coef_mu = -lr(t) / (c1 * d)
            coef_nu = (lr(t) / (2.0 * c1 * c2)) * mu / (d * d * r)
            coef_g = (2.0 * (1.0 - b2)) * g
            # The batched (J, ...) work, in place on the incoming cotangents (consumed).
            pp = ct_params[k]
            a = ct_state["mu"][k].addcmul_(coef_mu, pp)  # total cotangent of m'
            b = ct_state["nu"][k].addcmul_(coef_nu, pp)  # total cotangent of v'
            ct_g[k] = torch.addcmul(a * (1.0 - b1), coef_g, b)
            ct_mu[k] = a.mul_(b1)
            ct_nu[k] = b.mul_(b2)
            wd = wd_of(k)
            ct_p[k] = pp.mul_(1.0 - lr(t) * wd) if wd else pp
        return ct_p, {"mu": ct_mu, "nu": ct_nu}, ct_g

    return Optimizer(init, update, vjp)


def build_optimizer(cfg, total_steps: int) -> Optimizer:
    """The optimizer of an OptimizerConfig, with its schedule baked in for total_steps."""

    def lr(t: int) -> float:
        return cfg.lr * lr_factor(cfg.schedule, t, total_steps)

    if cfg.name == "sgd":
        return sgd(lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, tuple(cfg.no_decay))
    if cfg.name == "adam":
        return adam(lr, tuple(cfg.betas), cfg.eps, cfg.eps_root, cfg.weight_decay, tuple(cfg.no_decay))
    raise ValueError(f"optimizer.name={cfg.name!r} is not valid; choose one of: {', '.join(OPTIMIZERS)}")

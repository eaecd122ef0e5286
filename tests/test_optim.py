"""The pure optimizers against torch.optim, their schedules, and their hand-derived VJPs."""

from __future__ import annotations

import pytest
import torch

from magic_cli.config import OptimizerConfig, ScheduleConfig
from magic_cli.core.optim import build_optimizer, lr_factor

F64 = torch.float64


def _problem(seed=0):
    """A small least-squares problem: params {'w': (3, 4), 'b': (3,)} and its gradient."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g, dtype=F64), torch.randn(16, 3, generator=g, dtype=F64)
    params = {"w": torch.randn(3, 4, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)}

    def grads(p):
        p = {k: v.detach().requires_grad_() for k, v in p.items()}
        loss = ((x @ p["w"].T + p["b"] - y) ** 2).mean()
        return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))

    return params, grads


def _compare_with_torch(cfg: OptimizerConfig, torch_opt_factory, steps=25):
    params, grads = _problem()
    opt = build_optimizer(cfg, steps)
    state = opt.init(params)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt = torch_opt_factory(list(ref.values()))
    for t in range(steps):
        g = grads(params)
        params, state = opt.update(g, state, params, t)
        for k, v in ref.items():
            v.grad = grads({k2: v2.detach() for k2, v2 in ref.items()})[k]
        torch_opt.step()
        for k in params:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 5e-3),
                                                    (0.5, False, 1e-2)])
def test_sgd_matches_torch(momentum, nesterov, wd):
    cfg = OptimizerConfig("sgd", lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    _compare_with_torch(cfg, lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, nesterov=nesterov,
                                                       weight_decay=wd))


def test_adam_matches_torch_adam():
    cfg = OptimizerConfig("adam", lr=0.01, betas=(0.9, 0.99), eps=1e-8, eps_root=0.0)
    _compare_with_torch(cfg, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8))


def test_adam_with_weight_decay_matches_torch_adamw():
    cfg = OptimizerConfig("adam", lr=0.01, betas=(0.9, 0.99), eps=1e-8, eps_root=0.0, weight_decay=0.1)
    _compare_with_torch(cfg, lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.99), eps=1e-8,
                                                         weight_decay=0.1))


@pytest.mark.parametrize("name", ["constant", "onecycle", "cosine"])
def test_schedules(name):
    s = ScheduleConfig(name, warmup=0.25, start_factor=0.1, end_factor=0.0)
    f = [lr_factor(s, t, 100) for t in range(100)]
    if name == "constant":
        assert f == [1.0] * 100
        return
    assert f[0] == pytest.approx(0.1) and max(f) == pytest.approx(1.0) and f[25] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(f[:25], f[1:26])) and all(a >= b for a, b in zip(f[25:], f[26:]))


@pytest.mark.parametrize("cfg", [
    OptimizerConfig("adam", lr=0.01, eps_root=1e-8),
    OptimizerConfig("adam", lr=0.01, eps_root=1e-6, weight_decay=0.1),
    OptimizerConfig("sgd", lr=0.05),
    OptimizerConfig("sgd", lr=0.05, momentum=0.9),
    OptimizerConfig("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
], ids=lambda c: f"{c.name}-m{c.momentum}-n{c.nesterov}-wd{c.weight_decay}")
def test_optimizer_vjp_matches_autograd(cfg):
    from torch.func import vjp

    params, grads = _problem()
    opt = build_optimizer(cfg, 10)
    state = opt.init(params)
    for t in range(3):  # a non-trivial optimizer state
        params, state = opt.update(grads(params), state, params, t)
    g, t = grads(params), 3
    out, fn = vjp(lambda p, s, g_: opt.update(g_, s, p, t), params, state, g)
    gen = torch.Generator().manual_seed(1)
    cts = [torch.utils._pytree.tree_map(lambda v: torch.randn(v.shape, generator=gen, dtype=F64), out)
           for _ in range(2)]  # two different cotangents: each batch row must get its own VJP
    wants = [fn(ct) for ct in cts]
    # the hand-derived vjp, with a leading batch dim of 2
    batched = torch.utils._pytree.tree_map(lambda a, b: torch.stack([a, b]), cts[0], cts[1])
    got = opt.vjp(g, state, params, t, batched[0], batched[1])
    for row, want in enumerate(wants):
        for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
            torch.testing.assert_close(b[row] if b.dim() > a.dim() else b, a, rtol=1e-12, atol=1e-14)

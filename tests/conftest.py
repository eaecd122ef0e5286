"""Shared fixtures: tiny float64 configs in tmp_path and a CLI runner."""

from __future__ import annotations

import pytest

# A config small enough for exactness checks in a fraction of a second: 142 wine examples,
# an 8-unit MLP, 2 epochs of 16 -> 16 steps.
TINY = ["dataset=wine", "model.hidden=[8]", "train.epochs=2", "train.batch_size=16", "dtype=float64"]


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a tiny float64 run writing into tmp_path/run."""
    return TINY + [f"out_dir={tmp_path / 'run'}"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `magic ARGS` in-process; return (exit code, stdout, stderr)."""
    from magic_cli.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli(capsys, *args)


def problem_for(overrides):
    from magic_cli.config import load
    from magic_cli.determinism import enable_determinism
    from magic_cli.stages.assemble import assemble

    config = load(overrides)
    enable_determinism(config.device, config.threads)
    return assemble(config)


def assert_eager_step_bit_equal(problem, steps: int = 4):
    """Training, replay and ground truth run the eager step (plain autograd); the reverse pass
    differentiates the torch.func one: the states they give must be the same bits."""
    import torch

    from magic_cli.core.problem import flatten_state

    eager = functional = problem.init_state()
    with torch.no_grad():
        for t in range(steps):
            batch, w = problem.batch(t), problem.weights[problem.schedule[t]]
            eager, functional = problem.eager_step(eager, batch, w), problem.train_step(functional, batch, w)
            a, b = flatten_state(eager), flatten_state(functional)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), f"step {t}"
            assert not any(v.requires_grad for v in a.values())


def unrolled_scores(problem, ids, output="loss"):
    """d f_j / d w by autograd through the fully unrolled training loop: (len(ids), N)."""
    import torch

    from magic_cli.core.losses import OUTPUT_FUNCTIONS

    w = problem.weights.clone().requires_grad_()
    state = problem.init_state()
    with torch.enable_grad():
        for t in range(problem.total_steps):
            state = problem.step(state, t, w)
        logits, _ = problem.model.apply(state.params, state.buffers, problem.dataset.x_test[ids], train=False)
        out = OUTPUT_FUNCTIONS[output](logits, problem.dataset.y_test[ids])
        return torch.stack([torch.autograd.grad(out[j], w, retain_graph=True)[0] for j in range(len(ids))])


def assert_taps_give_per_example_gradients(problem, state, n: int = 4) -> dict:
    """For every layer K-FAC covers, sum over positions of (output gradient) x (input, 1) equals
    the layer's per-example weight and bias gradient (vmap(grad)) at the labels K-FAC uses: label
    0 for a classifier (g[0]), the drawn labels for a sequence model. Returns the layers."""
    import torch

    from magic_cli.core import baselines
    from magic_cli.core.losses import per_example_loss
    from magic_cli.determinism import generator

    layers = baselines._kfac_layers(problem, state)
    a_bar, g, _ = next(baselines._layer_factors(problem, state, layers, chunk=n))
    x, y = problem.dataset.x_train[:n], problem.dataset.y_train[:n]
    if y.dim() == 1:
        labels = torch.zeros_like(y)
    else:
        logits, _ = problem.model.apply(state.params, state.buffers, x, train=False)
        labels = baselines._sampled_labels(logits, y, generator(problem.config.seed, "kfac-labels", 0))
        assert (labels != y).any() and ((labels == -100) == (y == -100)).all()
    (_, grads), = baselines.per_example_grads(problem, state, x, labels, per_example_loss, chunk=n)
    for name, transposed in layers.items():
        m = torch.einsum("nto,nti->noi", g[name][0], a_bar[name])
        torch.testing.assert_close(m, baselines._layer_matrix(grads, name, transposed), rtol=1e-9, atol=1e-13)
    return layers

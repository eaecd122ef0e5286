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
    from magic_cli.train import Problem

    config = load(overrides)
    enable_determinism(config.device, config.threads)
    return Problem.build(config)


def unrolled_scores(problem, ids, output="loss"):
    """d f_j / d w by autograd through the fully unrolled training loop: (len(ids), N)."""
    import torch

    from magic_cli.train import OUTPUT_FUNCTIONS

    w = problem.weights.clone().requires_grad_()
    state = problem.init_state()
    with torch.enable_grad():
        for t in range(problem.total_steps):
            state = problem.step(state, t, w)
        logits, _ = problem.model.apply(state.params, state.buffers, problem.dataset.x_test[ids], train=False)
        out = OUTPUT_FUNCTIONS[output](logits, problem.dataset.y_test[ids])
        return torch.stack([torch.autograd.grad(out[j], w, retain_graph=True)[0] for j in range(len(ids))])

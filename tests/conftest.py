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

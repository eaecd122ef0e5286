"""attribute.compile: the batched backward-over-backward through torch.compile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY
from test_faults import one_line_error


def _scores(cli, run, *extra):
    code, _, err = cli("train", *TINY, f"out_dir={run}", "checkpoint=sqrt")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0:6", *TINY, f"out_dir={run}", "attribute.batch_size=4", *extra)
    assert code == 0, err
    return (np.load(run / "attribute" / "magic" / "scores.npy"),
            json.loads((run / "attribute" / "magic" / "scores.json").read_text()))


def test_compiled_scores_are_exact_bit_identical_across_strategies_and_kept_apart(cli, tmp_path):
    eager, _ = _scores(cli, tmp_path / "eager", "checkpoint=sqrt")
    # groups of 4 and 2 ids: two shapes compiled in one command
    compiled, side = _scores(cli, tmp_path / "run", "checkpoint=sqrt", "attribute.compile=true")
    assert np.abs(compiled - eager).max() <= 1e-12 * np.abs(eager).max()  # float64: the same metagradient
    again, _ = _scores(cli, tmp_path / "run", "checkpoint=all", "attribute.compile=true", "--overwrite")
    assert again.tobytes() == compiled.tobytes()  # every strategy, every rerun: the same bits
    assert side["settings"] != _scores(cli, tmp_path / "eager", "checkpoint=sqrt")[1]["settings"]
    code, _, err = cli("attribute", "--test-ids", "0:6", *TINY, f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, "holds scores computed with other settings")  # never mixed with eager bits


@pytest.mark.parametrize("message, shown", [
    ("InductorError: C++ compile error\nmore lines", "InductorError: C++ compile error"),
    ("backend='inductor' raised:\nNotImplementedError: Cannot access storage of TensorWrapper\n\nSet TORCH...",
     "NotImplementedError: Cannot access storage of TensorWrapper"),  # what the nn.Module adapter gets
])
def test_a_compiler_failure_is_one_line(cli, tmp_path, monkeypatch, message, shown):
    import torch

    def broken(fn, **options):
        def run(*args):
            raise RuntimeError(message)
        return run

    monkeypatch.setattr(torch, "compile", broken)
    code, _, err = cli("train", *TINY, f"out_dir={tmp_path}")
    assert code == 0, err
    code, _, err = cli("attribute", "--test-ids", "0:4", *TINY, f"out_dir={tmp_path}", "attribute.compile=true")
    one_line_error(code, err, f"attribute.compile: torch.compile failed on this model (RuntimeError: {shown})",
                   "run without attribute.compile=true")
    assert not (tmp_path / "attribute" / "magic" / "scores.npy").exists()

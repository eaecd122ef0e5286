"""The end-to-end claim on the default experiment: MAGIC's linear predictions match retraining.

100 subsets per drop fraction and 50 test ids, as in the README; the default suite checks the
smallest drop fraction (about 40 s on 2 cores), `make test-slow` all four.
"""

from __future__ import annotations

import json

import pytest

TARGETS = {"0.01": 0.97, "0.05": 0.95}


def _pipeline(cli, out, drops):
    overrides = [f"out_dir={out}", f"ground_truth.drop_fractions=[{','.join(drops)}]"]
    for args in (["train"], ["attribute", "--test-ids", "0:50"], ["retrain-ground-truth", "--workers", "2"],
                 ["score"]):
        code, _, err = cli(*args, *overrides)
        assert code == 0, err
    summary = json.loads((out / "report" / "summary.json").read_text())
    return summary


def test_default_experiment_lds(cli, tmp_path):
    summary = _pipeline(cli, tmp_path, ["0.01"])
    assert summary["test_accuracy"] >= 0.97
    s = summary["lds"]["magic"]["0.01"]
    assert s["n_test"] == 50 and s["n_subsets"] == 100
    assert s["mean"] >= TARGETS["0.01"], s


@pytest.mark.slow
def test_default_experiment_lds_all_drop_fractions(cli, tmp_path):
    summary = _pipeline(cli, tmp_path, ["0.01", "0.05", "0.1", "0.2"])
    for p, target in TARGETS.items():
        assert summary["lds"]["magic"][p]["mean"] >= target
    assert summary["lds"]["magic"]["0.2"]["mean"] >= 0.9

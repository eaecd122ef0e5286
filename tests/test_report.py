"""`magic score`: statistics on hand-built arrays with known answers, the report files, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY

from magic_cli.core.metrics import mean_with_ci, per_test_correlations, predicted_change
from magic_cli.run_dir import RunDir, save_json


def test_predicted_change_sums_the_dropped_scores():
    scores = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])  # (N=3, J=2)
    masks = np.array([[True, False, True], [False, False, True]])  # drop {1}, drop {0, 1}
    np.testing.assert_array_equal(predicted_change(scores, masks), [[-2.0, -20.0], [-3.0, -30.0]])


def test_correlations_against_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    perm = x.copy()
    perm[[3, 7]] = perm[[7, 3]]  # swap two values: Spearman = 1 - 6 sum d^2 / (n (n^2 - 1))
    ranks = pd.Series(x).rank().to_numpy()
    d = ranks[3] - ranks[7]
    spearman = 1 - 6 * (2 * d * d) / (50 * (50 ** 2 - 1))
    pred = np.stack([x, x, x], axis=1)
    actual = np.stack([2 * x + 1, -x, perm], axis=1)
    c = per_test_correlations(pred, actual)
    np.testing.assert_allclose(c["spearman"], [1.0, -1.0, spearman], atol=1e-12)
    np.testing.assert_allclose(c["pearson"][:2], [1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(c["slope"][:2], [2.0, -1.0], atol=1e-12)
    expected_pearson = np.corrcoef(x, perm)[0, 1]
    np.testing.assert_allclose(c["pearson"][2], expected_pearson, atol=1e-12)


def test_constant_series_gives_nan_not_an_error():
    c = per_test_correlations(np.ones((5, 1)), np.arange(5.0)[:, None])
    assert np.isnan(c["spearman"][0])


def test_mean_with_ci_brackets_the_mean():
    values = np.random.default_rng(1).normal(0.9, 0.05, size=40)
    mean, low, high = mean_with_ci(values)
    assert low < mean < high and mean == pytest.approx(values.mean())
    assert mean_with_ci(values) == mean_with_ci(values)  # seeded


def _fake_run(cli, tmp_path, slope=2.0, extra=()):
    """A real tiny training run with hand-built scores and ground truth: actual = slope * predicted,
    the prediction written out by hand as -sum over dropped i of w0_i * scores[i, j]."""
    from magic_cli.run_dir import npy_bytes, save_artifact
    from magic_cli.stages.ground_truth import make_masks, merged_identity

    assert cli("train", *TINY, f"out_dir={tmp_path}", *extra)[0] == 0
    run = RunDir(tmp_path)
    record = json.loads(run.fingerprint_json.read_text())
    n_train, fingerprint = record["metrics"]["n_train"], record["fingerprint"]
    weights = np.ones(n_train)
    for o in extra:
        if o.startswith("train.data_weights="):
            weights = np.load(o.split("=", 1)[1])
    base = np.load(run.train_outputs("loss"))
    rng = np.random.default_rng(0)
    ids = [0, 1, 2, 3]
    scores = rng.normal(size=(n_train, len(ids)))
    save_artifact(run.scores_npy("magic"), npy_bytes(scores),
                  {"method": "magic", "test_ids": ids, "output": "loss", "seconds": 1.5, "fingerprint": fingerprint})
    masks = make_masks(n_train, 0.1, 30, seed=0)
    outputs = np.tile(base, (30, 1))
    for k, mask in enumerate(masks):
        for j, test_id in enumerate(ids):
            outputs[k, test_id] += slope * -sum(weights[i] * scores[i, j] for i in range(n_train) if not mask[i])
    save_artifact(run.ground_truth_outputs(0.1, "loss"), npy_bytes(outputs),
                  {**merged_identity(fingerprint, 0, 0.1), "num_subsets": 30})
    return run


GT30 = "ground_truth.num_subsets=30"


def test_score_writes_the_report_with_known_values(cli, tmp_path):
    run = _fake_run(cli, tmp_path)
    code, out, err = cli("score", *TINY, f"out_dir={tmp_path}", "ground_truth.drop_fractions=[0.1,0.2]", GT30)
    assert code == 0, err
    summary = json.loads((run.report_dir / "summary.json").read_text())
    s = summary["lds"]["magic"]["0.1"]
    assert s["mean"] == pytest.approx(1.0) and s["pearson"] == pytest.approx(1.0)
    assert s["slope"] == pytest.approx(2.0) and s["n_test"] == 4
    assert summary["seconds"]["magic"] == 1.5
    assert list(summary["lds"]["magic"]) == ["0.1"]  # 0.2 has no ground truth
    table = pd.read_csv(run.report_dir / "lds.csv")
    assert list(table.columns) == ["method", "drop", "test_id", "spearman", "pearson", "slope"]
    assert len(table) == 4
    for name in ("report.md", "lds_vs_drop.png", "scatter_magic_0.1.png"):
        assert (run.report_dir / name).stat().st_size > 0
    assert "magic" in out and "1.000" in out


def test_score_refuses_scores_of_another_training_run(cli, tmp_path):
    run = _fake_run(cli, tmp_path)
    side = json.loads(run.scores_json("magic").read_text())
    save_json(run.scores_json("magic"), {**side, "fingerprint": "0123456789abcdef"})
    code, _, err = cli("score", *TINY, f"out_dir={tmp_path}", "ground_truth.drop_fractions=[0.1]", GT30)
    assert code == 2 and "another training run" in err


def test_score_without_inputs_names_the_command_to_run(cli, tmp_path):
    assert cli("train", *TINY, f"out_dir={tmp_path}")[0] == 0
    code, _, err = cli("score", *TINY, f"out_dir={tmp_path}")
    assert code == 2 and "magic attribute" in err
    assert cli("attribute", "--test-ids", "0:2", *TINY, f"out_dir={tmp_path}")[0] == 0
    code, _, err = cli("score", *TINY, f"out_dir={tmp_path}")
    assert code == 2 and "magic retrain-ground-truth" in err


def test_prediction_uses_the_training_data_weights(cli, tmp_path):
    """With non-unit weights w0, dropping i changes the weights by -w0_i: the prediction is
    -sum w0_i tau_i, so the slope of actual on predicted is exactly the one built in."""
    n_train = 142  # wine: 178 examples, 36 in the test split
    w = np.random.default_rng(3).uniform(0.2, 3.0, size=n_train)
    np.save(tmp_path / "w.npy", w)
    run = _fake_run(cli, tmp_path / "run", slope=1.0, extra=[f"train.data_weights={tmp_path / 'w.npy'}"])
    code, _, err = cli("score", *TINY, f"out_dir={tmp_path / 'run'}", "ground_truth.drop_fractions=[0.1]", GT30,
                       f"train.data_weights={tmp_path / 'w.npy'}")
    assert code == 0, err
    s = json.loads((run.report_dir / "summary.json").read_text())["lds"]["magic"]["0.1"]
    assert s["slope"] == pytest.approx(1.0, rel=1e-9) and s["pearson"] == pytest.approx(1.0, rel=1e-9)


def test_predicted_change_weights_the_dropped_scores():
    scores = np.array([[1.0], [2.0], [4.0]])
    masks = np.array([[True, False, False]])
    np.testing.assert_array_equal(predicted_change(scores, masks, np.array([5.0, 0.5, 2.0])), [[-(0.5 * 2 + 2 * 4)]])

"""`magic smoothness` (the metasmoothness S), `--sweep`, and the guard rails of attribute and score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from test_faults import files_of, one_line_error

SMALL = TINY + ["smoothness.directions=2"]


def test_s_of_affine_readings_is_one_and_of_reversed_ones_minus_one():
    from magic_cli.stages.smoothness import metasmoothness

    rng = np.random.default_rng(0)
    a0, u = rng.normal(size=50), rng.normal(size=50)
    assert metasmoothness(a0, a0 + 0.5 * u, a0 + 1.0 * u, 0.5) == pytest.approx(1.0, abs=1e-12)
    assert metasmoothness(a0, a0 + u, a0 + 0.2 * u, 0.5) == pytest.approx(-1.0, abs=1e-12)  # back past the start
    half = np.where(np.arange(50) < 25, 0.5, -0.25)  # the second half-step goes back a little on half of them
    s = metasmoothness(a0, a0 + 0.5 * u, a0 + 0.5 * u + u * half, 0.5)
    first, second = np.abs(u[:25]).sum(), 0.25 * np.abs(u[25:]).sum()
    assert s == pytest.approx((first - second) / (first + second), abs=1e-12)
    assert np.isnan(metasmoothness(a0, a0, a0, 0.5))  # nothing moved


def test_one_sgd_step_is_affine_in_the_weights_so_s_over_parameters_is_one(cli, tmp_path):
    """One full-batch step of plain SGD: θ_1 = θ_0 − lr/B Σ w_i ∇ℓ_i(θ_0) is affine in w."""
    args = ["dataset=wine", "model=logreg", "optimizer=sgd", "optimizer.momentum=0", "optimizer.schedule.name=constant",
            "train.epochs=1", "train.batch_size=128", "dtype=float64", "smoothness.drop_fraction=0.5",
            "smoothness.directions=3", f"out_dir={tmp_path / 'run'}"]
    code, out, err = cli("smoothness", *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "smoothness" / "summary.json").read_text())
    assert summary["S_params"]["per_direction"] == pytest.approx([1.0] * 3, abs=1e-9)
    assert summary["verdict"] == "smooth" and "smooth:" in out


def test_smoothness_is_deterministic_resumable_and_independent_of_workers(cli, tmp_path):
    code, _, err = cli("smoothness", *SMALL, f"out_dir={tmp_path / 'a'}")
    assert code == 0, err
    code, _, err = cli("smoothness", "--workers", "2", *SMALL, f"out_dir={tmp_path / 'b'}")
    assert code == 0, err
    assert files_of(tmp_path / "a" / "smoothness") == files_of(tmp_path / "b" / "smoothness")
    (tmp_path / "a" / "smoothness" / "direction_001.npz").unlink()
    code, _, err = cli("smoothness", *SMALL, f"out_dir={tmp_path / 'a'}")
    assert code == 0, err
    summary = json.loads((tmp_path / "a" / "smoothness" / "summary.json").read_text())
    assert summary["directions_computed"] == 1  # only the missing direction was trained again
    assert files_of(tmp_path / "a" / "smoothness") == files_of(tmp_path / "b" / "smoothness")
    code, _, err = cli("smoothness", *SMALL, "smoothness.h=0.25", f"out_dir={tmp_path / 'a'}")
    assert code == 0, err  # other settings: recomputed, never reused
    assert json.loads((tmp_path / "a" / "smoothness" / "summary.json").read_text())["directions_computed"] == 2


def test_smoothness_refuses_the_run_directory_of_another_training(cli, tmp_path):
    out = f"out_dir={tmp_path / 'run'}"
    assert cli("train", *TINY, out)[0] == 0
    code, _, err = cli("smoothness", *TINY, "optimizer.lr=0.002", out)
    one_line_error(code, err, "trained with a different config")


@pytest.mark.parametrize("override, fragment", [("smoothness.h=0.7", "smoothness.h must be in (0, 0.5]"),
                                                ("smoothness.directions=0", "smoothness.directions must be >= 1")])
def test_bad_smoothness_settings_are_one_line(cli, tmp_path, override, fragment):
    code, _, err = cli("smoothness", *TINY, override, f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_sweep_parser_takes_hydra_sweep_syntax():
    from magic_cli.stages.smoothness import combinations, parse_sweep

    fixed, axes = parse_sweep(["optimizer.lr=1e-3,3e-3", "model.hidden=[8]", "seed=range(1,3)", "dataset=wine"])
    assert fixed == ["model.hidden=[8]", "dataset=wine"]
    assert axes == [("optimizer.lr", ["0.001", "0.003"]), ("seed", ["1", "2"])]
    assert combinations(axes) == [["optimizer.lr=0.001", "seed=1"], ["optimizer.lr=0.001", "seed=2"],
                                  ["optimizer.lr=0.003", "seed=1"], ["optimizer.lr=0.003", "seed=2"]]


@pytest.mark.parametrize("args, fragment", [(["optimizer.lr=1e-3,,"], "--sweep:"),
                                            (["optimizer.lr=1e-3"], "needs at least one sweep override"),
                                            (["optimizer.lr=1e-3,-1"], "optimizer.lr")])
def test_bad_sweeps_are_one_line(cli, tmp_path, args, fragment):
    code, _, err = cli("smoothness", "--sweep", *TINY, *args, f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run-sweep").exists()  # every combination is validated before anything is written


def test_pareto_front_and_recommendation():
    from magic_cli.stages.smoothness import pareto_front, recommend

    points = [(0.95, 0.2), (0.94, 0.9), (0.90, 0.95), (0.93, 0.5), (0.95, 0.1)]
    assert pareto_front(points) == [0, 1, 2]
    rows = [{"test_accuracy": a, "S_outputs": s} for a, s in points]
    assert recommend(rows) == 2  # the most accurate smooth one (S >= 0.95)
    rows[1]["S_outputs"] = 0.96
    assert recommend(rows) == 1
    rough = [{"test_accuracy": a, "S_outputs": s / 2} for a, s in points]
    assert recommend(rough) == 2  # none smooth: the smoothest


def test_sweep_writes_the_table_the_plot_and_a_recommendation(cli, tmp_path):
    code, out, err = cli("smoothness", "--sweep", *SMALL, "optimizer.lr=1e-3,3e-3", f"out_dir={tmp_path / 'run'}")
    assert code == 0, err
    folder = tmp_path / "run-sweep"
    result = json.loads((folder / "sweep.json").read_text())
    assert [r["overrides"] for r in result["rows"]] == ["optimizer.lr=0.001", "optimizer.lr=0.003"]
    assert f"recommended: {result['recommended']}" in out
    assert (folder / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "optimizer.lr" in (folder / "sweep.csv").read_text()
    for r in result["rows"]:  # each combination is the smoothness of its own run directory
        summary = json.loads((Path(r["run"]) / "smoothness" / "summary.json").read_text())
        assert summary["S_outputs"]["mean"] == r["S_outputs"] and Path(r["run"]).parent == folder


def test_attribute_records_the_adjoint_growth_and_warns_when_it_explodes(cli, tmp_path, monkeypatch):
    import magic_cli.core.metagrad

    out = f"out_dir={tmp_path / 'run'}"
    assert cli("train", *TINY, out)[0] == 0
    code, _, err = cli("attribute", "--test-ids", "0:3", *TINY, out)
    assert code == 0 and "warning" not in err, err
    side = json.loads((tmp_path / "run" / "attribute" / "magic" / "scores.json").read_text())
    assert len(side["adjoint_growth"]) == 3 and all(g >= 1.0 for g in side["adjoint_growth"])
    monkeypatch.setattr(magic_cli.core.metagrad, "GROWTH_WARN", 0.5)  # as if the adjoint had exploded
    code, _, err = cli("attribute", "--test-ids", "0:3", *TINY, out)
    assert code == 0 and "the adjoint grew" in err and "magic smoothness" in err, err
    assert cli("attribute", "--test-ids", "0:3", "--method", "grad-dot", *TINY, out)[0] == 0
    side = json.loads((tmp_path / "run" / "attribute" / "grad-dot" / "scores.json").read_text())
    assert side["adjoint_growth"] == [None] * 3  # no adjoint in a baseline


def test_score_names_the_test_ids_with_a_low_lds_and_their_slope(cli, tmp_path, monkeypatch):
    import magic_cli.stages.score

    out = f"out_dir={tmp_path / 'run'}"
    gt = ["ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=6"]
    for args in (["train"], ["attribute", "--test-ids", "0:4"], ["retrain-ground-truth"]):
        assert cli(*args, *TINY, *gt, out)[0] == 0
    monkeypatch.setattr(magic_cli.stages.score, "LOW_LDS", 1.01)  # every id is "low"
    code, stdout, err = cli("score", *TINY, *gt, out)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    low = summary["lds"]["magic"]["0.1"]["low_lds"]
    assert sorted(w["test_id"] for w in low) == [0, 1, 2, 3] and low == sorted(low, key=lambda w: w["lds"])
    assert "low LDS: magic, drop 0.1: 4 of 4 test ids have LDS < 1.01" in " ".join(err.split())
    assert "slope" in (tmp_path / "run" / "report" / "report.md").read_text()

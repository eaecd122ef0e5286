"""`magic tune`: a baseline's hyperparameters are chosen by LDS on validation ids only (the other
ids' ground truth can be destroyed without changing a single number), `attribute` then uses
them unless the command line says otherwise, and `score` leaves the validation ids out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY
from test_faults import one_line_error

import magic_cli
from magic_cli.stages import tune as tune_module
from magic_cli.stages.tune import grid_points, validation_ids

GT = ["ground_truth.drop_fractions=[0.05,0.1]", "ground_truth.num_subsets=8", "attribute.tune.n_val=6"]
GRID = ["attribute.tune.grid.ekfac.damping=[0.001,0.1,10]", "attribute.tune.grid.ekfac.relative_damping=[true]"]


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "run"
    args = [*TINY, *GT, *GRID, f"out_dir={out}"]
    cfg = magic_cli.compose(args)
    magic_cli.train(cfg)
    magic_cli.retrain_ground_truth(cfg, workers=1)
    return cfg, out, args


def test_tuning_reads_only_the_validation_ids_ground_truth(tuned_run, monkeypatch):
    cfg, out, _ = tuned_run
    result = magic_cli.tune(cfg, method="ekfac")
    n_test = magic_cli.load_run(out).metrics["n_test"]
    assert list(result.validation_ids) == validation_ids(n_test, 6, 0) and len(result.trials) == 3
    assert [t.values for t in result.trials] == grid_points({"damping": [0.001, 0.1, 10], "relative_damping": [True]})
    assert all(np.isfinite(t.lds) for t in result.trials)
    assert result.best == max(result.trials, key=lambda t: t.lds).values
    saved = json.loads((out / "tune" / "ekfac.json").read_text())
    assert saved["best"] == result.best and saved["validation_ids"] == list(result.validation_ids)

    real = tune_module.load_ground_truth
    held = set(result.validation_ids)

    def poisoned(*args, **kwargs):  # every other id's retrainings destroyed
        loaded = real(*args, **kwargs)
        if loaded is None:
            return None
        masks, outputs = loaded
        outputs = outputs.copy()
        outputs[:, [i for i in range(outputs.shape[1]) if i not in held]] = np.nan
        return masks, outputs

    monkeypatch.setattr(tune_module, "load_ground_truth", poisoned)
    again = magic_cli.tune(cfg, method="ekfac")
    assert [(t.values, t.lds, t.per_drop) for t in again.trials] == [(t.values, t.lds, t.per_drop)
                                                                      for t in result.trials]


def test_attribute_uses_the_tuned_values_unless_given_and_score_leaves_validation_out(tuned_run, cli):
    cfg, out, args = tuned_run
    best = magic_cli.tune(cfg, method="ekfac").best
    code, stdout, err = cli("attribute", "--test-ids", "0:12", "--method", "ekfac", *args)
    assert code == 0, err
    assert "with the values `magic tune` chose" in stdout + err
    settings = json.loads((out / "attribute" / "ekfac" / "scores.json").read_text())
    result = magic_cli.attribute(cfg, test_ids="0:12", method="ekfac")
    assert result.tuned == best and result.ids_computed == 0  # the same settings: nothing recomputed
    given = magic_cli.compose([*args, "attribute.ekfac.damping=0.5"])
    run = magic_cli.load_run(out)
    config, applied = tune_module.with_tuned(given, run.dir, run.record)
    assert config.attribute.ekfac.damping == 0.5 and "damping" not in applied  # the command line wins
    assert settings["test_ids"] == list(range(12))

    magic_cli.attribute(cfg, test_ids="0:12")  # MAGIC, on the same ids
    score = magic_cli.score(cfg)
    held = set(validation_ids(magic_cli.load_run(out).metrics["n_test"], 6, 0))
    reported = [i for i in range(12) if i not in held]
    assert held & set(range(12)), "the test needs a validation id among 0:12"
    for method in ("magic", "ekfac"):
        assert score.lds[method][0.05].n_test <= len(reported)
    lds = magic_cli.load_run(out).lds()
    assert set(lds.test_id) == set(reported)  # no validation id is reported
    assert score.summary["tuned"]["ekfac"] == best
    report = (out / "report" / "report.md").read_text()
    assert "left out of every method's LDS" in report
    cost = score.summary["cost"]  # the split each attribution measured: baselines have a training side
    assert cost["ekfac"]["fixed"] > 0 and cost["ekfac"]["per_id"] > 0
    assert cost["magic"]["fixed"] == 0 and cost["magic"]["per_id"] > 0
    assert (out / "report" / "lds_vs_cost.png").read_bytes().startswith(b"\x89PNG")
    assert "| ekfac |" in report and "MAGIC costs more from" in report


def test_what_cannot_be_tuned_is_one_line(tuned_run, cli):
    cfg, out, args = tuned_run
    one_line_error(*cli("tune", "--method", "magic", *args)[::2], "magic has no hyperparameter")
    one_line_error(*cli("tune", "--method", "grad-dot", *args)[::2], "grad-dot has no hyperparameter")
    one_line_error(*cli("tune", "--method", "trak", *args, "attribute.tune.grid.trak.ridge=[1]")[::2],
                   "unknown key attribute.tune.grid.trak.ridge")
    one_line_error(*cli("tune", "--method", "trak", *args, "attribute.tune.n_val=500")[::2], "attribute.tune.n_val")


def test_cost_extrapolation_and_crossover():
    from magic_cli.core.metrics import cost_of, crossover

    magic = {"fixed": 0.0, "per_id": 0.5, "batch": 4}  # passes of 4 ids, 2 s each
    trak = {"fixed": 10.0, "per_id": 0.1, "batch": None}  # one pass for any number of ids
    assert cost_of(trak, 1) == pytest.approx(10.1) and cost_of(magic, 1) == pytest.approx(2.0)
    assert cost_of(magic, 8) == pytest.approx(4.0) and cost_of(magic, 9) == pytest.approx(6.0)
    n = crossover(magic, trak)  # MAGIC 2 s per started pass of 4 against 10 s + 0.1 s per id
    assert cost_of(magic, n) > cost_of(trak, n) and all(cost_of(magic, m) <= cost_of(trak, m) for m in range(1, n))
    assert n == 25  # 7 passes (14 s) against 12.5 s
    assert crossover(magic, {"fixed": 0.0, "per_id": 0.1, "batch": None}) == 1


def test_one_validation_split_per_run_and_cluster_jobs_keep_the_submitters_values(tuned_run, cli):
    cfg, out, args = tuned_run
    magic_cli.tune(cfg, method="ekfac")
    one_line_error(*cli("tune", "--method", "ekfac", *args, "attribute.tune.seed=1")[::2],
                   "draw other validation ids", "use the same values")
    from magic_cli.stages.attribute import attribute_job

    # a cluster job gets the submitter's config, tuned values included, and computes here (never resubmits)
    run = magic_cli.load_run(out)
    submitted, applied = tune_module.with_tuned(magic_cli.compose([*args, "launcher=slurm", "attribute.method=ekfac"]),
                                                run.dir, run.record)
    assert applied  # the tuned values, which the job must keep
    assert attribute_job(str(out.parent), submitted.raw, [20, 21]) == 2
    side = json.loads((out / "attribute" / "ekfac" / "scores.json").read_text())
    assert {20, 21} <= set(side["test_ids"]) and side["options"] == {**side["options"], **applied}


@pytest.mark.parametrize("method, grid", [("ekfac", {"damping": [1e-3, 1e-2], "relative_damping": [False]}),
                                          ("source", {"segments": [1, 2], "damping": [1e-3, 1e-2]})])
def test_grid_points_share_factors_and_give_the_scores_of_a_fresh_run(monkeypatch, method, grid):
    """magic tune keeps EK-FAC's and SOURCE's states and factors across its grid (they do not
    depend on the damping): each point's scores are bit-equal to the point computed alone, and the
    factors are computed once per segment count."""
    from conftest import TINY, problem_for

    from magic_cli.config import with_values
    from magic_cli.core import baselines
    from magic_cli.core.methods import ATTRIBUTORS
    from magic_cli.stages.tune import grid_points

    problem = problem_for(TINY)
    final = problem.run()[0]
    calls = []
    real = baselines.ekfac_factors
    monkeypatch.setattr(baselines, "ekfac_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    memo = {}
    for values in grid_points(grid):
        cfg = with_values(problem.config, [f"attribute.{method}.{k}={v}" for k, v in values.items()])
        shared = ATTRIBUTORS[method].prepare(problem, final, {}, cfg, 0, memo=memo)([[0, 3]], "loss").scores[0]
        alone = ATTRIBUTORS[method].prepare(problem, final, {}, cfg, 0)([[0, 3]], "loss").scores[0]
        assert shared.tobytes() == alone.tobytes()
    # shared: once (EK-FAC), once per segment of 1 and of 2 segments (SOURCE); alone: every point again
    assert len(calls) == {"ekfac": 1 + 2, "source": (1 + 2) + (1 + 1 + 2 + 2)}[method]

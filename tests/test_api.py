"""The Python API computes: compose -> train -> attribute -> retrain_ground_truth -> score on the
default experiment (ground truth shrunk), returning typed results, and writes byte for byte what
the CLI writes for the same overrides."""

from __future__ import annotations

import dataclasses

import pytest
from test_faults import files_of

import magic_cli

# The default experiment (digits MLP), its ground truth shrunk to keep the suite fast.
DEFAULT = ["ground_truth.drop_fractions=[0.05]", "ground_truth.num_subsets=6"]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    cfg = magic_cli.compose([*DEFAULT, f"out_dir={out}"])
    results = {
        "train": magic_cli.train(cfg),
        "attribute": magic_cli.attribute(cfg, test_ids="0:6"),
        "trak": magic_cli.attribute(cfg, test_ids=[0, 1, 2, 3, 4, 5], method="trak"),
        "ground_truth": magic_cli.retrain_ground_truth(cfg),
        "score": magic_cli.score(cfg),
    }
    return out, results


def test_the_api_runs_the_default_pipeline_with_typed_results(api_run):
    out, results = api_run
    train = results["train"]
    assert isinstance(train, magic_cli.api.TrainResult) and train.status == "trained" and train.test_accuracy > 0.9
    assert train.train_dir == out / "train"
    magic, trak = results["attribute"], results["trak"]
    assert isinstance(magic, magic_cli.api.AttributeResult)
    assert (magic.method, magic.test_ids, magic.shape, magic.ids_computed) == ("magic", (0, 1, 2, 3, 4, 5),
                                                                              (1438, 6), 6)
    assert magic.scores_path == out / "attribute" / "magic" / "scores.npy" and magic.peak_states > 0
    assert (trak.method, trak.peak_states) == ("trak", 0)
    gt = results["ground_truth"]
    assert (gt.done, gt.missing, gt.merged) == (6, 0, (0.05,))
    score = results["score"]
    assert isinstance(score, magic_cli.api.ScoreResult) and set(score.lds) == {"magic", "trak"}
    assert score.lds["magic"][0.05].mean > 0.9 > score.lds["trak"][0.05].mean
    assert score.report_dir == out / "report"
    for result in results.values():  # frozen: a result is a record of what happened
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.seconds = 0  # type: ignore[misc]
    run = magic_cli.load_run(out)
    assert run.scores("magic").test_ids == [0, 1, 2, 3, 4, 5]


def test_the_cli_writes_the_same_bytes_as_the_api(api_run, cli, tmp_path):
    """The same steps through `magic`: every file equal (JSON without timings; files naming out_dir skipped)."""
    out, _ = api_run
    cli_out = tmp_path / "run"
    trak = ["attribute", "--test-ids", "0:6", "--method", "trak"]
    for command in (["train"], ["attribute", "--test-ids", "0:6"], trak, ["retrain-ground-truth"], ["score"]):
        code, _, err = cli(*command, *DEFAULT, f"out_dir={cli_out}")
        assert code == 0, err
    assert files_of(cli_out) == files_of(out)


def test_api_errors_are_user_errors(tmp_path):
    from magic_cli.errors import ConfigError, StageError

    with pytest.raises(ConfigError, match="unknown key"):
        magic_cli.compose(["optimizer.nope=1"])
    cfg = magic_cli.compose([f"out_dir={tmp_path / 'none'}"])
    with pytest.raises(StageError, match="magic train"):
        magic_cli.attribute(cfg, test_ids="0")
    with pytest.raises(ConfigError, match="attribute.method"):
        magic_cli.attribute(cfg, test_ids="0", method="nope")

"""The read API: magic_cli.load_run gives verified scores, ground truth and the LDS table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY

GT = ["ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=4"]


def test_load_run_reads_what_the_commands_wrote(cli, tmp_path):
    import magic_cli

    args = TINY + GT + [f"out_dir={tmp_path}"]
    for command in (["train"], ["attribute", "--test-ids", "0:3"], ["retrain-ground-truth"], ["score"]):
        assert cli(*command, *args)[0] == 0
    run = magic_cli.load_run(tmp_path)
    assert run.metrics["n_train"] == 142 and run.methods() == ["magic"]
    s = run.scores("magic")
    assert s.test_ids == [0, 1, 2] and s.values.shape == (142, 3) and s.output == "loss"
    np.testing.assert_array_equal(s.values, np.load(tmp_path / "attribute" / "magic" / "scores.npy"))
    assert list(s.frame.columns) == [0, 1, 2] and s.frame.shape == (142, 3)
    masks, outputs = run.ground_truth(0.1)
    assert masks.shape == (4, 142) and outputs.shape == (4, 36)
    np.testing.assert_array_equal(masks, np.load(tmp_path / "ground_truth" / "drop_0.1" / "masks.npy"))
    assert run.drop_fractions() == [0.1]
    assert len(run.lds()) == 3 and set(run.lds()["method"]) == {"magic"}
    assert run.config["dataset"]["name"] == "wine"
    assert run.train_outputs("loss").shape == (36,)


def test_load_run_refuses_damaged_or_missing_results(cli, tmp_path):
    import magic_cli
    from magic_cli.errors import StageError

    args = TINY + GT + [f"out_dir={tmp_path}"]
    assert cli("train", *args)[0] == 0
    assert cli("attribute", "--test-ids", "0:3", *args)[0] == 0
    run = magic_cli.load_run(tmp_path)
    with pytest.raises(StageError, match="no trak scores"):
        run.scores("trak")
    with pytest.raises(StageError, match="no report"):
        run.lds()
    path = tmp_path / "attribute" / "magic" / "scores.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StageError, match="scores.npy is damaged"):
        run.scores("magic")
    side = json.loads((tmp_path / "train" / "fingerprint.json").read_text())
    assert run.fingerprint == side["fingerprint"]
    with pytest.raises(StageError):
        magic_cli.load_run(tmp_path / "nothing_here")

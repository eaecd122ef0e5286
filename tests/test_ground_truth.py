"""`magic retrain-ground-truth`: masks, resumability after SIGKILL, shards and workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY

from magic_cli.stages.ground_truth import make_masks, parse_shard

GT = ["ground_truth.drop_fractions=[0.1,0.2]", "ground_truth.num_subsets=6"]


def _outputs(run_dir, p, name="loss"):
    return (run_dir / "ground_truth" / f"drop_{p:g}" / f"outputs_{name}.npy").read_bytes()


def test_masks_drop_round_pN_and_are_reproducible():
    masks = make_masks(142, 0.05, 10, seed=0)
    assert masks.dtype == bool and masks.shape == (10, 142)
    assert ((~masks).sum(1) == round(0.05 * 142)).all()
    assert np.array_equal(masks, make_masks(142, 0.05, 10, seed=0))
    assert not np.array_equal(masks, make_masks(142, 0.05, 10, seed=1))
    assert len({m.tobytes() for m in masks}) == 10


@pytest.mark.parametrize("spec, expected", [(None, (0, 1)), ("0/2", (0, 2)), ("3/4", (3, 4))])
def test_parse_shard(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["2/2", "x", "1/0", "-1/3"])
def test_parse_shard_rejects(spec):
    with pytest.raises(ValueError):
        parse_shard(spec)


def test_shards_and_workers_give_identical_results(cli, tmp_path):
    runs = {}
    for name, extra in [("plain", [[]]), ("sharded", [["--shard", "0/2"], ["--shard", "1/2"]]),
                        ("workers", [["--workers", "2"]])]:
        out = tmp_path / name
        assert cli("train", *TINY, f"out_dir={out}")[0] == 0
        for args in extra:
            code, _, err = cli("retrain-ground-truth", *TINY, *GT, f"out_dir={out}", *args)
            assert code == 0, err
        runs[name] = out
    for p in (0.1, 0.2):
        for name in ("loss", "margin"):
            reference = _outputs(runs["plain"], p, name)
            assert _outputs(runs["sharded"], p, name) == reference
            assert _outputs(runs["workers"], p, name) == reference
    merged = np.load(runs["plain"] / "ground_truth" / "drop_0.1" / "outputs_loss.npy")
    assert merged.shape == (6, 36) and merged.dtype == np.float64


def test_half_a_shard_merges_nothing(cli, tmp_path):
    assert cli("train", *TINY, f"out_dir={tmp_path}")[0] == 0
    code, out, _ = cli("retrain-ground-truth", *TINY, *GT, f"out_dir={tmp_path}", "--shard", "0/2")
    assert code == 0 and "none yet" in out
    assert not (tmp_path / "ground_truth" / "drop_0.1" / "outputs_loss.npy").exists()
    assert len(list((tmp_path / "ground_truth" / "drop_0.1").glob("subset_*.npz"))) == 3


def test_killed_run_resumes_to_the_same_result(cli, tmp_path):
    slow = TINY + ["train.epochs=40", "ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=24"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for out in (ref, killed):
        assert cli("train", *slow, f"out_dir={out}")[0] == 0
    assert cli("retrain-ground-truth", *slow, f"out_dir={ref}")[0] == 0

    cmd = [sys.executable, "-m", "magic_cli", "retrain-ground-truth", *slow, f"out_dir={killed}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = killed / "ground_truth" / "drop_0.1"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(folder.glob("subset_*.npz"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(folder.glob("subset_*.npz")))
    assert 3 <= finished < 24, "the kill must land mid-run"
    assert not (folder / "outputs_loss.npy").exists()

    code, _, err = cli("retrain-ground-truth", *slow, f"out_dir={killed}")
    assert code == 0, err
    assert _outputs(killed, 0.1) == _outputs(ref, 0.1)
    assert _outputs(killed, 0.1, "margin") == _outputs(ref, 0.1, "margin")


def test_ground_truth_before_training_is_refused(cli, tmp_path):
    code, _, err = cli("retrain-ground-truth", *TINY, f"out_dir={tmp_path}")
    assert code == 2 and "magic train" in err


def test_more_subsets_extend_the_masks(cli, tmp_path):
    assert cli("train", *TINY, f"out_dir={tmp_path}")[0] == 0
    assert cli("retrain-ground-truth", *TINY, *GT, f"out_dir={tmp_path}")[0] == 0
    more = ["ground_truth.drop_fractions=[0.1,0.2]", "ground_truth.num_subsets=8"]
    code, out, err = cli("retrain-ground-truth", *TINY, *more, f"out_dir={tmp_path}")
    assert code == 0, err
    assert "retrained 4 subsets" in out.replace("\n", " ") or "retrained 4 subsets" in err.replace("\n", " ")
    merged = np.load(tmp_path / "ground_truth" / "drop_0.1" / "outputs_loss.npy")
    assert merged.shape[0] == 8


def test_drop_fraction_that_drops_nothing_is_refused(cli, tmp_path):
    assert cli("train", *TINY, f"out_dir={tmp_path}")[0] == 0
    code, _, err = cli("retrain-ground-truth", *TINY, "ground_truth.drop_fractions=[0.001]", f"out_dir={tmp_path}")
    assert code == 2 and "drops none" in err


def test_batched_retrainings_match_one_at_a_time_and_resume_by_whole_blocks(cli, tmp_path):
    """ground_truth.batch=4 over 6 subsets: blocks {0..3}, {4..7} (6 and 7 past num_subsets are
    written too). Outputs equal one-at-a-time retraining to float64 rounding; shards and workers
    are byte-equal; a lost subset is recomputed with its block, byte for byte; another batch is
    another identity (recomputed, and `score` refuses the old merge)."""
    batch = ["ground_truth.batch=4"]
    runs = {}
    for name, extra, gt in [("one", [[]], []), ("batched", [[]], batch),
                            ("sharded", [["--shard", "0/2"], ["--shard", "1/2"]], batch),
                            ("workers", [["--workers", "2"]], batch)]:
        out = tmp_path / name
        assert cli("train", *TINY, f"out_dir={out}")[0] == 0
        for args in extra:
            code, _, err = cli("retrain-ground-truth", *TINY, *GT, *gt, f"out_dir={out}", *args)
            assert code == 0, err
        runs[name] = out
    folder = runs["batched"] / "ground_truth" / "drop_0.1"
    assert sorted(f.name for f in folder.glob("subset_*.npz")) == [f"subset_{k:05d}.npz" for k in range(8)]
    for p in (0.1, 0.2):
        a = np.load(runs["one"] / "ground_truth" / f"drop_{p:g}" / "outputs_loss.npy")
        b = np.load(runs["batched"] / "ground_truth" / f"drop_{p:g}" / "outputs_loss.npy")
        assert a.shape == b.shape == (6, 36) and np.abs(a - b).max() <= 1e-10 * np.abs(a).max()
        for name in ("sharded", "workers"):
            assert _outputs(runs[name], p) == _outputs(runs["batched"], p)
    lost = folder / "subset_00005.npz"
    before = lost.read_bytes()
    lost.unlink()
    code, _, err = cli("retrain-ground-truth", *TINY, *GT, *batch, f"out_dir={runs['batched']}")
    assert code == 0, err
    assert lost.read_bytes() == before
    assert cli("attribute", "--test-ids", "0:4", *TINY, f"out_dir={runs['batched']}")[0] == 0
    code, _, err = cli("score", *TINY, *GT, *batch, f"out_dir={runs['batched']}")
    assert code == 0, err
    code, _, err = cli("score", *TINY, *GT, f"out_dir={runs['batched']}")  # batch 1: the merge is of batch 4
    assert code == 2 and "was retrained with ground_truth.batch=4" in err, err
    code, _, err = cli("retrain-ground-truth", *TINY, *GT, f"out_dir={runs['batched']}")
    assert code == 0, err
    assert _outputs(runs["batched"], 0.1) == _outputs(runs["one"], 0.1)

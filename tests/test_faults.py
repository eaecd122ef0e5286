"""Fault injection: every way a run directory can be damaged, stale, raced or interrupted gives
either the correct result (byte-equal to an undisturbed run) or one line and exit code 2 —
never a traceback, never a wrong number.

Each case names the fault in its test id; the table in the issue note lists them all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from magic_cli.run_dir import RunDir

GT = ["ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=4"]
ARGS = TINY + GT


def one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, exactly one error line (progress bars may precede it), no traceback."""
    assert code == 2, err
    assert err.count("magic: error: ") == 1 and "Traceback" not in err, err
    assert err.rstrip("\n").splitlines()[-1].startswith("magic: error: "), err
    for fragment in fragments:
        assert fragment in err, err


# What may differ between two runs of the same thing: wall-clock timings, how many ids this
# invocation computed, and the files that name the out_dir or show timings (report.md, index.html).
VOLATILE = {"seconds", "train_seconds", "ids_computed", "directions_computed", "fixed", "cost"}
SKIP = ("metrics.json", "last_run.json", "config.yaml", "overrides.txt", "report.md", "index.html",
        "lds_vs_cost.png")  # the cost plot draws measured seconds


def _content(path: Path):
    if path.suffix != ".json":
        return path.read_bytes()

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in VOLATILE}
        return node

    return strip(json.loads(path.read_text()))


def files_of(folder: Path) -> dict:
    """{relative path: content} of every file under folder: exact bytes, JSON without timings
    (locks, temporaries and out_dir-naming files skipped)."""
    return {str(p.relative_to(folder)): _content(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name not in SKIP}


def pipeline(cli, out: Path, ids: str = "0:6", *extra) -> None:
    for args in (["train"], ["attribute", "--test-ids", ids], ["retrain-ground-truth"], ["score"]):
        code, _, err = cli(*args, *ARGS, f"out_dir={out}", *extra)
        assert code == 0, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undisturbed run: train, attribute 0:6, ground truth, score."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("reference") / "run"

    class _Capsys:  # run_cli needs readouterr(); module fixtures cannot use capsys
        def readouterr(self):
            return type("O", (), {"out": "", "err": ""})()

    for args in (["train"], ["attribute", "--test-ids", "0:6"], ["retrain-ground-truth"], ["score"]):
        assert run_cli(_Capsys(), *args, *ARGS, f"out_dir={out}") == (0, "", "")
    return out


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


DAMAGE = {"bit-flip": flip_a_bit, "truncate": truncate, "delete": lambda p: p.unlink()}
TRAIN_FILES = ["checkpoints_all/state_000005.pt", "final.pt", "outputs_loss.npy", "fingerprint.json"]


# --- damaged training artifacts: refused by name, then repaired by `train` ----------------------------

@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", TRAIN_FILES)
def test_damaged_training_file_is_refused_then_repaired(cli, reference, tmp_path, name, damage):
    run = copy_run(reference, tmp_path)
    DAMAGE[damage](run / "train" / name)
    shutil.rmtree(run / "attribute")  # make attribute read the training files again
    code, _, err = cli("attribute", "--test-ids", "0:6", *ARGS, f"out_dir={run}")
    if name == "outputs_loss.npy":  # the reverse pass does not read it; score does
        assert code == 0, err
        code, _, err = cli("score", *ARGS, f"out_dir={run}")
    expected = "no finished training run" if (name, damage) == ("fingerprint.json", "delete") else name
    one_line_error(code, err, expected)
    code, out, err = cli("train", *ARGS, f"out_dir={run}")
    assert code == 0 and "already trained" not in out, err
    assert files_of(run / "train") == files_of(reference / "train")
    pipeline(cli, run)
    assert files_of(run) == files_of(reference), "the repaired run must give the undisturbed results"


def test_train_reuses_nothing_it_cannot_verify(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    (run / "train" / "final.json").unlink()  # a write that never finished: the sidecar is missing
    code, out, err = cli("train", *ARGS, f"out_dir={run}")
    assert code == 0 and "repaired final.pt" in err, err
    code, out, _ = cli("train", *ARGS, f"out_dir={run}")
    assert code == 0 and "already trained" in out and "every file verified" in out


def test_intact_file_that_retraining_does_not_reproduce_is_refused(cli, reference, tmp_path):
    """Repair retrains; an intact file (valid digest) that the retraining does not reproduce means
    training is not deterministic here, and nothing is overwritten."""
    from magic_cli.run_dir import npy_bytes, save_artifact

    run = copy_run(reference, tmp_path)
    fingerprint = json.loads((run / "train" / "fingerprint.json").read_text())["fingerprint"]
    outputs = np.load(run / "train" / "outputs_loss.npy")
    save_artifact(run / "train" / "outputs_loss.npy", npy_bytes(outputs + 1e-9), {"fingerprint": fingerprint})
    (run / "train" / "final.pt").unlink()
    before = files_of(run / "train")
    code, _, err = cli("train", *ARGS, f"out_dir={run}")
    one_line_error(code, err, "not deterministic", "outputs_loss.npy")
    assert files_of(run / "train") == before


# --- stale results of another run are recomputed, never merged -----------------------------------------

def test_per_id_scores_of_another_run_are_recomputed(cli, reference, tmp_path):
    other = tmp_path / "other"
    assert cli("train", *ARGS, "seed=1", f"out_dir={other}")[0] == 0
    (other / "attribute").mkdir()
    shutil.copytree(reference / "attribute" / "magic", other / "attribute" / "magic")
    code, _, err = cli("attribute", "--test-ids", "0:6", *ARGS, "seed=1", f"out_dir={other}")
    assert code == 0 and "(6 computed)" in err, err
    clean = tmp_path / "clean"
    assert cli("train", *ARGS, "seed=1", f"out_dir={clean}")[0] == 0
    assert cli("attribute", "--test-ids", "0:6", *ARGS, "seed=1", f"out_dir={clean}")[0] == 0
    assert files_of(other / "attribute") == files_of(clean / "attribute")


def test_a_stale_id_file_beside_valid_ones_is_never_merged(cli, reference, tmp_path):
    """A test_<id>.npy of another run, left in the folder, is not in scores.npy."""
    run = copy_run(reference, tmp_path)
    other = tmp_path / "other"
    assert cli("train", *ARGS, "seed=1", f"out_dir={other}")[0] == 0
    assert cli("attribute", "--test-ids", "9", *ARGS, "seed=1", f"out_dir={other}")[0] == 0
    for name in ("test_9.npy", "test_9.json"):
        shutil.copy(other / "attribute" / "magic" / name, run / "attribute" / "magic" / name)
    code, _, err = cli("attribute", "--test-ids", "0:6", *ARGS, f"out_dir={run}")
    assert code == 0 and "(0 computed)" in err, err
    side = json.loads((run / "attribute" / "magic" / "scores.json").read_text())
    assert side["test_ids"] == list(range(6))
    assert cli("score", *ARGS, f"out_dir={run}")[0] == 0
    assert files_of(run / "report") == files_of(reference / "report")


@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "delete"])
def test_damaged_per_id_file_is_recomputed(cli, reference, tmp_path, damage):
    run = copy_run(reference, tmp_path)
    DAMAGE[damage](run / "attribute" / "magic" / "test_3.npy")
    code, _, err = cli("attribute", "--test-ids", "0:6", *ARGS, f"out_dir={run}")
    assert code == 0 and "(6 computed)" in err, err  # its group (all 6 ids) is recomputed whole
    assert files_of(run / "attribute") == files_of(reference / "attribute")


@pytest.mark.parametrize("damage", ["bit-flip", "truncate"])
def test_damaged_merged_scores_are_refused_by_score(cli, reference, tmp_path, damage):
    run = copy_run(reference, tmp_path)
    DAMAGE[damage](run / "attribute" / "magic" / "scores.npy")
    code, _, err = cli("score", *ARGS, f"out_dir={run}")
    one_line_error(code, err, "scores.npy is damaged", "magic attribute")
    assert cli("attribute", "--test-ids", "0:6", *ARGS, f"out_dir={run}")[0] == 0
    assert cli("score", *ARGS, f"out_dir={run}")[0] == 0
    assert files_of(run) == files_of(reference)


@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "delete"])
def test_damaged_subset_is_retrained(cli, reference, tmp_path, damage):
    run = copy_run(reference, tmp_path)
    DAMAGE[damage](run / "ground_truth" / "drop_0.1" / "subset_00002.npz")
    code, _, err = cli("retrain-ground-truth", *ARGS, f"out_dir={run}")
    assert code == 0 and "retrained 1 subsets" in err, err
    assert files_of(run / "ground_truth") == files_of(reference / "ground_truth")


def test_damaged_merged_ground_truth_is_refused_by_score(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    flip_a_bit(run / "ground_truth" / "drop_0.1" / "outputs_loss.npy")
    code, _, err = cli("score", *ARGS, f"out_dir={run}")
    one_line_error(code, err, "outputs_loss.npy is damaged", "magic retrain-ground-truth")
    assert cli("retrain-ground-truth", *ARGS, f"out_dir={run}")[0] == 0
    assert files_of(run / "ground_truth") == files_of(reference / "ground_truth")


def test_subsets_of_another_run_are_retrained(cli, reference, tmp_path):
    other = tmp_path / "other"
    assert cli("train", *ARGS, "seed=1", f"out_dir={other}")[0] == 0
    shutil.copytree(reference / "ground_truth", other / "ground_truth")
    code, _, err = cli("retrain-ground-truth", *ARGS, "seed=1", f"out_dir={other}")
    assert code == 0 and "retrained 4 subsets" in err, err
    clean = tmp_path / "clean"
    assert cli("train", *ARGS, "seed=1", f"out_dir={clean}")[0] == 0
    assert cli("retrain-ground-truth", *ARGS, "seed=1", f"out_dir={clean}")[0] == 0
    assert files_of(other / "ground_truth") == files_of(clean / "ground_truth")


def test_ground_truth_of_another_seed_is_refused(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    before = files_of(run / "ground_truth")
    code, _, err = cli("retrain-ground-truth", *ARGS, "ground_truth.seed=5", f"out_dir={run}")
    one_line_error(code, err, "ground_truth.seed=0")
    assert files_of(run / "ground_truth") == before
    code, _, err = cli("score", *ARGS, "ground_truth.seed=5", f"out_dir={run}")
    one_line_error(code, err, "seed")


# --- ground-truth settings changed after a run: masks, outputs and score stay in step ----------------

def test_more_subsets_than_retrained_says_what_to_run(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    code, _, err = cli("score", *TINY, "ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=6",
                       f"out_dir={run}")
    one_line_error(code, err, "has 4 retrainings", "ground_truth.num_subsets=6", "magic retrain-ground-truth")


def test_fewer_subsets_use_the_first_ones(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    fewer = [*TINY, "ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=3", f"out_dir={run}"]
    assert cli("score", *fewer)[0] == 0
    assert cli("retrain-ground-truth", *fewer)[0] == 0  # rewrites masks and merged outputs with 3 rows
    masks = np.load(run / "ground_truth" / "drop_0.1" / "masks.npy")
    merged = np.load(run / "ground_truth" / "drop_0.1" / "outputs_loss.npy")
    assert len(masks) == len(merged) == 3
    assert cli("score", *fewer)[0] == 0
    code, _, err = cli("score", *ARGS, f"out_dir={run}")  # back to 4: merged holds 3 rows now
    one_line_error(code, err, "has 3 retrainings", "magic retrain-ground-truth")
    assert cli("retrain-ground-truth", *ARGS, f"out_dir={run}")[0] == 0
    assert cli("score", *ARGS, f"out_dir={run}")[0] == 0
    assert files_of(run) == files_of(reference)


def test_rejected_ground_truth_writes_nothing(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    before = files_of(run)
    code, _, err = cli("retrain-ground-truth", *TINY, "ground_truth.drop_fractions=[0.1,0.001]",
                       "ground_truth.num_subsets=6", f"out_dir={run}")
    one_line_error(code, err, "drops none")
    assert files_of(run) == before


def test_a_new_drop_fraction_is_skipped_by_score_until_retrained(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    code, _, err = cli("score", *TINY, "ground_truth.drop_fractions=[0.1,0.2]", "ground_truth.num_subsets=4",
                       f"out_dir={run}")
    assert code == 0 and "no ground truth yet for drop 0.2" in err, err


# --- the run directory: marker, lock, --overwrite, leftovers ---------------------------------------

def test_out_dir_that_is_not_a_run_directory_is_never_written(cli, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("mine\n")
    (foreign / "train").mkdir()
    for extra in ([], ["--overwrite"]):
        code, _, err = cli("train", *TINY, f"out_dir={foreign}", *extra)
        one_line_error(code, err, "not a magic run directory")
    assert sorted(p.name for p in foreign.iterdir()) == ["config.yaml", "train"]
    assert (foreign / "config.yaml").read_text() == "mine\n"
    for command in (["attribute", "--test-ids", "0"], ["retrain-ground-truth"], ["score"]):
        code, _, err = cli(*command, *TINY, f"out_dir={foreign}")
        one_line_error(code, err, "not a magic run directory")
    assert sorted(p.name for p in foreign.iterdir()) == ["config.yaml", "train"]


@pytest.mark.parametrize("out_dir, fragment", [("", "out_dir must name a run folder"),
                                                (".", "out_dir must name a run folder")])
def test_empty_out_dir_is_refused(cli, tmp_path, monkeypatch, out_dir, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()
    code, _, err = cli("train", *TINY, f"out_dir={out_dir}", "--overwrite")
    one_line_error(code, err, fragment)
    assert (tmp_path / "train").is_dir()


def test_out_dir_that_is_a_file_or_under_one(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line_error(*cli("train", *TINY, f"out_dir={tmp_path / 'afile'}")[::2], "is a file")
    one_line_error(*cli("train", *TINY, f"out_dir={tmp_path / 'afile' / 'run'}")[::2], "under a file")


def test_unwritable_place_in_the_run_is_one_line(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    shutil.rmtree(run / "report")
    (run / "report").write_text("in the way")  # writing report/... fails with an OSError
    code, _, err = cli("score", *ARGS, f"out_dir={run}")
    one_line_error(code, err, "report")


def test_failed_first_training_leaves_no_folder(cli, tmp_path):
    out = tmp_path / "new" / "run"
    code, _, err = cli("train", *TINY, "optimizer.lr=10", f"out_dir={out}")
    one_line_error(code, err, "diverged", "optimizer.lr")
    assert not out.exists()


def test_train_is_refused_while_another_command_holds_the_run(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    before = files_of(run)
    with RunDir(run).lock(exclusive=False):  # as a running attribute or retrain-ground-truth does
        code, _, err = cli("train", *ARGS, "seed=1", "--overwrite", f"out_dir={run}")
        one_line_error(code, err, "another magic command is using")
    assert files_of(run) == before
    with RunDir(run).lock(exclusive=True):  # as a running train does
        for command in (["attribute", "--test-ids", "0"], ["retrain-ground-truth"], ["score"]):
            code, _, err = cli(*command, *ARGS, f"out_dir={run}")
            one_line_error(code, err, "magic train is writing")
    assert files_of(run) == before


def test_overwrite_interrupted_after_its_first_step(cli, reference, tmp_path):
    """--overwrite moves train/ away first: a kill right after leaves no finished run next to the
    old results, and the old results are never used for the new run."""
    run = copy_run(reference, tmp_path)
    (run / ".trash").mkdir()
    os.replace(run / "train", run / ".trash" / "train-killed")
    code, _, err = cli("attribute", "--test-ids", "0:6", *ARGS, f"out_dir={run}")
    one_line_error(code, err, "no finished training run")
    assert cli("train", *ARGS, "seed=1", f"out_dir={run}")[0] == 0  # the user retrains with another seed
    assert not (run / ".trash").exists()
    pipeline(cli, run, "0:6", "seed=1")
    clean = tmp_path / "clean"
    pipeline(cli, clean, "0:6", "seed=1")
    assert files_of(run) == files_of(clean)


def test_leftover_temporary_files_are_cleaned(cli, reference, tmp_path):
    import socket

    run = copy_run(reference, tmp_path)
    dead = run / "attribute" / "magic" / f".test_0.npy~{socket.gethostname()}~999999999~x.tmp"
    dead.write_bytes(b"torn")
    alive = run / "attribute" / "magic" / f".test_1.npy~{socket.gethostname()}~{os.getpid()}~x.tmp"
    alive.write_bytes(b"being written")
    assert cli("attribute", "--test-ids", "0:6", *ARGS, f"out_dir={run}")[0] == 0
    assert not dead.exists() and alive.exists()  # a shared stage removes only dead writers' files
    assert cli("train", *ARGS, f"out_dir={run}")[0] == 0
    assert not alive.exists()  # train holds the run alone: every temporary file is a leftover


# --- switching checkpoint strategy on a finished run --------------------------------------------

@pytest.mark.parametrize("strategy", [["checkpoint=sqrt"], ["checkpoint=replay", "checkpoint.k=3"]])
def test_another_checkpoint_strategy_is_derived_not_retrained(cli, reference, tmp_path, strategy):
    run = copy_run(reference, tmp_path)
    code, _, err = cli("attribute", "--test-ids", "0:6", "--overwrite", *ARGS, *strategy, f"out_dir={run}")
    assert code == 0, err
    tag = "sqrt" if strategy[0].endswith("sqrt") else "replay3"
    assert any((run / "train" / f"checkpoints_{tag}").glob("state_*.pt"))
    assert np.load(run / "attribute" / "magic" / "scores.npy").tobytes() == \
        np.load(reference / "attribute" / "magic" / "scores.npy").tobytes()
    assert files_of(run / "ground_truth") == files_of(reference / "ground_truth")  # nothing lost
    code, out, _ = cli("train", *ARGS, *strategy, f"out_dir={run}")
    assert code == 0 and "already trained" in out


# --- divergence and non-finite training ---------------------------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    (["optimizer.lr=10"], "diverged"),
    (["optimizer.lr=inf"], "optimizer.lr must be a finite number"),
    (["optimizer.lr=nan"], "optimizer.lr must be a finite number"),
])
def test_diverged_or_non_finite_training_is_refused(cli, tmp_path, overrides, fragment):
    code, _, err = cli("train", *TINY, *overrides, f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0])
def test_non_finite_or_negative_data_weights_are_refused(cli, tmp_path, value):
    w = np.ones(142)
    w[7] = value
    np.save(tmp_path / "w.npy", w)
    code, _, err = cli("train", *TINY, f"train.data_weights={tmp_path / 'w.npy'}", f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, "train.data_weights")


# --- user errors are one line; bugs keep their traceback ---------------------------------------------

@pytest.mark.parametrize("overrides, fragment", [
    (["model=transformer", "dataset=digits"], "model=transformer takes tokens"),
    (["model=mlp", "dataset=text_chars"], "model=mlp takes features or images"),
    (["model=cnn_small", "dataset=wine"], "model=cnn_small takes images"),
])
def test_model_that_cannot_take_the_data_is_one_line(cli, tmp_path, overrides, fragment):
    code, _, err = cli("train", *overrides, f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, fragment)


def test_yaml_syntax_error_names_the_users_file_and_line(cli, tmp_path):
    (tmp_path / "optimizer").mkdir()
    bad = tmp_path / "optimizer" / "mine.yaml"
    bad.write_text("name: adam\nlr: [0.5\n")
    code, _, err = cli("config", "show", "optimizer=mine", "--config-dir", str(tmp_path))
    one_line_error(code, err, f"{bad}:3:", "YAML syntax error")


def test_out_of_gpu_memory_names_the_setting_to_lower(cli, reference, tmp_path, monkeypatch):
    import torch

    import magic_cli.core.methods

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(magic_cli.core.methods, "reverse_pass", oom)
    run = copy_run(reference, tmp_path)
    code, _, err = cli("attribute", "--test-ids", "7", *ARGS, f"out_dir={run}")
    one_line_error(code, err, "out of GPU memory", "attribute.batch_size")


def test_an_internal_error_keeps_its_traceback(cli, reference, tmp_path, monkeypatch):
    import magic_cli.core.methods

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(magic_cli.core.methods, "reverse_pass", bug)
    run = copy_run(reference, tmp_path)
    with pytest.raises(ValueError, match="an internal bug"):
        cli("attribute", "--test-ids", "7", *ARGS, f"out_dir={run}")


# --- concurrent writers and kill -9 ----------------------------------------------------------------

SLOW = TINY + ["threads=1", "train.epochs=40", "ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=8",
               "attribute.batch_size=2"]


def _magic(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "magic_cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("slow") / "run"
    for args in (["train"], ["attribute", "--test-ids", "0:8"], ["retrain-ground-truth"], ["score"]):
        proc = _magic(*args, *SLOW, f"out_dir={out}")
        assert proc.wait() == 0, proc.stderr.read()
    return out


def _start_run(slow_reference: Path, out: Path, stages=("train",)) -> None:
    out.mkdir()
    for name in ("magic-run.json", "config.yaml", "overrides.txt", "meta.json"):
        shutil.copy(slow_reference / name, out / name)
    for sub in stages:
        shutil.copytree(slow_reference / sub, out / sub)


def test_two_attribute_processes_on_disjoint_ids_keep_both(slow_reference, tmp_path):
    run = tmp_path / "run"
    _start_run(slow_reference, run)
    procs = [_magic("attribute", "--test-ids", ids, *SLOW, f"out_dir={run}") for ids in ("0:4", "4:8")]
    for proc in procs:
        assert proc.wait() == 0, proc.stderr.read()
    assert json.loads((run / "attribute" / "magic" / "scores.json").read_text())["test_ids"] == list(range(8))
    assert files_of(run / "attribute") == files_of(slow_reference / "attribute")


# command, the stages it needs, the file whose appearance shows it is at work, the kill window after it
STAGES = {
    "train": (["train"], (), "train", 0.6),
    "attribute": (["attribute", "--test-ids", "0:8"], ("train",), "attribute/magic/test_0.npy", 1.5),
    "retrain-ground-truth": (["retrain-ground-truth"], ("train", "attribute"),
                             "ground_truth/drop_0.1/subset_00000.npz", 1.5),
    "score": (["score"], ("train", "attribute", "ground_truth"), "report", 0.3),
}
OUTPUT_OF = {"train": "train", "attribute": "attribute", "retrain-ground-truth": "ground_truth", "score": "report"}


def _kill_while_working(args, out: Path, sign: Path, delay: float) -> bool:
    """Start `magic ARGS`; once `sign` exists, wait `delay` s and SIGKILL it. True if it was killed
    while still running."""
    proc = _magic(*args, f"out_dir={out}")
    deadline = time.time() + 120
    while not sign.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_then_rerun_gives_the_undisturbed_result(slow_reference, tmp_path, stage, seed):
    """kill -9 of each command at a random point of its work (seeded), then the same command
    again: its results end byte-equal to an undisturbed run's."""
    command, before, sign, window = STAGES[stage]
    out = tmp_path / "run"
    _start_run(slow_reference, out, before)
    delay = random.Random(f"{stage}-{seed}").uniform(0, window)
    killed = _kill_while_working([*command, *SLOW], out, out / sign, delay)
    if stage in ("attribute", "retrain-ground-truth"):
        assert killed, "the kill must land mid-run"
    proc = _magic(*command, *SLOW, f"out_dir={out}")
    assert proc.wait() == 0, proc.stderr.read()
    for sub in [*before, OUTPUT_OF[stage]]:
        assert files_of(out / sub) == files_of(slow_reference / sub), sub
    assert not list(out.rglob("*.tmp"))


def test_damaged_marker_is_repaired_by_train(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    (run / "magic-run.json").write_text("{tor")
    code, _, err = cli("score", *ARGS, f"out_dir={run}")
    one_line_error(code, err, "magic-run.json is damaged", "magic train")
    code, out, err = cli("train", *ARGS, f"out_dir={run}")
    assert code == 0 and "already trained" in out, err
    assert cli("score", *ARGS, f"out_dir={run}")[0] == 0
    assert files_of(run) == files_of(reference)


def test_run_of_an_older_version_is_refused(cli, reference, tmp_path):
    run = copy_run(reference, tmp_path)
    (run / "magic-run.json").unlink()
    for command in (["train", "--overwrite"], ["attribute", "--test-ids", "0"]):
        code, _, err = cli(*command, *ARGS, f"out_dir={run}")
        one_line_error(code, err, "older version of magic")

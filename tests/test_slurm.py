"""launcher=slurm against a real SLURM cluster (`make test-slurm` starts a single-node one here with
scripts/slurm_local.sh; these tests are skipped where no cluster answers). Every result is
compared byte for byte with a local run of the same config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY
from test_faults import files_of

pytestmark = pytest.mark.slurm

# Each retraining takes a few seconds in its array task (import, build, 1200 steps): long enough
# for a cancel or an interrupt to land mid-run.
BASE = TINY + ["threads=1", "train.epochs=150", "ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=8",
               "attribute.batch_size=2"]
SLURM = ["launcher=slurm", "launcher.poll_s=0.5", "launcher.max_retries=2"]


def _cluster_up() -> bool:
    if not os.environ.get("SLURM_CONF"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _cluster_up():
    pytest.skip("no SLURM cluster (run `make test-slurm`)", allow_module_level=True)


def magic(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magic_cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "magic_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def running_tasks() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "_" in line]


def sacct_states() -> dict:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, interval: float = 0.1,
               polls: int = 1200) -> None:
    """Poll `condition` until it holds. A guard against a hang, not a speed check: after `polls`
    looks, or once `proc` has exited, the test fails saying what never happened."""
    for _ in range(polls):
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command exited before {what}: {proc.stderr.read()}")
        time.sleep(interval)
    pytest.fail(f"gave up waiting for {what}")


def wait_for_idle() -> None:
    wait_until(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(),
               "the cluster's queue to empty", interval=0.5, polls=240)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A trained run, its ground truth and scores computed here, one process."""
    root = tmp_path_factory.mktemp("local")
    for args in (["train"], ["retrain-ground-truth"], ["attribute", "--test-ids", "0:6"]):
        res = magic(*args, *BASE, f"out_dir={root / 'run'}", cwd=root)
        assert res.returncode == 0, res.stderr
    return root / "run"


@pytest.fixture
def trained(local, tmp_path):
    """A copy of the local run's training only (the working directory is tmp_path)."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("magic-run.json", "config.yaml", "overrides.txt", "meta.json"):
        shutil.copy(local / name, run / name)
    shutil.copytree(local / "train", run / "train")
    return run


def subset_file(run: Path, k: int) -> Path:
    return run / "ground_truth" / "drop_0.1" / f"subset_{k:05d}.npz"


def test_ground_truth_on_the_cluster_is_byte_equal_and_survives_a_cancelled_task(local, trained, tmp_path):
    wait_for_idle()
    cancelled = []

    def cancel_one():  # scancel an array task that is running and has not written its subset yet
        deadline = time.time() + 120
        while not cancelled and time.time() < deadline:
            for task in running_tasks():
                k = int(task.split("_")[1])
                if not subset_file(trained, k).exists():
                    subprocess.run(["scancel", task], check=True)
                    cancelled.append(task)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=cancel_one)
    killer.start()
    res = magic("retrain-ground-truth", *BASE, *SLURM, f"out_dir={trained}", cwd=tmp_path)
    killer.join()
    assert res.returncode == 0, res.stderr
    assert cancelled, "no task was cancelled mid-run"
    states = sacct_states()
    assert states[cancelled[0]].startswith("CANCELLED"), states
    record = json.loads((tmp_path / "slurm" / "default" / "ground_truth" / "jobs.json").read_text())
    assert len(record) == 8  # an array of 8 tasks, one block each
    block = f"drop_0.1/block_{cancelled[0].split('_')[1]}"
    assert record[block] != cancelled[0] and states[record[block]] == "COMPLETED"  # resubmitted, finished
    assert files_of(trained / "ground_truth") == files_of(local / "ground_truth")
    assert "retrained 8 subsets" in res.stderr and "on the cluster" in res.stderr


def test_interrupted_submitter_rerun_follows_its_jobs_and_redoes_nothing(local, trained, tmp_path):
    wait_for_idle()
    proc = start("retrain-ground-truth", *BASE, *SLURM, f"out_dir={trained}", cwd=tmp_path)
    wait_until(lambda: subset_file(trained, 0).exists() or subset_file(trained, 1).exists(), "a first subset", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("magic: error: interrupted;"), err
    record_path = tmp_path / "slurm" / "default" / "ground_truth" / "jobs.json"
    before = json.loads(record_path.read_text())
    finished = {k: subset_file(trained, k).stat().st_mtime_ns for k in range(8) if subset_file(trained, k).exists()}
    assert 0 < len(finished) < 8 or running_tasks()

    res = magic("retrain-ground-truth", *BASE, *SLURM, f"out_dir={trained}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    after = json.loads(record_path.read_text())
    assert after == before  # every block was finished or followed: nothing resubmitted
    assert {k: subset_file(trained, k).stat().st_mtime_ns for k in finished} == finished  # not rewritten
    assert files_of(trained / "ground_truth") == files_of(local / "ground_truth")


def test_merge_only_merges_what_jobs_finished_while_no_command_watched(local, trained, tmp_path):
    wait_for_idle()
    proc = start("retrain-ground-truth", *BASE, *SLURM, f"out_dir={trained}", cwd=tmp_path)
    record_path = tmp_path / "slurm" / "default" / "ground_truth" / "jobs.json"
    wait_until(record_path.exists, "the jobs' submission", proc, interval=0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    res = magic("retrain-ground-truth", "--merge-only", *BASE, *SLURM, f"out_dir={trained}", cwd=tmp_path)
    assert res.returncode == 0 and "still missing" in res.stderr, res.stderr  # jobs still at work
    wait_for_idle()
    before = record_path.read_text()
    res = magic("retrain-ground-truth", "--merge-only", *BASE, *SLURM, f"out_dir={trained}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "complete drop fractions: 0.1" in res.stdout and "missing" not in res.stderr
    assert record_path.read_text() == before  # nothing submitted
    assert files_of(trained / "ground_truth") == files_of(local / "ground_truth")


def test_attribution_on_the_cluster_equals_a_local_run(local, trained, tmp_path):
    wait_for_idle()
    res = magic("attribute", "--test-ids", "0:6", *BASE, *SLURM, f"out_dir={trained}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    record = json.loads((tmp_path / "slurm" / "default" / "attribute" / "jobs.json").read_text())
    assert sorted(record) == ["ids_0-1_2", "ids_2-3_2", "ids_4-5_2"]  # one task per group of batch_size ids
    assert files_of(trained / "attribute") == files_of(local / "attribute")


def test_a_task_that_always_fails_is_retried_then_named_in_one_line(trained, tmp_path):
    wait_for_idle()
    res = magic("retrain-ground-truth", *BASE, *SLURM, "launcher.max_retries=1", "ground_truth.num_subsets=2",
                "launcher.setup=[\"echo no GPU on this node >&2\", \"exit 3\"]", f"out_dir={trained}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("magic: error: 2 of 2 array tasks failed after 1 retries"), res.stderr
    assert "FAILED" in last and "no GPU on this node" in last, last
    record = json.loads((tmp_path / "slurm" / "default" / "ground_truth" / "jobs.json").read_text())
    # slurmdbd records a job's end a moment after the controller: wait for the accounting, bounded
    wait_until(lambda: all(sacct_states().get(job) == "FAILED" for job in record.values()),
               f"sacct to record jobs {sorted(record.values())} as FAILED", interval=0.5, polls=240)
    assert not list((trained / "ground_truth").rglob("subset_*.npz"))


def test_smoothness_on_the_cluster_equals_a_local_run(tmp_path):
    wait_for_idle()
    args = [*TINY, "smoothness.directions=3"]
    here = magic("smoothness", *args, f"out_dir={tmp_path / 'here'}", cwd=tmp_path)
    assert here.returncode == 0, here.stderr
    there = magic("smoothness", *args, *SLURM, f"out_dir={tmp_path / 'there'}", cwd=tmp_path)
    assert there.returncode == 0, there.stderr
    record = json.loads((tmp_path / "slurm" / "default" / "smoothness" / "jobs.json").read_text())
    assert sorted(record) == ["base", "direction_0", "direction_1", "direction_2"]  # one task each
    assert files_of(tmp_path / "there" / "smoothness") == files_of(tmp_path / "here" / "smoothness")

"""The launcher config, --merge-only, GPUs for local workers and the device each subset records
(the cluster itself: tests/test_slurm.py, `make test-slurm`)."""

from __future__ import annotations

import json
import platform

import pytest
from conftest import TINY
from test_faults import one_line_error

GT = ["ground_truth.drop_fractions=[0.1]", "ground_truth.num_subsets=4"]


def test_the_launcher_is_not_part_of_the_fingerprint():
    from magic_cli.config import load

    local = load(TINY)
    slurm = load(TINY + ["launcher=slurm", "launcher.partition=gpu", "launcher.gpus_per_task=1"])
    assert slurm.launcher.name == "slurm" and slurm.launcher.partition == "gpu"
    assert local.fingerprint() == slurm.fingerprint()


@pytest.mark.parametrize("override, fragment", [
    ("launcher.name=pbs", "launcher.name"),
    ("launcher.max_retries=-1", "launcher.max_retries must be >= 0"),
    ("launcher.time_min=0", "launcher.time_min must be >= 1"),
    ("+launcher.nodes=2", "unknown key launcher.nodes"),
])
def test_bad_launcher_settings_are_one_line(cli, tmp_path, override, fragment):
    code, _, err = cli("train", *TINY, "launcher=slurm", override, f"out_dir={tmp_path / 'run'}")
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_workers_take_the_visible_gpus_in_turn():
    from magic_cli.stages.ground_truth import device_type, worker_gpu

    assert [worker_gpu(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [worker_gpu(r, 1) for r in range(3)] == [0, 0, 0]
    assert device_type("cuda:3 NVIDIA H200") == device_type("cuda:0 NVIDIA H200") == "NVIDIA H200"
    assert device_type("cpu x86_64") == "cpu x86_64"


def test_merge_only_retrains_nothing_and_says_what_is_missing(cli, tmp_path):
    out = f"out_dir={tmp_path / 'run'}"
    assert cli("train", *TINY, *GT, out)[0] == 0
    code, stdout, err = cli("retrain-ground-truth", "--merge-only", *TINY, *GT, out)
    assert code == 0, err
    assert "4 subsets are still missing" in err and "complete drop fractions: none yet" in stdout
    assert not list((tmp_path / "run").rglob("subset_*"))


def test_score_refuses_ground_truth_of_two_device_types_unless_told(cli, tmp_path):
    out = f"out_dir={tmp_path / 'run'}"
    for args in (["train"], ["attribute", "--test-ids", "0:4"], ["retrain-ground-truth"]):
        assert cli(*args, *TINY, *GT, out)[0] == 0
    folder = tmp_path / "run" / "ground_truth" / "drop_0.1"
    side = json.loads((folder / "subset_00002.json").read_text())
    assert side["device"].startswith("cpu ")  # what each subset ran on
    side["device"] = "cuda:1 NVIDIA H200"  # as if retrained by a GPU worker
    (folder / "subset_00002.json").write_text(json.dumps(side))
    code, _, err = cli("retrain-ground-truth", *TINY, *GT, out)  # nothing to retrain: merges again
    assert code == 0 and "retrained 0 subsets" in err, err
    merged = json.loads((folder / "outputs_loss.json").read_text())
    assert merged["device_types"] == sorted(["NVIDIA H200", f"cpu {platform.machine()}"])
    code, _, err = cli("score", *TINY, *GT, out)
    one_line_error(code, err, "mixes retrainings run on", "NVIDIA H200", "--mix-devices")
    code, _, err = cli("score", "--mix-devices", *TINY, *GT, out)
    assert code == 0, err


def test_a_site_launcher_file_in_a_config_dir_fills_the_rest_with_defaults(tmp_path):
    from magic_cli.config import load

    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "mycluster.yaml").write_text(
        'name: slurm\npartition: gpu\ngpus_per_task: 1\nsetup: ["module load cuda", "source .venv/bin/activate"]\n'
        "sbatch: {constraint: a100}\n")
    lc = load(TINY + ["launcher=mycluster"], str(tmp_path)).launcher
    assert (lc.name, lc.partition, lc.gpus_per_task, lc.max_retries) == ("slurm", "gpu", 1, 2)
    assert lc.setup == ("module load cuda", "source .venv/bin/activate") and lc.sbatch == {"constraint": "a100"}


def test_a_job_that_ends_while_a_rerun_starts_is_not_submitted_again(tmp_path, monkeypatch):
    """The race behind a flaky cluster test: a rerun looked at a piece's files (not there yet),
    then sacct said its job had COMPLETED; the piece was submitted a second time. The files are
    now read after the states. The cluster is faked here; tests/test_slurm.py has the real one."""
    import submitit

    from magic_cli import launcher
    from magic_cli.config import load

    config = load(TINY + ["launcher=slurm", f"launcher.folder={tmp_path}", "launcher.poll_s=0.001"])
    folder = launcher.job_folder(config, "ground_truth")
    folder.mkdir(parents=True)
    (folder / "jobs.json").write_text(json.dumps({"block_0": "7"}))

    class EndedJob:  # what submitit.SlurmJob says of job 7: it has just completed
        watcher = type("Watcher", (), {"update": staticmethod(lambda: None)})()

        def __init__(self, folder, job_id):
            self.job_id = job_id

        def get_info(self, mode):
            return {"State": "COMPLETED"}

    class NoSubmit:
        def batch(self):
            raise AssertionError("a finished piece was submitted again")

    looks = []

    def is_done(piece):  # the job's files appear between the first look and the second
        looks.append(piece.key)
        return len(looks) > 1

    monkeypatch.setattr(submitit, "SlurmJob", EndedJob)
    monkeypatch.setattr(launcher, "_executor", lambda *a: NoSubmit())
    failed = launcher.run_pieces(config, "ground_truth", [launcher.Piece("block_0", ())], print, is_done,
                                 lambda: len(looks), 1, "retraining")
    assert failed is None and len(looks) == 2

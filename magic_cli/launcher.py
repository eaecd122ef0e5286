"""launcher=slurm: independent pieces of work as one SLURM job array, through submitit. A generic
executor: it runs a picklable function over pieces and knows no stage (each stage forms its
pieces, says when one is done, and gives the function an array task runs).

    <launcher.folder>/<run name>/<stage>/jobs.json    piece -> the job id that last took it
    <launcher.folder>/<run name>/<stage>/<job id>_*   submitit's job files and the tasks' logs

A piece (a block of ground-truth subsets, or a group of attribute.batch_size test ids) is done
when its files in the run directory are valid, whoever wrote them: each array task writes its
own files, one atomic file with its sidecar each, as a local run does. The submitting command
never reads a result back from a job (nothing is unpickled here) and never trusts an exit
state: it polls sacct for the jobs' states and the run directory for finished files. So:

- a piece whose job ended (failed, cancelled, timed out, preempted, node failure, out of
  memory) without its files is resubmitted, up to launcher.max_retries times; what still fails
  is named in one line, after everything that did finish is merged;
- an interrupted command leaves its jobs running; rerun, it follows the jobs of jobs.json that
  are still queued or running and submits only pieces that are neither done nor in flight;
- a rerun after the jobs ended submits nothing and merges (or --merge-only, which never submits).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from magic_cli.errors import ConfigError, StageError
from magic_cli.progress import no_progress
from magic_cli.run_dir import save_json

# sacct's states of a job that is still queued or running; any other state means it has ended.
SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "READY", "UNKNOWN", "")


@dataclass
class Piece:
    key: str  # a stable name, e.g. "drop_0.01/block_3": jobs.json is keyed by it
    args: tuple  # what the job's function gets, after the working directory and the config


def job_folder(config, stage: str) -> Path:
    return Path(config.launcher.folder) / config.name / stage


def _executor(config, folder: Path, stage: str):
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher=slurm needs submitit: pip install 'magic-cli[slurm]'") from None
    lc = config.launcher
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=0)
    params = {"job_name": f"magic-{config.name}-{stage}", "time": lc.time_min, "cpus_per_task": lc.cpus_per_task,
              "mem": f"{int(lc.mem_gb * 1024)}M", "array_parallelism": lc.array_parallelism,
              "setup": list(lc.setup), "additional_parameters": dict(lc.sbatch)}
    for key in ("partition", "account", "qos"):
        if getattr(lc, key) is not None:
            params[key] = getattr(lc, key)
    if lc.gpus_per_task:
        params["gpus_per_task"] = lc.gpus_per_task
    executor.update_parameters(**params)
    return executor


def _state(job) -> str:
    """sacct's state of a job, first word ('CANCELLED by 0' -> 'CANCELLED'), from the last update."""
    return (job.get_info(mode="cache").get("State") or "").split(" ")[0].upper()


def _reason(job, state: str) -> str:
    """The last line its stderr log says, for the one-line report of what failed for good."""
    try:
        lines = [line.strip() for line in Path(job.paths.stderr).read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("submitit")]
    except OSError:
        lines = []
    return f"{state}{': ' + lines[-1][:200] if lines else ''}"


def run_pieces(config, stage: str, pieces: list[Piece], fn: Callable, is_done: Callable[[Piece], bool],
               count: Callable[[], int], total: int, label: str, progress_factory=None) -> str | None:
    """Run every piece that is not done as array tasks fn(cwd, raw config, *piece.args); follow them
    until each is done or has failed launcher.max_retries + 1 times. Returns None, or one line
    saying what failed for good. `count()` is the progress (e.g. finished subsets) out of `total`."""
    import submitit
    lc = config.launcher
    folder = job_folder(config, stage)
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "jobs.json"
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except ValueError:
        record = {}  # torn: the files in the run directory still say what is done
    executor = _executor(config, folder, stage)
    cwd, raw = os.getcwd(), config.raw

    jobs = {p.key: submitit.SlurmJob(folder=folder / "%j", job_id=record[p.key])
            for p in pieces if p.key in record and not is_done(p)}
    if jobs:
        submitit.SlurmJob.watcher.update()
    jobs = {key: job for key, job in jobs.items() if _state(job) in SLURM_ACTIVE}  # still in flight: follow
    # The files are read after the states: a job that ended between a first look at its files and
    # sacct's answer has left them by now, and must not be submitted again.
    todo = [p for p in pieces if not is_done(p)]
    jobs = {p.key: jobs[p.key] for p in todo if p.key in jobs}
    by_key = {p.key: p for p in todo}
    submit = [p for p in todo if p.key not in jobs]
    attempts = {p.key: 0 for p in todo}
    failed: dict[str, str] = {}
    with (progress_factory or no_progress)(label, total) as advance:
        advance(count())
        try:
            while submit or jobs:
                if submit:
                    with executor.batch():
                        new = [(p, executor.submit(fn, cwd, raw, *p.args)) for p in submit]
                    for p, job in new:
                        jobs[p.key] = job
                        attempts[p.key] += 1
                        record[p.key] = job.job_id
                    save_json(record_path, record)
                    submit = []
                time.sleep(lc.poll_s)
                submitit.SlurmJob.watcher.update()
                for key, job in list(jobs.items()):
                    state = _state(job)
                    if state in SLURM_ACTIVE:
                        continue
                    del jobs[key]
                    if is_done(by_key[key]):
                        continue
                    if attempts[key] > lc.max_retries:
                        failed[key] = _reason(job, state)
                    else:
                        submit.append(by_key[key])
                advance(count())
        except KeyboardInterrupt:
            raise StageError(f"interrupted; {len(jobs)} array tasks are still queued or running on the cluster: "
                             "run the same command again to follow them (finished work is kept), or with "
                             f"--merge-only once they end (logs in {folder})") from None
    if not failed:
        return None
    first = next(iter(failed))
    return (f"{len(failed)} of {len(pieces)} array tasks failed after {lc.max_retries} retries "
            f"({first}: {failed[first]}); logs in {folder}; what finished is kept and merged, rerun to retry")

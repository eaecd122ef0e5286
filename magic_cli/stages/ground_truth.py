"""Ground truth by retraining: for each drop fraction p, m random masks over the N training
examples, each used as the data weights of a deterministic retraining with the run's exact
training config (same init, order and batches). Sharded, resumable, parallel.

    ground_truth/drop_<p>/masks.npy           bool (m, N): True = kept
    ground_truth/drop_<p>/subset_<k>.npz      loss, margin, correct: float64 (n_test,) of retraining k
    ground_truth/drop_<p>/outputs_<o>.npy     float64 (m, n_test), once every subset exists

Masks are a pure function of (ground_truth.seed, p, k), so every machine, shard and worker
count draws the same ones. Retrainings always run with one torch thread per process, so
results are bit-identical whatever the shard and worker count. Only the parent process
writes files, one atomic file per finished subset: a killed run loses the subsets in flight.

With ground_truth.batch = G > 1, subsets run in fixed blocks k // G of G retrainings vmapped
together in one process (train.Problem.run_batch), always whole: a block is retrained if any
of its subsets is missing (also those past num_subsets, which are written too), so a subset's
bits depend only on G. G is part of every subset's and merged file's identity.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from magic_cli.config import Config, from_dict
from magic_cli.core.groups import Groups, draw_group_mask
from magic_cli.data import load_dataset
from magic_cli.determinism import derive_seed, enable_determinism
from magic_cli.errors import ArtifactError, ConfigError, NonFiniteError, StageError
from magic_cli.launcher import Piece, run_pieces
from magic_cli.names import OUTPUTS
from magic_cli.progress import no_progress
from magic_cli.run_dir import (
    RunDir,
    load_json,
    load_npy,
    load_npz,
    npy_bytes,
    npz_bytes,
    remove_artifact,
    save_artifact,
    sha256_bytes,
    sidecar,
    status,
    valid_record,
    verify,
)
from magic_cli.stages.assemble import assemble, load_data_weights
from magic_cli.stages.groups import resolve_groups, unit_of
from magic_cli.workers import run_tasks, take_rank


def make_mask(n_train: int, p: float, k: int, seed: int, groups: Groups | None = None):
    """Mask k of drop fraction p: bool (N,), False for the round(p*N) dropped examples (with
    groups: for every member of round(p*G) dropped groups)."""
    rng = np.random.default_rng(derive_seed(seed, "mask", f"{p:g}", k))
    if groups is not None:
        return draw_group_mask(groups, p, rng)
    mask = np.ones(n_train, dtype=bool)
    mask[rng.choice(n_train, size=int(round(p * n_train)), replace=False)] = False
    return mask


def make_masks(n_train: int, p: float, m: int, seed: int, ks=None, groups: Groups | None = None):
    """Masks 0..m-1 of drop fraction p (or those of the subsets `ks`): bool (m, N)."""

    return np.stack([make_mask(n_train, p, k, seed, groups) for k in (range(m) if ks is None else ks)])


def truth_dir(config: Config, run: RunDir) -> RunDir:
    """The run seen from its ground truth: ground_truth/ and report/, or with ground_truth.groups
    their groups-<name>/ folders."""
    return run.for_unit(unit_of(config.ground_truth.groups))


def config_groups(config: Config, dataset=None) -> Groups | None:
    """The Groups of ground_truth.groups (None: single examples), for `dataset` or the config's own."""
    spec = config.ground_truth.groups
    if spec is None:
        return None
    if dataset is None:
        dataset = load_dataset(config.dataset, config.seed, getattr(torch, config.dtype))
    return resolve_groups(spec, dataset, "ground_truth.groups")


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r} must look like I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {spec!r}: need 0 <= I < N")
    return i, n


@dataclass
class Task:
    p: float
    ks: tuple  # the subsets retrained together: (k,), or a block of ground_truth.batch


# --- one retraining (runs in the parent or in a worker process) -------------------------------

_WORKER = {}  # what init_worker built in this process: problem, seed, fingerprint, device


def worker() -> dict:
    """What init_worker built in this process: {problem, seed, fingerprint, device}."""
    return _WORKER


def worker_gpu(rank: int, n_gpus: int) -> int:
    """The GPU of worker `rank` of --workers with device=cuda: round robin over the visible GPUs."""
    return rank % n_gpus


def device_name(device: str) -> str:
    """What a subset records of the device it ran on. Bit-identity holds per device type, so
    `score` refuses to mix them: the GPU's name ('cuda:1 NVIDIA H200'), or the CPU's architecture."""
    if device == "cuda":
        index = torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"cpu {platform.machine()}"


def device_type(name: str) -> str:
    """'cuda:1 NVIDIA H200' -> 'NVIDIA H200'; 'cpu x86_64' -> 'cpu x86_64' (the index does not matter)."""
    head, _, rest = name.partition(" ")
    return rest if head.startswith("cuda") else name


def init_worker(raw_config: dict, ranks=None) -> None:
    """Build the problem once per process (workers.run_tasks' initialiser); one torch thread
    (bit-identity across workers). With device=cuda, worker number r (drawn from `ranks`, a shared
    counter) runs on GPU r mod #GPUs. worker() then gives what this process built."""
    config = from_dict(raw_config)
    rank = take_rank(ranks)
    if config.device == "cuda" and rank is not None:
        torch.cuda.set_device(worker_gpu(rank, torch.cuda.device_count()))
    enable_determinism(config.device, threads=1)
    torch.set_num_threads(1)
    _WORKER["problem"] = assemble(config)
    _WORKER["groups"] = config_groups(config, _WORKER["problem"].dataset)
    _WORKER["seed"] = config.ground_truth.seed
    _WORKER["fingerprint"] = config.fingerprint()  # hashes the data-weights file as this process reads it
    _WORKER["device"] = device_name(config.device)


def _retrain(task: Task):
    """(task, [outputs of each subset of the task], fingerprint of the config this process trained
    with, the device it ran on)."""

    problem = _WORKER["problem"]
    masks = make_masks(problem.dataset.n_train, task.p, len(task.ks), _WORKER["seed"], ks=task.ks,
                       groups=_WORKER["groups"])
    weights = problem.weights * torch.as_tensor(masks, dtype=problem.dtype, device=problem.device)
    if len(task.ks) == 1:
        finals = [problem.run(weights=weights[0])[0]]
    else:
        finals = problem.run_batch(weights)
    return task, [problem.outputs(f) for f in finals], _WORKER["fingerprint"], _WORKER["device"]


# --- the stage -------------------------------------------------------------------------------




def subset_identity(fingerprint: str, seed: int, p: float, k: int, mask, batch: int = 1,
                    groups: Groups | None = None) -> dict:
    """What a subset file must carry to be retraining k of drop fraction p of this run."""

    return {"fingerprint": fingerprint, "seed": seed, "drop": f"{p:g}", "k": k,
            "mask": sha256_bytes(mask.tobytes())[:16], **_batch_key(batch), **_groups_key(groups)}


def merged_identity(fingerprint: str, seed: int, p: float, batch: int = 1, groups: Groups | None = None) -> dict:
    return {"fingerprint": fingerprint, "seed": seed, "drop": f"{p:g}", **_batch_key(batch), **_groups_key(groups)}


def _groups_key(groups: Groups | None) -> dict:
    """The group assignment in an identity, only where there is one (single-example ground truth
    keeps the identity it always had)."""
    return {} if groups is None else {"groups": groups.digest()}


def _batch_key(batch: int) -> dict:
    """ground_truth.batch in an identity (always: an absent key would match every batch)."""
    return {"batch": batch}


@dataclass(frozen=True)
class GroundTruthResult:
    """What one `magic retrain-ground-truth` did."""

    done: int  # subsets of this shard retrained now
    redone: int  # damaged or out-of-date ones among them
    merged: tuple[float, ...]  # the drop fractions whose retrainings are complete and merged
    missing: int  # subsets of this shard still to retrain
    seconds: float
    per_minute: float | None  # retrainings per minute (None: none done)
    total: int  # subsets over every drop fraction
    workers: int
    folder: Path  # ground_truth/


def ground_truth_stage(config: Config, run: RunDir, shard: str | None = None, workers: int = 1,
                       progress_factory=None, merge_only: bool = False) -> GroundTruthResult:
    """Retrain every missing subset of this shard (here, or on the cluster with launcher=slurm);
    merge each drop fraction once complete. With merge_only, retrain nothing: merge what is there.
    Everything is checked (drop fractions, seeds of earlier retrainings) before anything is written.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    index, count = parse_shard(shard)
    run = truth_dir(config, run)
    with run.lock(exclusive=False):
        run.clean(exclusive=False)
        record = run.require_trained(config)
        plan = _plan(config, run, record, index, count)
        start, n_done, failed = time.perf_counter(), 0, None
        if not merge_only:
            _prepare(config, run, plan)
            label = f"retrain (shard {index}/{count})"
            if config.launcher.name == "slurm":
                n_done, failed = retrain_on_slurm(config, run, plan, label, progress_factory)
            else:
                with (progress_factory or no_progress)(label, len(plan.write)) as advance:
                    for result in _run_tasks(config, plan.todo, workers):
                        n_done += write_subsets(config, run, plan, *result)
                        advance(n_done)
        seconds = time.perf_counter() - start
        gt = config.ground_truth
        merged = [p for p in gt.drop_fractions
                  if _merge(run, p, gt.num_subsets, plan.identities, plan.fingerprint, gt.seed, gt.batch, plan.groups)]
        missing = sum(status(run.subset(*key), plan.identities[key]) != "ok" for key in plan.write
                      if key[1] < gt.num_subsets)
    if failed:
        raise StageError(failed)
    return GroundTruthResult(done=n_done, redone=plan.redone, merged=tuple(merged), missing=missing, seconds=seconds,
                             per_minute=60 * n_done / seconds if n_done and seconds > 0 else None,
                             total=len(gt.drop_fractions) * gt.num_subsets, workers=workers,
                             folder=run.ground_truth_root)


@dataclass
class Plan:
    """What a ground-truth command must do: every subset's identity, the blocks to retrain (todo)
    and the subsets to write (write: not valid now; a block's valid subsets are retrained again
    but not rewritten)."""

    fingerprint: str
    groups: Groups | None  # ground_truth.groups resolved (None: single examples)
    masks: dict  # p -> bool (m_all, N)
    identities: dict  # (p, k) -> identity
    todo: list  # [Task]
    write: set  # {(p, k)}
    redone: int  # damaged or stale subsets among write (of the first num_subsets)


def _plan(config, run, record, index, count) -> Plan:
    gt, fingerprint = config.ground_truth, record["fingerprint"]
    n_train = int(record["metrics"]["n_train"])
    groups = config_groups(config)
    units, what = (n_train, "training examples") if groups is None else (groups.n_groups, "groups")
    for p in gt.drop_fractions:
        if round(p * units) == 0:
            raise ConfigError(f"ground_truth.drop_fractions: {p:g} of {units} {what} drops none")
    G = gt.batch
    m_all = -(-gt.num_subsets // G) * G  # whole blocks: the last one runs past num_subsets
    masks = {p: make_masks(n_train, p, m_all, gt.seed, groups=groups) for p in gt.drop_fractions}
    # a subset must keep some weight, else nothing is trained on (whole groups can drop everything)
    if config.train.data_weights is not None or groups is not None:
        kept = (load_data_weights(config.train.data_weights, n_train) > 0 if config.train.data_weights is not None
                else np.ones(n_train, dtype=bool))
        for p in gt.drop_fractions:
            empty = np.flatnonzero(~(masks[p][:gt.num_subsets] & kept).any(axis=1))
            if len(empty):
                raise ConfigError(f"ground truth: subset {empty[0]} of drop {p:g} drops every example of nonzero "
                                  "weight (train.data_weights, ground_truth.groups): nothing would be trained on; "
                                  "lower ground_truth.drop_fractions")
    identities = {(p, k): subset_identity(fingerprint, gt.seed, p, k, masks[p][k], G, groups)
                  for p in gt.drop_fractions for k in range(m_all)}
    states = {key: status(run.subset(*key), ident) for key, ident in identities.items()}
    for key, st in states.items():
        if st == "stale":
            old = load_json(sidecar(run.subset(*key)))
            if old.get("fingerprint") == fingerprint and old.get("seed") != gt.seed:
                raise StageError(f"{run.ground_truth_dir(key[0])} holds retrainings drawn with ground_truth.seed="
                                 f"{old.get('seed')}; restore that setting or delete the folder")

    # Blocks of G subsets (b = k // G), retrained whole where any of its first num_subsets is not valid;
    # block b belongs to shard b % count.
    todo = []
    for p in gt.drop_fractions:
        for b in range(m_all // G):
            ks = tuple(range(b * G, (b + 1) * G))
            if b % count == index and any(states[(p, k)] != "ok" for k in ks if k < gt.num_subsets):
                todo.append(Task(p, ks))
    write = {(t.p, k) for t in todo for k in t.ks if states[(t.p, k)] != "ok"}
    redone = sum(states[key] != "missing" for key in write if key[1] < gt.num_subsets)
    return Plan(fingerprint, groups, masks, identities, todo, write, redone)


def _prepare(config, run, plan: Plan) -> None:
    """masks.npy for the user (score redraws them); damaged or foreign subsets removed, never merged."""

    gt = config.ground_truth
    for p in gt.drop_fractions:
        meta = {**merged_identity(plan.fingerprint, gt.seed, p, gt.batch, plan.groups), "num_subsets": gt.num_subsets}
        if status(run.masks(p), meta) != "ok":
            save_artifact(run.masks(p), npy_bytes(plan.masks[p][:gt.num_subsets]), meta)
    for key in plan.write:
        if status(run.subset(*key), plan.identities[key]) != "ok":
            remove_artifact(run.subset(*key))


def write_subsets(config, run, plan: Plan, task: Task, outputs: list, fingerprint: str, device: str) -> int:
    """Write the subsets of a retrained task that the plan writes and are not valid by now (another
    process may have written them); one atomic file each. Returns how many were written."""
    if fingerprint != plan.fingerprint:
        raise StageError("the training config changed while retraining (train.data_weights edited?); "
                         "rerun `magic retrain-ground-truth`")
    written = 0
    for k, out in zip(task.ks, outputs):
        key = (task.p, k)
        if key not in plan.write or status(run.subset(*key), plan.identities[key]) == "ok":
            continue  # intact: retrained only because its block was
        if not all(np.isfinite(out[o]).all() for o in OUTPUTS):
            raise NonFiniteError(f"retraining {k} of drop fraction {task.p:g} gave NaN/Inf outputs: "
                                 "training is unstable without these examples; lower optimizer.lr")
        save_artifact(run.subset(*key), npz_bytes(**out), {**plan.identities[key], "device": device})
        written += 1
    return written


def retrain_tasks_here(config, run, tasks: list[Task]) -> int:
    """Retrain `tasks` in this process and write their subsets (a cluster job's body). Returns the
    number of subsets written."""
    run = truth_dir(config, run)
    with run.lock(exclusive=False):
        record = run.require_trained(config)
        plan = _plan(config, run, record, 0, 1)
        plan.todo = [t for t in tasks if any(key in plan.write for key in ((t.p, k) for k in t.ks))]
        return sum(write_subsets(config, run, plan, *result) for result in _run_tasks(config, plan.todo, 1))


def _merge(run, p, m, identities, fingerprint, seed, batch, groups) -> bool:
    """Write outputs_<o>.npy (m, n_test) of drop fraction p once all m subsets are valid."""
    records = [valid_record(run.subset(p, k), identities[(p, k)]) for k in range(m)]
    if any(r is None for r in records):
        return False
    meta = {**merged_identity(fingerprint, seed, p, batch, groups), "num_subsets": m,
            "subsets": sha256_bytes("".join(r["sha256"] for r in records).encode())[:16],
            "device_types": sorted({device_type(r.get("device", "")) for r in records})}
    if all(status(run.ground_truth_outputs(p, o), meta) == "ok" for o in OUTPUTS):
        return True
    subsets = [load_npz(run.subset(p, k)) for k in range(m)]
    for o in OUTPUTS:
        save_artifact(run.ground_truth_outputs(p, o), npy_bytes(np.stack([s[o] for s in subsets])), meta)
    return True


def load_ground_truth(run, config, fingerprint: str, p: float, output: str, n_train: int,
                      mix_devices: bool = False, groups: Groups | None = None):
    """(masks bool (m, N), outputs (m, n_test)) of drop fraction p, verified against the run and
    config.ground_truth; None if nothing was retrained for p; StageError saying what to run.
    Retrainings of several device types (bits agree only within one) are refused unless mix_devices."""

    gt, path = config.ground_truth, run.ground_truth_outputs(p, output)
    folder = run.ground_truth_dir(p)
    rerun = "magic retrain-ground-truth" + (f" --groups {gt.groups}" if gt.groups is not None else "")
    if not path.exists():
        if not any(folder.glob("subset_*.npz")):
            return None
        raise StageError(f"ground truth for drop {p:g} is incomplete: run `{rerun}` to finish it")
    try:
        side = verify(path, merged_identity(fingerprint, gt.seed, p, gt.batch, groups))
    except ArtifactError as e:

        old = load_json(sidecar(path)) if e.reason == "stale" else {}
        if old.get("fingerprint") == fingerprint and old.get("batch", 1) != gt.batch:
            raise StageError(f"{folder} was retrained with ground_truth.batch={old.get('batch', 1)}; pass that, or "
                             f"rerun `{rerun}` with ground_truth.batch={gt.batch}") from None
        raise StageError(f"{e}: rerun `{rerun}` to rebuild it") from None
    types = side.get("device_types", [])
    if len(types) > 1 and not mix_devices:
        raise StageError(f"{folder} mixes retrainings run on {' and '.join(types)} (bit-identity holds per device "
                         "type): retrain the subsets of one of them, or pass --mix-devices to score anyway")
    if side["num_subsets"] < gt.num_subsets:
        raise StageError(f"{folder} has {side['num_subsets']} retrainings but ground_truth.num_subsets="
                         f"{gt.num_subsets}: run `{rerun}` to add the rest")
    masks = make_masks(n_train, p, gt.num_subsets, gt.seed, groups=groups)
    return masks, load_npy(path)[:gt.num_subsets]


def _run_tasks(config, tasks: list, workers: int, fn=None):
    """fn(task) (default _retrain) for every task, as trainings finish, in processes that each
    built the problem (init_worker)."""
    return run_tasks(tasks, workers, fn or _retrain, init_worker, (config.raw,))


# --- launcher=slurm: blocks as array tasks ----------------------------------------------------

def retrain_on_slurm(config, run, plan, label: str, progress_factory=None) -> tuple[int, str | None]:
    """Ground truth: one array task per launcher.blocks_per_task blocks of plan.todo. Returns (subsets
    written, None or the line saying what failed for good)."""
    n = config.launcher.blocks_per_task
    chunks = [plan.todo[i:i + n] for i in range(0, len(plan.todo), n)]
    pieces = [Piece("+".join(f"drop_{t.p:g}/block_{t.ks[0] // len(t.ks)}" for t in chunk),
                    ([(t.p, list(t.ks)) for t in chunk],)) for chunk in chunks]
    keys = {piece.key: [(t.p, k) for t in chunk for k in t.ks if (t.p, k) in plan.write]
            for piece, chunk in zip(pieces, chunks)}

    def ok(key) -> bool:
        return status(run.subset(*key), plan.identities[key]) == "ok"

    before = sum(map(ok, plan.write))
    failed = run_pieces(config, "ground_truth", pieces, ground_truth_job, lambda piece: all(map(ok, keys[piece.key])),
                        lambda: sum(map(ok, plan.write)), len(plan.write), label, progress_factory)
    return sum(map(ok, plan.write)) - before, failed


def ground_truth_job(cwd: str, raw: dict, tasks: list) -> int:
    """The body of one array task: retrain its blocks and write their subsets."""
    os.chdir(cwd)
    config = from_dict(raw)
    return retrain_tasks_here(config, RunDir(config.out_dir), [Task(p, tuple(ks)) for p, ks in tasks])

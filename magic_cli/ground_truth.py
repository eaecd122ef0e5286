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
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def make_mask(n_train: int, p: float, k: int, seed: int):
    """Mask k of drop fraction p: bool (N,), False for the round(p*N) dropped examples."""
    import numpy as np

    from magic_cli.determinism import derive_seed

    rng = np.random.default_rng(derive_seed(seed, "mask", f"{p:g}", k))
    mask = np.ones(n_train, dtype=bool)
    mask[rng.choice(n_train, size=int(round(p * n_train)), replace=False)] = False
    return mask


def make_masks(n_train: int, p: float, m: int, seed: int):
    import numpy as np

    return np.stack([make_mask(n_train, p, k, seed) for k in range(m)])


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r} must look like I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {spec!r}: need 0 <= I < N")
    return i, n


@dataclass
class Task:
    p: float
    k: int


# --- one retraining (runs in the parent or in a worker process) -------------------------------

_WORKER = {}


def _init_worker(raw_config: dict) -> None:
    """Build the problem once per process; one torch thread (bit-identity across workers)."""
    import torch

    from magic_cli.config import from_dict
    from magic_cli.determinism import enable_determinism
    from magic_cli.train import Problem

    config = from_dict(raw_config)
    enable_determinism(config.device, threads=1)
    torch.set_num_threads(1)
    _WORKER["problem"] = Problem.build(config)
    _WORKER["seed"] = config.ground_truth.seed


def _retrain(task: Task):
    import torch

    problem = _WORKER["problem"]
    mask = make_mask(problem.dataset.n_train, task.p, task.k, _WORKER["seed"])
    weights = problem.weights * torch.as_tensor(mask, dtype=problem.dtype, device=problem.device)
    final, _, _ = problem.run(weights=weights)
    return task, problem.outputs(final)


# --- the stage -------------------------------------------------------------------------------

def ground_truth_stage(config, run, shard: str | None = None, workers: int = 1, progress_factory=None) -> dict:
    """Retrain every missing subset of this shard; merge each drop fraction once complete.

    Returns {"done": subsets of this shard retrained now,
    "merged": [p, ...] complete drop fractions, "seconds": wall time, "per_minute": rate}.
    """
    import numpy as np

    from magic_cli.progress import no_progress
    from magic_cli.run_dir import load_npy, load_npz, save_npy, save_npz

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    index, count = parse_shard(shard)
    run.require_trained(config)
    gt = config.ground_truth
    n_train = int(run_metrics(run)["n_train"])

    todo = []
    for p in gt.drop_fractions:
        if round(p * n_train) == 0:
            raise ValueError(f"ground_truth.drop_fractions: {p:g} of {n_train} training examples drops none")
        masks = make_masks(n_train, p, gt.num_subsets, gt.seed)
        old = load_npy(run.masks(p)) if run.masks(p).is_file() else None
        # Masks are a pure function of (seed, p, k): a changed num_subsets keeps the common prefix.
        common = 0 if old is None else min(len(old), len(masks))
        if old is not None and (old.shape[1:] != masks.shape[1:] or not np.array_equal(old[:common], masks[:common])):
            raise ValueError(f"{run.masks(p)} holds other masks (ground_truth.seed changed?); delete that "
                             "folder or restore the setting")
        if old is None or len(old) != len(masks):
            save_npy(run.masks(p), masks)
        todo += [Task(p, k) for k in range(gt.num_subsets)
                 if k % count == index and not run.subset(p, k).is_file()]

    start = time.perf_counter()
    with (progress_factory or no_progress)(f"retrain (shard {index}/{count})", len(todo)) as advance:
        for done, (task, outputs) in enumerate(_run_tasks(config, todo, workers)):
            save_npz(run.subset(task.p, task.k), **outputs)
            advance(done + 1)
    seconds = time.perf_counter() - start

    merged = []
    for p in gt.drop_fractions:
        files = [run.subset(p, k) for k in range(gt.num_subsets)]
        if all(f.is_file() for f in files):
            subsets = [load_npz(f) for f in files]
            for name in ("loss", "margin"):
                save_npy(run.ground_truth_outputs(p, name), np.stack([s[name] for s in subsets]))
            merged.append(p)
    return {"done": len(todo), "merged": merged, "seconds": seconds,
            "per_minute": 60 * len(todo) / seconds if todo and seconds > 0 else None,
            "total": len(gt.drop_fractions) * gt.num_subsets, "workers": workers}


def _run_tasks(config, tasks: list[Task], workers: int):
    """Yield (task, outputs) as retrainings finish; in-process for one worker."""
    if not tasks:
        return
    if workers == 1:
        import torch

        threads = torch.get_num_threads()
        _init_worker(config.raw)
        try:
            for task in tasks:
                yield _retrain(task)
        finally:
            torch.set_num_threads(threads)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(config.raw,)) as pool:
        yield from pool.imap_unordered(_retrain, tasks)


def run_metrics(run) -> dict:
    from magic_cli.run_dir import load_json

    return load_json(run.metrics_json)

"""Local worker processes: run picklable tasks on this machine, in this process (one worker) or
in a pool of spawned processes, each initialised once and limited to one torch thread, so that
results never depend on the number of workers. Knows nothing of the stages: they pass the
initialiser (which builds what a task needs, once per process) and the task function.

    for result in run_tasks(tasks, workers, fn, init, init_args): ...   # as tasks finish
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Iterator

import torch


def run_tasks(tasks: list, workers: int, fn: Callable, init: Callable, init_args: tuple = ()) -> Iterator:
    """Yield fn(task) for every task as it finishes. init(*init_args, ranks) runs once per process
    first; `ranks` is a shared counter from which a worker takes its number (e.g. its GPU), or
    None in this process."""
    if not tasks:
        return
    if workers == 1:
        threads = torch.get_num_threads()
        init(*init_args, None)
        try:
            yield from map(fn, tasks)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = mp.get_context("spawn")
    ranks = ctx.Value("i", 0)  # each worker takes the next number: its GPU with device=cuda
    with ctx.Pool(workers, initializer=init, initargs=(*init_args, ranks)) as pool:
        yield from pool.imap_unordered(fn, tasks)


def take_rank(ranks) -> int | None:
    """The next worker number from the shared counter (None in this process)."""
    if ranks is None:
        return None
    with ranks.get_lock():
        rank, ranks.value = ranks.value, ranks.value + 1
    return rank


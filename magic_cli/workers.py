"""Local worker processes: run picklable tasks on this machine, in this process (one worker) or
in a pool of spawned processes, each initialised once and limited to one torch thread, so that
results never depend on the number of workers. Knows nothing of the stages: they pass the
initialiser (which builds what a task needs, once per process) and the task function.

    for result in run_tasks(tasks, workers, fn, init, init_args): ...   # as tasks finish
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import sys
from typing import Callable, Iterator

import torch

from magic_cli.errors import StageError, UserError


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
    with _main_not_reimported():
        pool = ctx.Pool(workers, initializer=_init_or_remember, initargs=(init, *init_args, ranks))
    with pool:
        yield from pool.imap_unordered(functools.partial(_call, fn), tasks)


_INIT_ERROR: list = []  # in a worker: the exception its initialiser raised, if any


def _init_or_remember(init: Callable, *args) -> None:
    """Run the initialiser; keep what it raises instead of letting the worker die (a pool replaces
    a dead worker by a new one, which would die the same way, without end)."""
    try:
        init(*args)
    except Exception as e:  # reported by the first task this worker takes
        _INIT_ERROR.append(e)


def _call(fn: Callable, task):
    if _INIT_ERROR:
        e = _INIT_ERROR[0]
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        raise StageError(f"a worker process could not start: {message}")
    return fn(task)


@contextlib.contextmanager
def _main_not_reimported():
    """Start workers without importing the caller's main script in them. A spawned worker imports
    the parent's __main__ (by its file or module name) before it runs anything, so a script that
    calls magic_cli at its top level, as a notebook cell or a short script does, would run its
    whole pipeline again in every worker. The workers need only magic_cli's modules (the task
    and initialiser functions live there), so the main module's origin is hidden while they
    start, and restored at once."""
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    try:
        for key in saved:
            setattr(main, key, None) if key == "__spec__" else delattr(main, key)
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def take_rank(ranks) -> int | None:
    """The next worker number from the shared counter (None in this process)."""
    if ranks is None:
        return None
    with ranks.get_lock():
        rank, ranks.value = ranks.value, ranks.value + 1
    return rank


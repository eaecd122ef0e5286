"""Local worker processes (workers.py): results of every task; a worker that cannot start is one
error in the parent, not a pool that replaces dying workers without end."""

from __future__ import annotations

import pytest

from magic_cli.errors import ConfigError, StageError
from magic_cli.workers import run_tasks


def _ready(ranks) -> None:
    pass


def _cannot_start(ranks) -> None:
    raise ConfigError("dataset: no such file 'gone.npz'")


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_every_task_gives_its_result(workers):
    assert sorted(run_tasks([1, 2, 3, 4], workers, _square, _ready)) == [1, 4, 9, 16]


def test_a_worker_that_cannot_start_is_one_error():
    with pytest.raises(StageError, match="a worker process could not start: dataset: no such file 'gone.npz'"):
        list(run_tasks([1, 2, 3], 2, _square, _cannot_start))

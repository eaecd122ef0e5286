"""Rich progress bars for long loops; the library takes a factory so it never prints itself."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def rich_progress(description: str, total: int):
    """Context manager yielding advance(done): a bar with count, rate and ETA on stderr."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


@contextmanager
def no_progress(description: str, total: int):
    """The silent stand-in for rich_progress (library calls without a terminal)."""
    yield lambda done: None

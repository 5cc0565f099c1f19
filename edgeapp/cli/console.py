"""Consoles and progress bars: rich when output is a terminal, quiet otherwise or with --quiet."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def out_console() -> Console:
    return Console(soft_wrap=True)


def err_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


class NullProgress:
    """Same calls as rich's Progress, doing nothing (non-terminal output or --quiet)."""

    def add_task(self, description: str, total: float | None = None, **fields: object) -> int:
        return 0

    def update(self, task_id: int, **kwargs: object) -> None:
        pass

    def advance(self, task_id: int, advance: float = 1) -> None:
        pass


def stage_reporter(bar: Progress | NullProgress) -> Callable[[str, int, int], None]:
    """A (stage, done, total) callback for the learners: one bar per stage, added when first seen."""
    ids: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in ids:
            ids[stage] = bar.add_task(stage, total=total, info="")
        bar.update(ids[stage], completed=done, total=total)

    return report


@contextlib.contextmanager
def progress(quiet: bool = False) -> Iterator[Progress | NullProgress]:
    """A progress bar on stderr, only when stderr is a terminal and not quiet."""
    if quiet or not sys.stderr.isatty():
        yield NullProgress()
        return
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        transient=True,
    )
    with bar:
        yield bar

"""Consoles and progress bars: rich when output is a terminal, quiet otherwise or with --quiet.

Tables to a terminal wrap long values inside their column (never cut with "..."); tables to a
pipe or file are as wide as their longest value, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from edgeclip.edgeapp.cli.output import markup, stdout_is_terminal

UNLIMITED_WIDTH = 100_000  # a pipe or file: lines as long as their content


def out_console() -> Console:
    """Console on stdout: the terminal's width on a terminal, unlimited width elsewhere."""
    if stdout_is_terminal():
        return Console(soft_wrap=True)
    return Console(width=UNLIMITED_WIDTH, soft_wrap=True, color_system=None)


def err_console() -> Console:
    """Console on stderr, lines soft-wrapped."""
    return Console(stderr=True, soft_wrap=True)


def new_table(*columns: str, title: str | None = None, right: tuple[str, ...] = (), **kwargs: object) -> Table:
    """A table whose columns wrap (fold) on a narrow terminal instead of cutting values."""
    table = Table(title=title, **kwargs)  # type: ignore[arg-type]
    for name in columns:
        table.add_column(name, overflow="fold", justify="right" if name in right else "left")
    return table


class NullProgress:
    """Same calls as rich's Progress, doing nothing (non-terminal output or --quiet)."""

    def add_task(self, description: str, total: float | None = None, **fields: object) -> int:
        """Do nothing; returns task id 0."""
        return 0

    def update(self, task_id: int, **kwargs: object) -> None:
        """Do nothing."""
        pass

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Do nothing."""
        pass


class LineProgress(NullProgress):
    """Stage changes as plain lines on stderr (stderr is not a terminal, not --quiet)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def add_task(self, description: str, total: float | None = None, **fields: object) -> int:
        """Print the stage with the seconds since start on stderr; returns task id 0."""
        sys.stderr.write(f"[{time.perf_counter() - self._start:6.1f}s] {description}\n")
        sys.stderr.flush()
        return 0


def stage_reporter(bar: Progress | NullProgress) -> Callable[[str, int, int], None]:
    """A (stage, done, total) callback for the learners: one bar per stage, added when first
    seen. A stage whose total is 0 is a step of unknown length (a spinner with elapsed time)."""
    ids: dict[str, int] = {}
    open_ended: list[str] = []

    def report(stage: str, done: int, total: int) -> None:
        if stage not in ids:
            for name in open_ended:  # a new stage ends the steps of unknown length before it
                bar.update(ids[name], completed=1, total=1)
            open_ended.clear()
            ids[stage] = bar.add_task(markup(stage), total=total or None, info="")
            if not total:
                open_ended.append(stage)
        if total:
            bar.update(ids[stage], completed=done, total=total)

    return report


@contextlib.contextmanager
def progress(quiet: bool = False, lines: bool = False) -> Iterator[Progress | NullProgress]:
    """A progress bar on stderr when stderr is a terminal and not quiet; with ``lines``, stage
    names as plain lines when stderr is not a terminal (so a long step says what it does)."""
    if quiet:
        yield NullProgress()
        return
    if not sys.stderr.isatty():
        yield LineProgress() if lines else NullProgress()
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
        # rows printed to stdout while the bar runs: through the bar only when stdout is the same
        # terminal; a pipe or file must get them untouched
        redirect_stdout=stdout_is_terminal(),
        redirect_stderr=False,
    )
    with bar:
        yield bar

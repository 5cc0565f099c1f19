"""Consoles and progress bars: rich when output is a terminal, quiet otherwise or with --quiet.

Tables to a terminal wrap long values inside their column (never cut with "..."); tables to a
pipe or file are as wide as their longest value, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
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
    """Progress as plain lines on stderr, for logs and pipes (stderr is not a terminal, not --quiet).

    Each stage says something once it has run ``every`` seconds, then at least every ``every`` seconds
    while it runs (done/total, rate and ETA; a heartbeat thread speaks when the work reports nothing, e.g.
    a long training step), and one line when it completes; a command that succeeds prints at least one
    line per stage. A command that fails within ``every`` seconds prints none: its error stays one line.

        [  12.3s] classifying: 480/2992 (16%), 39.1/s, ETA 64s
        [  80.1s] classifying: 2992/2992 done in 78.9s
    """

    def __init__(self, every: float = 10.0) -> None:
        import threading

        self._start = time.perf_counter()
        self._every = every
        self._tasks: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="edgeclip-progress", daemon=True)
        self._thread.start()

    def _line(self, task: dict[str, object], text: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - self._start:7.1f}s] {text}\n")
        sys.stderr.flush()
        task["last"] = time.perf_counter()
        task["said"] = True

    def _state(self, task: dict[str, object]) -> str:
        done, total = float(task["completed"]), task["total"]  # type: ignore[arg-type]
        elapsed = time.perf_counter() - float(task["since"])  # type: ignore[arg-type]
        text = f"{task['description']}: {int(done)}"
        if total:
            text += f"/{int(total)} ({100 * done / float(total):.0f}%)"  # type: ignore[arg-type]
        if done and elapsed > 0:
            rate = done / elapsed
            text += f", {rate:.1f}/s"
            if total and float(total) > done:  # type: ignore[arg-type]
                text += f", ETA {(float(total) - done) / rate:.0f}s"  # type: ignore[arg-type]
        elif not total:
            text += f" (running for {elapsed:.0f}s)"
        return text

    def _due(self, task: dict[str, object]) -> bool:
        return time.perf_counter() - float(task["last"]) >= self._every  # type: ignore[arg-type]

    def _finish(self, task: dict[str, object]) -> None:
        task["finished"] = True
        elapsed = time.perf_counter() - float(task["since"])  # type: ignore[arg-type]
        total = task["total"]
        count = f"{int(float(total))}/{int(float(total))} " if total else ""  # type: ignore[arg-type]
        self._line(task, f"{task['description']}: {count}done in {elapsed:.1f}s")

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, max(self._every, 0.2))):
            with self._lock:
                for task in self._tasks:
                    if not task["finished"] and self._due(task):
                        self._line(task, self._state(task))

    def add_task(self, description: str, total: float | None = None, **fields: object) -> int:
        """Start a stage (said once it has run ``every`` seconds, or when it completes); returns its id."""
        with self._lock:
            now = time.perf_counter()
            self._tasks.append({"description": description.replace("\\[", "["),  # markup escapes: the bar's
                                "total": total, "completed": 0.0, "since": now, "last": now, "said": False,
                                "finished": False})
            return len(self._tasks) - 1

    def update(self, task_id: int, **kwargs: object) -> None:
        """Record ``completed``/``total``/``advance``; a line when due or when the stage completes."""
        with self._lock:
            task = self._tasks[task_id]
            if "total" in kwargs and kwargs["total"] is not None:
                task["total"] = kwargs["total"]
            if "completed" in kwargs and kwargs["completed"] is not None:
                task["completed"] = float(kwargs["completed"])  # type: ignore[arg-type]
            if "advance" in kwargs:
                task["completed"] = float(task["completed"]) + float(kwargs["advance"])  # type: ignore[arg-type]
            total = task["total"]
            if task["finished"]:
                return
            if total and float(task["completed"]) >= float(total):  # type: ignore[arg-type]
                self._finish(task)
            elif self._due(task):
                self._line(task, self._state(task))

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Advance a task by ``advance``."""
        self.update(task_id, advance=advance)

    def close(self, failed: bool = False) -> None:
        """Stop the heartbeat; after a success, a stage still open (one of unknown length) says it is done."""
        self._stop.set()
        self._thread.join(timeout=2)
        if not failed:
            with self._lock:
                for task in self._tasks:
                    if not task["finished"]:
                        self._finish(task)


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
def progress(quiet: bool = False, lines: bool = True, every: float = 10.0) -> Iterator[Progress | NullProgress]:
    """A progress bar on stderr when stderr is a terminal and not quiet; when stderr is a pipe or a
    log, plain lines (``LineProgress``: each stage, then done/total and ETA at least every ``every``
    seconds; ``lines=False``: nothing). ``$EDGECLIP_PROGRESS_EVERY`` overrides ``every`` (seconds)."""
    if quiet:
        yield NullProgress()
        return
    if not sys.stderr.isatty():
        if not lines:
            yield NullProgress()
            return
        try:
            every = float(os.environ.get("EDGECLIP_PROGRESS_EVERY", every))
        except ValueError:
            pass
        reporter = LineProgress(every)
        try:
            yield reporter
        except BaseException:
            reporter.close(failed=True)
            raise
        reporter.close()
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

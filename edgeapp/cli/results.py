"""Writers of ``edgeclip classify`` results that stream: each batch's rows are written and
flushed as soon as the batch is classified, so an interrupted run keeps what it did.

Formats (README "Output formats"):

- ``json``: JSON Lines, one object per input: ``path``, ``label``, ``task`` (the task the label
  belongs to, or ``zero-shot``), ``score``, ``route`` (where the DDAS gate sent the image),
  ``topk`` (a list of ``{label, score, task}``), ``error``, ``note`` (remarks on the decoded file).
  Paths are exact (``output.json_text``).
- ``csv``: columns ``path, label, task, score, route, error, note``, then one group per rank
  ``label_1, score_1, task_1, ..., label_K, score_K, task_K`` (empty past the label count),
  so a class name holding ``,``, ``:`` or ``;`` is never split. Text is for people
  (``output.visible``).
- ``table``: aligned columns; on a terminal long values wrap inside their column, to a pipe or
  file every value is printed whole.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Callable, Sequence, TextIO

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from edgeclip.discover import display_path
from edgeclip.edgeapp.classify import ZERO_SHOT, Prediction, shown_name
from edgeclip.edgeapp.cli.output import is_utf, json_text, markup, visible

StreamFn = Callable[[], TextIO]  # the stream to write to now (stdout may be swapped by a progress bar)


def shown_path(pred: Prediction) -> str:
    """A prediction's file name as people read it: undecodable bytes and control codes escaped."""
    return visible(display_path(pred.path))


def shown_label(pred: Prediction, ambiguous: frozenset[str] = frozenset()) -> str:
    """The label, followed by the task it belongs to when that is not the task the image was routed to
    or when several tasks learned that name (``ambiguous``, ``LabelSpace.ambiguous``: ``3 (digits8)``)."""
    qualified = shown_name(pred.label or "", pred.task, ambiguous)
    label = visible(qualified)
    if qualified == (pred.label or "") and pred.task and pred.task != pred.route:
        owner = "a zero-shot label" if pred.task == ZERO_SHOT else f"task {visible(pred.task)}"
        label += f" ({owner})"
    return label


class ResultWriter:
    """Base: ``write(batch)`` writes one batch's rows and flushes."""

    def __init__(self, stream: StreamFn) -> None:
        self._stream = stream
        self.owned: TextIO | None = None  # a file the writer opened (-o FILE): closed by close()

    def close(self) -> None:
        """Close the file the writer opened (``-o FILE``), if any."""
        if self.owned is not None:
            self.owned.close()
            self.owned = None

    def start(self) -> None:
        """Anything before the first row (a CSV header, a table title)."""

    def write(self, preds: Sequence[Prediction]) -> None:
        """Write one batch's rows and flush."""
        raise NotImplementedError

    def _emit(self, text: str) -> None:
        out = self._stream()
        out.write(text)
        out.flush()


class JsonLinesWriter(ResultWriter):
    """``--format json``: one JSON object per line and input (``\\uNNNN`` escapes where UTF-8 cannot go)."""
    def write(self, preds: Sequence[Prediction]) -> None:
        """Write one batch's rows and flush."""
        ascii_only = not is_utf(self._stream())  # \uNNNN escapes lose nothing where UTF-8 cannot go
        self._emit("".join(json_text(p.to_dict(), ascii_only) + "\n" for p in preds))


class CsvWriter(ResultWriter):
    """``--format csv``: fixed columns, then ``ranks`` groups of label, score, task."""
    def __init__(self, stream: StreamFn, ranks: int) -> None:
        super().__init__(stream)
        self.ranks = ranks

    def _rows(self, rows: list[list[str]]) -> None:
        buffer = _Collect()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerows(rows)
        self._emit(buffer.text())

    def header(self) -> list[str]:
        """The column names."""
        header = ["path", "label", "task", "score", "route", "error", "note"]
        for rank in range(1, self.ranks + 1):
            header += [f"label_{rank}", f"score_{rank}", f"task_{rank}"]
        return header

    def start(self) -> None:
        """Write the header row."""
        self._rows([self.header()])

    def write(self, preds: Sequence[Prediction]) -> None:
        """Write one batch's rows (CRLF line ends) and flush."""
        rows = []
        for p in preds:
            row = [shown_path(p), visible(p.label or ""), visible(p.task or ""),
                   "" if p.score is None else f"{p.score:.6f}", visible(p.route or ""), visible(p.error or ""),
                   visible(p.note or "")]
            for rank in range(self.ranks):
                if rank < len(p.topk):
                    t = p.topk[rank]
                    row += [visible(t["label"]), f"{t['score']:.6f}", visible(t.get("task", ""))]
                else:
                    row += ["", "", ""]
            rows.append(row)
        self._rows(rows)


class _Collect:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def text(self) -> str:
        return "".join(self.parts)


COLUMNS = ("file", "label", "score", "route", "other labels")


def _cells(p: Prediction, ambiguous: frozenset[str] = frozenset()) -> list[str]:
    if p.error:
        return [shown_path(p), "error", "", "", visible(p.error)]
    others = ", ".join(f"{visible(shown_name(t['label'], t.get('task'), ambiguous))} {t['score']:.3f}"
                       for t in p.topk[1:])
    if p.note:  # what decoding the file said (a corrupt EXIF block, ...): in the table too, not only in JSON
        others = f"{others}  (note: {visible(p.note)})" if others else f"(note: {visible(p.note)})"
    return [shown_path(p), shown_label(p, ambiguous), f"{p.score:.3f}", visible(p.route or ""), others]


class TableWriter(ResultWriter):
    """Aligned columns whose widths are fixed before the first row (every path, label and
    route is known then), so the rows of each batch line up with the first batch's.

    ``width`` None: a pipe or file, values whole. Otherwise the terminal's width: columns
    share it and long values wrap inside their column (rich). ``ambiguous``: the class names
    several tasks learned (``LabelSpace.ambiguous``), shown with their task, ``3 (digits8)``."""

    def __init__(self, stream: StreamFn, title: str, paths: Sequence[str], labels: Sequence[str],
                 routes: Sequence[str], width: int | None, ambiguous: frozenset[str] = frozenset()) -> None:
        super().__init__(stream)
        self.title = title
        self.ambiguous = ambiguous
        self.first = True
        file_w = max([cell_len(visible(display_path(p))) for p in paths] + [len("file")])
        label_w = max([cell_len(visible(n)) for n in labels] + [len("label")])
        longest_route = max([cell_len(visible(r)) for r in routes] + [len(ZERO_SHOT)])
        label_w = min(label_w + longest_route + 8, max(label_w, 40))  # room for "(task X)" mostly
        widths = [file_w, label_w, 5, longest_route, 30]
        if width is not None:
            avail = max(width - 2 * len(widths), 40)
            widths[3] = min(widths[3], 16)
            widths[1] = min(widths[1], max(12, avail // 4))
            rest = avail - widths[1] - widths[2] - widths[3]
            widths[0] = min(widths[0], max(16, rest * 3 // 5))
            widths[4] = max(10, rest - widths[0])
        self.widths = widths
        self.terminal = width is not None
        self.width = width

    def start(self) -> None:
        """Write the title line."""
        self._emit(self.title + "\n")

    def write(self, preds: Sequence[Prediction]) -> None:
        """Write one batch's rows, under the header when it is the first batch, and flush."""
        if self.terminal:
            self._write_rich(preds)
        else:
            lines = []
            if self.first:
                lines.append(self._line(list(COLUMNS)))
                lines.append(self._line(["-" * w for w in self.widths]))
            lines += [self._line(_cells(p, self.ambiguous)) for p in preds]
            self._emit("".join(line + "\n" for line in lines))
        self.first = False

    def _line(self, cells: list[str]) -> str:
        padded = [c + " " * max(0, w - cell_len(c)) for c, w in zip(cells[:-1], self.widths)]
        return "  ".join(padded + [cells[-1]]).rstrip()

    def _write_rich(self, preds: Sequence[Prediction]) -> None:
        table = Table(box=None, show_header=self.first, padding=(0, 2, 0, 0), pad_edge=False,
                      header_style="bold")
        for name, w in zip(COLUMNS, self.widths):
            table.add_column(name, width=w, overflow="fold", justify="right" if name == "score" else "left")
        for p in preds:
            cells = [markup(c) for c in _cells(p, self.ambiguous)]  # visible already; escape rich markup too
            if p.error:
                cells[1], cells[4] = "[red]error[/]", f"[red]{cells[4]}[/]"
            table.add_row(*cells)
        # Rendered to text, then written to the stream: a Console given the progress bar's stdout proxy
        # writes past it to the real terminal (rich unwraps it), so each batch's first line (the header)
        # landed on the bar's line; through the proxy the bar moves below the rows.
        console = Console(width=self.width, highlight=False, force_terminal=True)
        with console.capture() as captured:
            console.print(table)
        self._emit(captured.get())


def stdout() -> TextIO:
    """The current ``sys.stdout`` (looked up at each write: a progress bar may swap it)."""
    return sys.stdout


class ParquetWriter(ResultWriter):
    """``-o results.parquet``: the rows of ``edgeapp.rows.row_schema``, one row group per batch.

    Written to a hidden temporary file beside the target and renamed onto it by ``close`` (Ctrl-C
    included), so the target is always a complete Parquet file; a killed run leaves the previous file
    as it was. ``keep``: rows already written (``--resume``) copied first."""

    def __init__(self, target: Path, keep: object = None) -> None:
        import os
        import tempfile

        import pyarrow.parquet as pq

        from edgeclip.edgeapp.rows import row_schema

        super().__init__(stdout)
        self.target = target
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent or ".")
        os.close(fd)
        self.tmp = type(target)(tmp)
        self._writer = pq.ParquetWriter(str(self.tmp), row_schema())
        if keep is not None:
            self._writer.write_table(keep)

    def write(self, preds: Sequence[Prediction]) -> None:
        """Write one batch's rows as a row group."""
        from edgeclip.edgeapp.rows import rows_table

        if preds:
            self._writer.write_table(rows_table(preds))

    def close(self) -> None:
        """Finish the file (its footer) and rename it onto the target."""
        import os

        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self.tmp, self.target)
        super().close()

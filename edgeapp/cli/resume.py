"""``edgeclip classify --resume -o FILE``: the files a previous run already wrote to FILE, so a rerun
skips them and appends the rest (single-process and ``--ray`` alike).

- JSON Lines and CSV are appended to. A last line without its line end (the process was killed while
  writing it) is cut off first and its file classified again; any other line that is not a result row
  stops the resume with a usage error (FILE is then not a results file of this command).
- Parquet: the file's rows are read (a Parquet file is only ever complete: ``ParquetWriter`` renames it
  into place at the end) and written again ahead of the new rows.

Files are matched by name as the format records it: exactly in JSON, as shown (``display_path``,
``visible``) in CSV and Parquet.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeclip.discover import display_path
from edgeclip.edgeapp.cli.output import visible
from edgeclip.errors import UsageError


@dataclass
class Previous:
    """What FILE already holds: ``done`` (names as the format records them), ``rows`` (how many),
    ``table`` (Parquet: the rows to copy), ``cut`` (bytes of a torn last line removed)."""

    done: set[str] = field(default_factory=set)
    rows: int = 0
    table: Any = None
    cut: int = 0

    def __contains__(self, key: str) -> bool:
        return key in self.done


def key_of(path: Path | str, fmt: str) -> str:
    """How ``fmt`` records the file name ``path``."""
    if fmt == "json":
        return os.fspath(path)
    if fmt == "csv":
        return visible(display_path(path))
    return display_path(path)


def read_previous(output: Path, fmt: str, header: list[str] | None = None) -> Previous:
    """The rows already in ``output`` (absent or empty: none). JSON/CSV: cuts a torn last line off the
    file. ``header``: the CSV header this run writes (a different one, e.g. another --top-k, is refused).
    Raises UsageError when ``output`` is not a results file of ``fmt``."""
    if not output.exists() or output.stat().st_size == 0:
        return Previous()
    shown = visible(display_path(output))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(output)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise UsageError(f"Cannot resume from {shown}: not a complete Parquet file ({exc})") from exc
        if "path" not in table.column_names:
            raise UsageError(f"Cannot resume from {shown}: it has no 'path' column")
        done = {str(p) for p in table.column("path").to_pylist()}
        return Previous(done=done, rows=table.num_rows, table=table)
    end = b"\n"
    data = output.read_bytes()
    complete = data[:data.rfind(end) + 1] if end in data else b""
    cut = len(data) - len(complete)
    if cut:
        with open(output, "r+b") as f:  # the torn last line of a killed run goes; its file is done again
            f.truncate(len(complete))
    text = complete.decode("utf-8", "surrogateescape")
    previous = Previous(cut=cut)
    if fmt == "json":
        for number, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
                path = row["path"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"Cannot resume from {shown}: line {number} is not a result row") from exc
            previous.done.add(path)
            previous.rows += 1
        return previous
    rows = list(csv.reader(text.splitlines()))
    if rows and header is not None and rows[0] != header:
        raise UsageError(f"Cannot resume from {shown}: its columns differ from this run's "
                         "(another --top-k or not a classify CSV)")
    for row in rows[1:]:
        if not row:
            continue
        previous.done.add(row[0])
        previous.rows += 1
    return previous

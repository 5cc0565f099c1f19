"""Classify results as Arrow rows: the schema the Ray path returns and ``-o results.parquet`` writes.

Columns (``row_schema``): ``path`` (the file name; bytes that are not UTF-8 as ``\\xNN``, as in CSV),
``label``, ``task``, ``score`` (float64), ``route``, ``topk`` (list of ``{label, score, task}``), ``error``,
``note``, and ``embedding`` (list of float32, unit norm; null on error rows) when asked: the fields of the
CLI's JSON Lines. pyarrow is imported when used (it comes with the ``ray`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgeclip.discover import display_path
from edgeclip.edgeapp.classify import Prediction
from edgeclip.errors import MissingExtraError

if TYPE_CHECKING:
    import pyarrow as pa


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError as exc:
        raise MissingExtraError("Parquet results", "ray", "pyarrow") from exc
    return pyarrow


def row_schema(embeddings: bool = False) -> "pa.Schema":
    """The rows' Arrow schema, with the ``embedding`` column when asked."""
    pa = _pyarrow()
    topk = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64()), ("task", pa.string())]))
    fields = [("path", pa.string()), ("label", pa.string()), ("task", pa.string()), ("score", pa.float64()),
              ("route", pa.string()), ("topk", topk), ("error", pa.string()), ("note", pa.string())]
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def rows_table(preds: Sequence[Prediction], embeddings: bool = False) -> "pa.Table":
    """Predictions as a table of ``row_schema(embeddings)`` (paths shown with ``display_path``)."""
    pa = _pyarrow()
    columns: dict[str, list[Any]] = {
        "path": [display_path(p.path) for p in preds], "label": [p.label for p in preds],
        "task": [p.task for p in preds], "score": [p.score for p in preds], "route": [p.route for p in preds],
        "topk": [p.topk for p in preds], "error": [p.error for p in preds], "note": [p.note for p in preds]}
    if embeddings:
        columns["embedding"] = [None if p.embedding is None else p.embedding.tolist() for p in preds]
    return pa.Table.from_pydict(columns, schema=row_schema(embeddings))


def predictions_of(table: "pa.Table") -> list[Prediction]:
    """Rows of ``row_schema`` back as Predictions (``embedding`` kept when the table has the column)."""
    out = []
    has_embedding = "embedding" in table.column_names
    for row in table.to_pylist():
        pred = Prediction(path=row["path"], label=row["label"], score=row["score"], route=row["route"],
                          topk=list(row["topk"] or []), error=row["error"], note=row["note"], task=row["task"])
        if has_embedding and row["embedding"] is not None:
            pred.embedding = np.asarray(row["embedding"], np.float32)
        out.append(pred)
    return out

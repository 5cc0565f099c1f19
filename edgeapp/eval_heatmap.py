"""The accuracy matrix of a protocol as a PNG heat map (Pillow only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeclip.edgeapp.eval_summary import ProtocolResult


# --------------------------------------------------------------------------- heatmap


# viridis at 0, 1/8, ..., 1 (matplotlib's values): readable in grey-scale and by colour-blind readers
_VIRIDIS = np.array([(68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140), (39, 173, 129),
                     (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)


def _colour(value: float) -> tuple[int, int, int]:
    """Viridis colour of an accuracy in percent (0 dark purple ... 100 yellow)."""
    t = max(0.0, min(100.0, value)) / 100.0 * (len(_VIRIDIS) - 1)
    lo = int(np.floor(t))
    hi = min(lo + 1, len(_VIRIDIS) - 1)
    rgb = _VIRIDIS[lo] + (_VIRIDIS[hi] - _VIRIDIS[lo]) * (t - lo)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def _fit(draw: Any, text: str, font: Any, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def write_heatmap(result: ProtocolResult, path: Path, title: str = "") -> Path:
    """A PNG of the accuracy matrix, Pillow only: a zero-shot row (before any step), one row per
    learning step, then Transfer / Average / Last per domain; a mean column; a value in every
    cell; viridis colours on a fixed 0-100 % scale with its colour bar; the cell of the step
    that learned each domain framed. Sized to read without zooming (about 100 px per cell)."""
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(result.matrix, dtype=np.float64)
    steps, n = matrix.shape
    metrics = result.metrics()
    per = metrics["per_domain"]
    rows: list[tuple[str, list[float | None], float | None]] = [("zero-shot (before step 1)", list(result.zero_shot),
                                                                 float(np.mean(result.zero_shot)))]
    rows += [(f"after {i + 1}: {result.domains[i]}", [float(v) for v in matrix[i]], float(matrix[i].mean()))
             for i in range(steps)]
    first_metric = len(rows)
    rows += [("Transfer", per["transfer"], metrics["transfer"]), ("Average", per["average"], metrics["average"]),
             ("Last", per["last"], metrics["last"])]

    font = ImageFont.load_default(size=17)
    small = ImageFont.load_default(size=14)
    bold = ImageFont.load_default(size=20)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    longest = max(measure.textlength(name, font=font) for name in result.domains)
    cell_w, cell_h, gap = int(min(max(104, longest + 16), 180)), 42, 14
    left = 250
    top = 110
    bar_x = left + cell_w * (n + 1) + 40
    width = max(bar_x + 110, 640)
    height = top + cell_h * len(rows) + gap + 96
    title = title or f"{result.protocol.upper()} ({result.gate}) accuracy %"
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    # the title, wrapped to the figure's width
    words, lines, line = title.split(), [], ""
    for word in words:
        if line and draw.textlength(f"{line} {word}", font=bold) > width - 30:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for k, text in enumerate(lines[:2]):
        draw.text((15, 10 + 26 * k), text, fill="black", font=bold)
    headers = list(result.domains) + ["mean"]
    for j, name in enumerate(headers):
        x = left + j * cell_w
        draw.text((x + cell_w / 2, top - 12), _fit(draw, name, font, cell_w - 6), fill="black", font=font, anchor="ms")
    for r, (label, values, mean) in enumerate(rows):
        y = top + r * cell_h + (gap if r >= first_metric else 0)
        draw.text((left - 10, y + cell_h / 2), _fit(draw, label, font, left - 20), fill="black", font=font, anchor="rm")
        for j, v in enumerate(list(values) + [mean]):
            box = [left + j * cell_w, y, left + (j + 1) * cell_w - 3, y + cell_h - 3]
            if v is None:  # Transfer of the first domain: nothing was learned before it
                draw.rectangle(box, fill=(235, 235, 235))
                draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "n/a", fill=(110, 110, 110), font=font, anchor="mm")
                continue
            draw.rectangle(box, fill=_colour(v))
            ink = "white" if v < 60 else "black"
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"{v:.1f}", fill=ink, font=font, anchor="mm")
            if 1 <= r <= steps and j == r - 1:  # the step that learned this column's domain
                draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], outline=(220, 30, 30), width=3)
    # the colour scale
    bar_top, bar_h = top, cell_h * len(rows) + gap - 3
    for k in range(bar_h):
        draw.line([(bar_x, bar_top + k), (bar_x + 22, bar_top + k)], fill=_colour(100.0 * (1 - k / (bar_h - 1))))
    draw.rectangle([bar_x, bar_top, bar_x + 22, bar_top + bar_h], outline="black")
    for tick in (0, 25, 50, 75, 100):
        y = bar_top + (1 - tick / 100) * bar_h
        draw.line([(bar_x + 22, y), (bar_x + 28, y)], fill="black")
        draw.text((bar_x + 32, y), f"{tick}%", fill="black", font=small, anchor="lm")
    draw.text((bar_x, bar_top - 22), "accuracy", fill="black", font=small, anchor="ls")
    notes = ("Red frame: the step that learned the column's domain.",
             "Transfer: accuracy on a domain before it is learned (mean over earlier steps).",
             "Average: mean over all steps. Last: after the final step.")
    for k, note in enumerate(notes):
        draw.text((15, height - 76 + 22 * k), _fit(draw, note, small, width - 30), fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path

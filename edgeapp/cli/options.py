"""Options shared by several commands, defined once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeclip.bundle import Bundle
from edgeclip.models import DEFAULT_BUNDLE_DIR

BUNDLE_ENV = "EDGECLIP_BUNDLE"
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt")


def _check_backend(value: str) -> str:
    if value not in BACKENDS:
        raise typer.BadParameter(f"expected one of {', '.join(BACKENDS)}, got '{value}'")
    return value


BundleOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--bundle",
        "-b",
        help=f"Model bundle folder. Default: ${BUNDLE_ENV}, else {DEFAULT_BUNDLE_DIR}.",
        show_default=False,
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(help="Inference backend: auto, ort-cpu, ort-cuda, ort-trt (onnxruntime's TensorRT provider) or tensorrt.", callback=_check_backend),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries.")]


def bundle_path(value: Path | None) -> Path:
    """--bundle, else $EDGECLIP_BUNDLE, else models/bundles/default."""
    if value is not None:
        return value
    env = os.environ.get(BUNDLE_ENV)
    return Path(env) if env else DEFAULT_BUNDLE_DIR


def open_bundle(value: Path | None) -> Bundle:
    return Bundle.open(bundle_path(value))

"""Options shared by several commands, defined once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeclip.bundle import Bundle
from edgeclip.discover import display_path
from edgeclip.errors import UsageError
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
CacheOpt = Annotated[bool, typer.Option(
    "--cache/--no-cache",
    help="Read and store the images' frozen embeddings in the embedding cache (the user's cache folder, "
         "$EDGECLIP_CACHE_DIR; `edgeclip cache info`). --no-cache computes the same results without it.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries.")]


def bundle_path(value: Path | None) -> Path:
    """--bundle, else $EDGECLIP_BUNDLE, else models/bundles/default."""
    if value is not None:
        return value
    env = os.environ.get(BUNDLE_ENV)
    return Path(env) if env else DEFAULT_BUNDLE_DIR


def require_bundle(root: Path) -> Path:
    """``root`` when it holds a bundle; UsageError (exit 2) when nothing there is a bundle.
    A bundle that is there but damaged stays a BundleError (exit 1)."""
    from edgeclip.bundle import CURRENT

    if not (root / CURRENT).is_file():
        what = "does not exist" if not root.exists() else "is not an edgeclip bundle"
        raise UsageError(f"--bundle {display_path(root)} {what}: expected a bundle folder made by "
                         f"'edgeclip init --bundle {display_path(root)} ...' (or set ${BUNDLE_ENV})")
    return root


def open_bundle(value: Path | None) -> Bundle:
    """The bundle named by --bundle / $EDGECLIP_BUNDLE / the default; UsageError when there is none."""
    return Bundle.open(require_bundle(bundle_path(value)))


def cache_note(scorer: object) -> str:
    """' (embedding cache off: why)' when the cache was turned off during the run, else ''."""
    why = getattr(getattr(scorer, "cache", None), "disabled", None)
    return f" (embedding cache off: {why})" if why else ""

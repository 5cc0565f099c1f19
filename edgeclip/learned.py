"""The learned tensors of a version, read and written as one dict, stored in two kinds of file:
``learned.safetensors`` (what changes with every task: rewritten by each add-task) and, for each tensor
that never changes once the bundle exists, a file of its own (`STORED_ONCE`) that later versions inherit
by hard link, so it is stored once: RAIL primal's random projection ``rail.w_r`` (ViT-B/16 at hidden
15000: 30.7 MB). The gated graph keeps it in a shared external-data file of the graph store likewise.

Bundles of an older edgeclip, whose ``learned.safetensors`` still holds ``rail.w_r``, read as before;
their next write moves it to its own file.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgeclip.layout import LEARNED, RAIL_PROJECTION, rail_key

STORED_ONCE = {rail_key("w_r"): RAIL_PROJECTION}  # learned tensor -> the file it lives in alone


def read_learned(bundle: Any, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The version's learned tensors (all, or ``keys``) as one dict, wherever each is stored.
    ``bundle``: an ``edgeclip.bundle.Bundle``. Raises BundleError as ``Bundle.tensors``."""
    once = {key: name for key, name in STORED_ONCE.items() if bundle.has(name) and (keys is None or key in keys)}
    rest = None if keys is None else [k for k in keys if k not in once]
    out = dict(bundle.tensors(LEARNED, keys=rest)) if rest is None or rest else {}
    for key, name in once.items():
        out[key] = bundle.tensors(name, keys=[key])[key]
    return out


def write_learned(writer: Any, learned: dict[str, np.ndarray]) -> None:
    """Write a version's learned tensors (``writer``: an ``edgeclip.bundle.VersionWriter``): the
    `STORED_ONCE` ones to their own file only when the version does not inherit it already (at init,
    or the first write to a bundle of an older edgeclip), the rest to ``learned.safetensors``."""
    for key, name in STORED_ONCE.items():
        if key in learned and not writer.has(name):
            writer.write_tensors(name, {key: learned[key]})
    writer.write_tensors(LEARNED, {k: v for k, v in learned.items() if k not in STORED_ONCE})

"""``verify_bundle`` (``edgeclip verify``): hash and check every file of every version."""

from __future__ import annotations

import os
from pathlib import Path

from edgeclip.errors import BundleError
from edgeclip.store.reader import Bundle, current_version, list_versions


def verify_bundle(root: Path | str, versions: list[str] | None = None) -> list[tuple[str, str]]:
    """Hash and check every file of every (or the given) version (``Bundle.verify``). Returns
    (version, problem) pairs; empty when all is intact. Each version is leased while it is checked, so
    a concurrent prune cannot remove it mid-check; a version a prune removed before it was reached is
    no longer part of the bundle and is skipped, not reported."""
    root = Path(root)
    problems = []
    try:
        current_version(root)  # CURRENT must name a complete version
    except BundleError as exc:
        problems.append(("CURRENT", str(exc)))
    for name in versions or list_versions(root):
        try:
            bundle = Bundle.open(root, name)
        except BundleError as exc:
            if not os.path.lexists(root / "versions" / name) and not versions:
                continue  # pruned meanwhile: gone, not damaged
            problems.append((name, str(exc)))
            continue
        try:
            bundle.verify()
        except BundleError as exc:
            problems.append((name, str(exc)))
        finally:
            bundle.release()
    return problems

"""``verify_bundle`` (``edgeclip verify``): hash and check every file of every version."""

from __future__ import annotations

from pathlib import Path

from edgeclip.errors import BundleError
from edgeclip.store.reader import Bundle, current_version, list_versions


def verify_bundle(root: Path | str, versions: list[str] | None = None) -> list[tuple[str, str]]:
    """Hash every file of every (or the given) version. Returns (version, problem) pairs; empty
    when all is intact."""
    root = Path(root)
    problems = []
    try:
        current_version(root)  # CURRENT must name a complete version
    except BundleError as exc:
        problems.append(("CURRENT", str(exc)))
    for name in versions or list_versions(root):
        try:
            Bundle.open(root, name).verify()
        except BundleError as exc:
            problems.append((name, str(exc)))
    return problems

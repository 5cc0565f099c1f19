"""The model bundle: a versioned directory every stage reads and writes (``edgeclip.store``).

This module is the store's public face: it re-exports the names other code uses, so callers write
``from edgeclip.bundle import Bundle``. The layout, the rules and the modules behind them are
described in ``edgeclip.store`` and docs/ARCHITECTURE.md ("Bundle store").
"""

from __future__ import annotations

from edgeclip.store.fs import (
    CURRENT,
    GRAPH_STORE,
    LOCK,
    MANIFEST,
    link_or_copy,
    sha256_of,
    stored_path,
    utc_now,
)
from edgeclip.store.lock import LOCK_WAIT_S
from edgeclip.store.reader import Bundle, current_version, list_versions, weights_label
from edgeclip.store.retention import (
    disk_usage,
    format_size,
    PrunePlan,
    plan_prune,
    prune,
    rollback,
    run_prune,
    set_retention,
    version_history,
)
from edgeclip.store.stamps import stamps_dir, stamps_path
from edgeclip.store.verify import verify_bundle
from edgeclip.store.writer import VersionWriter, create_bundle

__all__ = [
    "CURRENT", "GRAPH_STORE", "LOCK", "LOCK_WAIT_S", "MANIFEST", "Bundle", "PrunePlan", "plan_prune", "run_prune", "VersionWriter", "create_bundle",
    "current_version", "disk_usage", "format_size", "link_or_copy", "list_versions", "prune", "rollback",
    "set_retention", "sha256_of", "stamps_dir", "stamps_path", "stored_path", "utc_now", "verify_bundle",
    "version_history", "weights_label",
]

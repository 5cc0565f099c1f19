"""What a protocol run reports: the accuracy matrix of each (protocol, gate) with its metrics
(Transfer, Average, Last; ``ProtocolResult``) and the JSON-ready record of the whole run (``run_summary``,
results.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeclip.edgeapp.eval_scoring import KINDS, closed_form
from edgeclip.errors import UsageError

if TYPE_CHECKING:
    from edgeclip.edgeapp.evaluate import ContinualRun


# --------------------------------------------------------------------------- metrics


def protocol_metrics(matrix: np.ndarray) -> dict[str, Any]:
    """Transfer / Average / Last per domain and their means, from A[i, j] = accuracy on domain j
    after learning step i (steps and domains in learning order, same count).

    Transfer_j = mean over i < j of A[i, j] (undefined for the first domain, so None there);
    Average_j = mean over i of A[i, j]; Last_j = A[n-1, j]. Means: Transfer over domains 2..n.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise UsageError(f"the accuracy matrix must be square [steps, domains], got {list(a.shape)}")
    n = a.shape[0]
    transfer = [None] + [float(a[:j, j].mean()) for j in range(1, n)]
    average = [float(v) for v in a.mean(axis=0)]
    last = [float(v) for v in a[-1]]
    defined = [t for t in transfer if t is not None]
    return {
        "transfer": float(np.mean(defined)) if defined else None,
        "average": float(np.mean(average)),
        "last": float(np.mean(last)),
        "per_domain": {"transfer": transfer, "average": average, "last": last},
    }


@dataclass
class ProtocolResult:
    """One protocol under one gate: the accuracy matrix and what it implies. `kind` (KINDS):
    'gated' (the papers' protocol), 'oracle' (task given) or 'zero-shot'."""

    protocol: str
    gate: str
    domains: list[str]
    zero_shot: list[float]  # accuracy per domain before any step (percent)
    matrix: list[list[float]]  # [steps, domains], percent
    routing: list[dict[str, float | None]] = field(default_factory=list)  # per step (routed matrices)
    kind: str = "gated"

    def metrics(self) -> dict[str, Any]:
        return protocol_metrics(np.asarray(self.matrix))

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics()
        return {"protocol": self.protocol, "gate": self.gate, "kind": self.kind, "meaning": KINDS[self.kind],
                "domains": self.domains, "matrix": self.matrix,
                "zero_shot": self.zero_shot, "transfer": m["transfer"], "average": m["average"],
                "last": m["last"], "per_domain": m["per_domain"], "routing": self.routing}


def run_summary(run: ContinualRun, source: Path) -> dict[str, Any]:
    """The JSON-ready record of a run (results.json): one entry per (protocol, gate) in `results`,
    each with its `kind` ('gated', 'oracle', 'zero-shot') and meaning, and at top level the
    headline's (the first, gated) `domains`, `matrix`, `transfer`, `average`, `last`, `routing`."""
    entries = [r.to_dict() for r in run.results.values()]
    head = entries[0]
    graph = run.decision == "graph" or not closed_form(run.method)
    return {
        "domains": head["domains"],
        "protocol": head["protocol"],
        "gate": head["gate"],
        "kind": head["kind"],
        "matrix": head["matrix"],
        "transfer": head["transfer"],
        "average": head["average"],
        "last": head["last"],
        "per_domain": head["per_domain"],
        "zero_shot": head["zero_shot"],
        "routing": head["routing"],
        "results": entries,
        "matrices": [{"protocol": e["protocol"], "gate": e["gate"], "kind": e["kind"], "meaning": e["meaning"]}
                     for e in entries],
        "timing": {
            "embed_test_s": run.suite.seconds,
            "steps": [vars(t) for t in run.timing],
        },
        "test_images": [len(x) for x in run.suite.features],
        "classes": [len(d.classes) for d in run.suite.domains],
        "shared_class_names": {d.name: list(d.shared) for d in run.suite.domains if d.shared},
        "unreadable": [{"path": p, "error": e} for p, e in run.suite.unreadable],
        "bundle": str(source),
        "method": run.method,
        "shots": run.shots,
        "preset": run.preset,
        "gate_decides_per": f"batch of {run.route_batch} test images" if run.route_batch else "image",
        "decision": ("X-TAIL: graphs/gated.onnx run on the test pixels (streamed)" if graph else
                     "train/decision.py on cached frozen embeddings (tested equal to graphs/gated.onnx)")
                    + ("; MTIL: the adapted model (torch), routed by the DDAS gate on the frozen embeddings"
                       if not closed_form(run.method) else ""),
        "random_weights": run.random_weights,
    }

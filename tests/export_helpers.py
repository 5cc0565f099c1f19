"""Shared pieces of the export tests: a tiny random-weight backbone, its exported graphs, and
RAIL bundles' learned tensors built with the real learners (ddas, rail) on its embeddings.

Plain functions cached per process (not fixtures), so every export test module reuses one export.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from edgeclip.train.decision import learned_tensors

TINY = "edgeclip-tiny"
TASK_CLASSES = [["ant", "bee", "cat"], ["dog", "eel"]]  # task 0, task 1 (global order)
EXTRA_LABELS = ["fox", "gnu", "hen"]  # zero-shot labels of no learned task


@functools.lru_cache(maxsize=None)
def tiny_backbone() -> Any:
    from edgeclip.train.backbone import load_backbone

    return load_backbone(TINY, random_weights=True, seed=0)


_GRAPHS: dict[str, Path] = {}


def tiny_graphs(base: Path) -> Path:
    """A folder holding the tiny backbone's image_encoder.onnx/.data and text_encoder.onnx/.data."""
    if "dir" not in _GRAPHS:
        from edgeclip.export.trace import export_image_encoder, export_text_encoder

        out = base / "tiny-graphs"
        out.mkdir(parents=True, exist_ok=True)
        backbone = tiny_backbone()
        export_image_encoder(backbone, out)
        export_text_encoder(backbone, out)
        _GRAPHS["dir"] = out
    return _GRAPHS["dir"]


def cluster_pixels(cluster: int, n: int, size: int, seed: int = 0) -> np.ndarray:
    """n images [n,3,S,S] around one fixed random pattern per cluster (tight embedding clusters)."""
    base = np.random.default_rng(1000 + cluster).standard_normal((1, 3, size, size))
    noise = np.random.default_rng(seed * 7919 + cluster).standard_normal((n, 3, size, size))
    return (base + 0.5 * noise).astype(np.float32)


def manifest_for(method: str, fusion: str, gate_kind: str, thresholds: list[float],
                 classes: list[list[str]] = TASK_CLASSES, kernel_gamma: float = 0.1) -> Any:
    """The typed manifest (``edgeclip.manifest.Manifest``) of a tiny bundle with these tasks."""
    from edgeclip.manifest import validate_manifest

    bb = tiny_backbone()
    settings: dict = {"fusion": fusion, "beta": 0.8}
    if method == "rail-dual":
        settings["gamma_kernel"] = kernel_gamma
    return validate_manifest({
        "backbone": {"model": TINY, "embed_dim": bb.embed_dim, "context_length": bb.context_length,
                     "weights": msgspec.to_builtins(bb.source)},
        "preprocess": msgspec.to_builtins(bb.preprocess),
        "method": {"name": method, "settings": settings},
        "gate": {"kind": gate_kind, "settings": {}},
        "zero_shot": {"templates": ["a photo of a {}."], "logit_scale": 100.0},
        "tasks": [{"name": f"task{t}", "classes": c, "threshold": thr}
                  for t, (c, thr) in enumerate(zip(classes, thresholds))],
        "files": {},
    }, complete=False)


def fit_rail_bundle(task_embeddings: list[np.ndarray], task_labels: list[np.ndarray], zs_text: np.ndarray,
                    method: str, fusion: str = "ddas", gate_kind: str = "linear", hidden: int = 48,
                    classes: list[list[str]] = TASK_CLASSES, kernel_gamma: float = 0.1) -> tuple[dict[str, np.ndarray], Any]:
    """Learn tasks one by one with the project's learners; return (learned tensors, manifest).

    task_labels: global class indices of each task's embeddings.
    """
    from edgeclip.train import ddas
    from edgeclip.train.rail import RailDual, RailPrimal

    dim = task_embeddings[0].shape[1]
    head = RailPrimal(dim, hidden=hidden, gamma=0.1, seed=0) if method == "rail-primal" else RailDual(gamma_kernel=kernel_gamma)
    gates, thresholds, seen = [], [], 0
    for x, y, names in zip(task_embeddings, task_labels, classes):
        seen += len(names)
        head.add_domain(x, y, seen)
        head.solve()
        options = {"k": 3} if gate_kind == "linear" else {"hidden": 16, "steps": 150, "lr": 1e-2}
        gate, threshold = ddas.fit_gate(x, kind=gate_kind, seed=0, **options)
        gates.append(gate.state())
        thresholds.append(threshold)
    learned = learned_tensors(zs_text, [len(c) for c in classes], gate_kind, gates, method, head.state())
    return learned, manifest_for(method, fusion, gate_kind, thresholds, classes, kernel_gamma)


def label_text() -> np.ndarray:
    """Text embeddings [8,D] of the learned classes (global order) then the extra labels."""
    names = [c for task in TASK_CLASSES for c in task] + EXTRA_LABELS
    return tiny_backbone().class_text_embeddings(names, ["a photo of a {}."])


def task_data(embed: Any, n: int = 20) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Embeddings of two synthetic image clusters (task 0, task 1) and their global labels."""
    size = tiny_backbone().preprocess.image_size
    xs = [embed(cluster_pixels(c, n, size)) for c in range(2)]
    offsets = np.cumsum([0] + [len(c) for c in TASK_CLASSES])
    ys = [offsets[t] + np.arange(n) % len(TASK_CLASSES[t]) for t in range(2)]
    return xs, ys


def mixed_batch(per_cluster: int = 4) -> np.ndarray:
    """Images of task 0, task 1 and an unseen cluster, interleaved."""
    size = tiny_backbone().preprocess.image_size
    parts = [cluster_pixels(c, per_cluster, size, seed=5) for c in range(3)]
    return np.stack([p[i] for i in range(per_cluster) for p in parts])


def make_bundle(root: Path, graphs: Path, learned: dict[str, np.ndarray] | None, manifest: Any) -> Any:
    """A real bundle version holding the exported graphs, the vocabulary and the learned tensors."""
    from edgeclip.bundle import Bundle, create_bundle
    from edgeclip.tokenizer import default_vocab_path

    with create_bundle(root, manifest) as writer:
        for name in ("image_encoder.onnx", "text_encoder.onnx", "gated.onnx"):  # with their .data: the graph store
            if (graphs / name).exists():
                writer.write_graph(f"graphs/{name}", graphs / name)
        writer.write_file("tokenizer/bpe_simple_vocab_16e6.txt.gz", default_vocab_path())
        if learned is not None:
            writer.write_tensors("learned.safetensors", learned)
    return Bundle.open(root)


def encoder_folder(graphs: Path, dest: Path) -> Path:
    """A fresh folder with (hard links to) the image encoder, for one gated graph to be built in."""
    import os

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("image_encoder.onnx", "image_encoder.data"):
        os.link(graphs / name, dest / name)
    return dest

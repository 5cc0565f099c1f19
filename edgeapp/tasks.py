"""Bundle-level steps: create a bundle from an open_clip model, and learn a task into a new version.

``init_bundle`` needs torch (it reads open_clip and traces the encoders). ``add_task`` for the
RAIL methods needs no torch: features come from the exported image encoder through
onnxruntime, the ridge update and the linear DDAS gate are numpy, and the gated graph is
re-composed with onnx alone. MoE add-task imports torch (``train`` extra).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from edgeclip.train.ddas import QUANTILE as GATE_QUANTILE
from edgeclip.train.ddas import K as GATE_K
from edgeclip.train.decision import FUSIONS

from edgeclip.bundle import Bundle, VersionWriter, create_bundle, utc_now
from edgeclip.domain import Domain, few_shot, read_domain
from edgeclip.errors import DomainError, MissingExtraError, UsageError
from edgeclip.layout import LEARNED, RAIL_STATE, VOCAB_NAME

METHODS = ("moe", "rail-primal", "rail-dual")
DEFAULT_TEMPLATES = ["a photo of a {}."]

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class MethodSettings:
    """What ``edgeclip init`` records about the learner; defaults are the papers'."""

    method: str = "rail-primal"
    hidden: int = 15000  # RAIL primal random features
    gamma: float = 0.1  # RAIL primal ridge
    gamma_kernel: float = 0.1  # RAIL dual RBF
    lam: float = 1e-3  # RAIL dual ridge
    beta: float = 0.8  # fusion weight of the learned scores
    fusion: str = "ddas"  # how RAIL picks images for the learned head: ddas | paper
    gate_kind: str = "linear"  # DDAS autoencoder: linear (closed form, torch-free) | mlp
    gate_k: int = GATE_K  # measured in docs/LEARNERS.md
    gate_quantile: float = GATE_QUANTILE
    seed: int = 0
    moe: dict[str, Any] = field(default_factory=dict)  # MoEConfig fields that differ from the paper's
    moe_train: dict[str, Any] = field(default_factory=dict)  # training recipe fields (iterations, lr, ...)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"Unknown method '{self.method}'; expected one of {', '.join(METHODS)}.")
        if self.fusion not in FUSIONS:
            raise UsageError(f"Unknown fusion '{self.fusion}'; expected one of {', '.join(FUSIONS)}.")
        if self.gate_kind not in ("linear", "mlp"):
            raise UsageError(f"Unknown gate kind '{self.gate_kind}'; expected linear or mlp.")
        if self.hidden < 1 or not 0.0 <= self.beta <= 1.0 or not 0.0 < self.gate_quantile <= 1.0:
            raise UsageError("Expected hidden >= 1, 0 <= beta <= 1 and 0 < gate quantile <= 1.")


def init_bundle(
    root: Path,
    model: str,
    pretrained: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    settings: MethodSettings | None = None,
    zero_shot_labels: list[str] | None = None,
) -> Bundle:
    """A new bundle with no task: the frozen encoders exported to ONNX, zero-shot only."""
    from edgeclip.export.trace import export_image_encoder, export_text_encoder
    from edgeclip.train.backbone import load_backbone

    from edgeclip.tokenizer import default_vocab_path

    settings = settings or MethodSettings()
    settings.validate()
    backbone = load_backbone(model, pretrained, random_weights=random_weights, seed=seed)
    manifest: dict[str, Any] = {
        "backbone": {
            "model": model,
            "weights": backbone.source.to_dict(),
            "embed_dim": backbone.embed_dim,
            "context_length": backbone.context_length,
        },
        "preprocess": backbone.preprocess,
        "method": {"name": settings.method, "settings": _method_settings(settings, backbone.embed_dim)},
        "gate": {"kind": settings.gate_kind, "k": settings.gate_k, "quantile": settings.gate_quantile},
        "zero_shot": {"templates": list(DEFAULT_TEMPLATES), "logit_scale": 100.0, "labels": zero_shot_labels or []},
        "tasks": [],
    }
    writer = create_bundle(root, manifest)
    with writer:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_dir = Path(tmp)
            for export in (export_image_encoder, export_text_encoder):
                onnx_path = Path(export(backbone, tmp_dir))  # with its .data beside it
                writer.write_graph(f"graphs/{onnx_path.name}", onnx_path, move=True)  # the shared graph store
        writer.write_file(f"tokenizer/{VOCAB_NAME}", default_vocab_path())
        learned = initial_learned(settings, backbone.embed_dim)
        writer.write_tensors(LEARNED, learned)
        if settings.method == "moe":
            from edgeclip.edgeapp.moe_task import initial_moe_state
            from edgeclip.train.moe import MoEConfig

            from edgeclip.layout import MOE_STATE

            config = MoEConfig.from_dict(manifest["method"]["settings"]["moe"])
            writer.write_tensors(MOE_STATE, initial_moe_state(backbone, config, settings.seed))
        write_gated_graph(writer, learned)
    return Bundle.open(root)


def initial_learned(settings: MethodSettings, dim: int) -> dict[str, np.ndarray]:
    """The learned tensors of a bundle with no task: an empty label space and an untrained head."""
    from edgeclip.train.decision import learned_tensors

    if settings.method == "rail-primal":
        from edgeclip.train.rail import RailPrimal

        head = RailPrimal(dim, settings.hidden, settings.gamma, settings.seed).state()
    elif settings.method == "rail-dual":
        head = {"memory": np.zeros((0, dim), np.float32), "alpha": np.zeros((0, 0), np.float32)}
    else:
        head = {"task_text": np.zeros((0, dim), np.float32)}
    return learned_tensors(np.zeros((0, dim), np.float32), [], settings.gate_kind, [], settings.method, head)


def _method_settings(s: MethodSettings, dim: int) -> dict[str, Any]:
    common = {"beta": s.beta, "fusion": s.fusion, "seed": s.seed}
    if s.method == "rail-primal":
        return {**common, "hidden": s.hidden, "gamma": s.gamma, "dim": dim}
    if s.method == "rail-dual":
        return {**common, "gamma_kernel": s.gamma_kernel, "lam": s.lam, "dim": dim}
    from edgeclip.edgeapp.moe_task import moe_settings
    from edgeclip.train.moe import MoEConfig

    return {**common, **moe_settings(MoEConfig.from_dict(s.moe), s.moe_train)}


# --------------------------------------------------------------------------- add-task


def check_new_task(bundle: Bundle, domain: Domain, name: str) -> None:
    """Refuse what would corrupt the bundle: a used task name or a class name already learned."""
    if any(task["name"] == name for task in bundle.tasks):
        raise DomainError(f"A task named '{name}' is already learned; pass --name to choose another.")
    learned = {c.lower(): task["name"] for task in bundle.tasks for c in task["classes"]}
    clashes = [c for c in domain.classes if c.lower() in learned]
    if clashes:
        shown = ", ".join(f"'{c}' (task '{learned[c.lower()]}')" for c in clashes[:5])
        raise DomainError(
            f"Class names already learned by earlier tasks: {shown}. Each label must belong to one task, "
            "so that a prediction names its task unambiguously; rename those class folders."
        )


def embed_domain(
    bundle: Bundle, domain: Domain, backend: str = "auto", batch_size: int = 32, progress: ProgressFn | None = None,
    pixels_out: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[Path, str]]]:
    """Frozen image embeddings [N, D] of a domain's images with the exported encoder (torch-free).

    ``pixels_out``, when given, receives the preprocessed batches in the same order, for callers
    that need the pixels too (each image is decoded once)."""
    from edgeclip.edgeapp.runtime import ImageEncoderRunner

    from edgeclip.images import PreprocessConfig, iter_batches

    cfg = PreprocessConfig.from_dict(bundle.manifest["preprocess"])
    runner = ImageEncoderRunner(bundle, backend)
    label_of = {path: label for path, label in domain.samples}
    feats, labels, errors = [], [], []
    done = 0
    for batch in iter_batches([p for p, _ in domain.samples], cfg, batch_size=batch_size):
        errors.extend(batch.errors)
        if batch.paths:
            feats.append(runner.embed(batch.pixels))
            if pixels_out is not None:
                pixels_out.append(batch.pixels)
            labels.extend(label_of[p] for p in batch.paths)
        done += len(batch.paths) + len(batch.errors)
        if progress:
            progress("embedding", done, len(domain.samples))
    if not feats:
        raise DomainError(f"No image of {domain.root} could be read.")
    return np.concatenate(feats), np.asarray(labels, np.int64), errors


def class_text_embeddings(bundle: Bundle, domain: Domain, backend: str = "auto") -> np.ndarray:
    """Frozen zero-shot classifier of the domain's classes: templates averaged, re-normalised."""
    from edgeclip.edgeapp.runtime import TextEncoderRunner

    return TextEncoderRunner(bundle, backend).class_embeddings(domain.classes, domain.templates)


def require_torch(what: str) -> None:
    """Fail early, saying which extra to install, when torch or open_clip is missing."""
    import importlib.util

    for module, package in (("torch", "torch"), ("open_clip", "open_clip_torch")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a broken or blocked installation
            found = False
        if not found:
            raise MissingExtraError(what, "train", package)


def load_domain(directory: Path, shots: int | None, seed: int) -> Domain:
    domain = read_domain(directory, split="train")
    return few_shot(domain, shots, seed) if shots else domain


def add_task(
    root: Path,
    domain_dir: Path,
    name: str | None = None,
    shots: int | None = None,
    iterations: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    progress: ProgressFn | None = None,
    moe_options: dict[str, Any] | None = None,
) -> Bundle:
    """Learn one domain into a new bundle version (the previous one stays intact until the switch)."""
    bundle = Bundle.open(root)
    if bundle.method == "moe":
        require_torch("MoE add-task (training adapters)")
    settings = bundle.manifest["method"]["settings"]
    domain = load_domain(Path(domain_dir), shots, int(settings.get("seed", 0)))
    name = name or domain.name
    check_new_task(bundle, domain, name)
    if bundle.method == "moe":
        from edgeclip.edgeapp.moe_task import add_moe_task

        return add_moe_task(bundle, domain, name, iterations=iterations, device=device, progress=progress,
                            options=moe_options or {})
    return add_rail_task(bundle, domain, name, backend=backend, progress=progress)


def fit_task_gate(bundle: Bundle, feats: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any], float]:
    """The task's DDAS autoencoder (state, settings) and its calibrated threshold."""
    from edgeclip.train.ddas import fit_gate

    gate = bundle.manifest["gate"]
    seed = int(bundle.manifest["method"]["settings"].get("seed", 0))
    autoencoder, threshold = fit_gate(feats, kind=gate["kind"], k=int(gate["k"]), quantile=float(gate["quantile"]), seed=seed)
    return autoencoder.state(), autoencoder.settings(), float(threshold)


def task_record(domain: Domain, name: str, n_images: int, threshold: float, gate_settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "classes": list(domain.classes),
        "templates": list(domain.templates),
        "n_images": int(n_images),
        "threshold": float(threshold),
        "gate": gate_settings,
        "source": str(domain.root),
        "created_at": utc_now(),
    }


def rail_learner(bundle: Bundle, learned: dict[str, np.ndarray] | None = None) -> Any:
    """The bundle's RAIL learner, restored from its inference tensors (``learned``, read from the
    bundle unless the caller has them already) and its learning state."""
    from edgeclip.train.decision import RAIL_KEYS
    from edgeclip.train.rail import RailDual, RailPrimal

    settings = bundle.manifest["method"]["settings"]
    learned = bundle.tensors(LEARNED) if learned is None else learned
    if not bundle.tasks:
        if bundle.method == "rail-primal":
            w_r = learned["rail.w_r"]
            return RailPrimal(int(settings["dim"]), int(settings["hidden"]), float(settings["gamma"]),
                              int(settings["seed"]), w_r=w_r)
        return RailDual(float(settings["gamma_kernel"]), float(settings["lam"]))
    state = dict(bundle.tensors(RAIL_STATE))
    for key in RAIL_KEYS[bundle.method]:
        state[key] = learned[f"rail.{key}"]
    cls = RailPrimal if bundle.method == "rail-primal" else RailDual
    return cls.from_state(state, settings["learner"])


def add_rail_task(bundle: Bundle, domain: Domain, name: str, backend: str = "auto",
                  progress: ProgressFn | None = None) -> Bundle:
    """RAIL add-task, torch-free: embed, update the closed-form head, fit the gate, re-compose the graph."""
    from edgeclip.train.decision import RAIL_KEYS, gate_states, learned_tensors

    feats, labels, _errors = embed_domain(bundle, domain, backend, progress=progress)
    learned = bundle.tensors(LEARNED)
    offset = learned["zs_text"].shape[0]
    learner = rail_learner(bundle, learned)
    if progress:
        progress("solving", 0, 1)
    learner.add_domain(feats, labels + offset, offset + len(domain.classes))
    learner.solve()
    if progress:
        progress("solving", 1, 1)
    gate_state, gate_settings, threshold = fit_task_gate(bundle, feats)
    zs_text = np.concatenate([learned["zs_text"], class_text_embeddings(bundle, domain, backend)])
    kind = bundle.manifest["gate"]["kind"]
    gates = gate_states(learned, kind) + [gate_state]
    sizes = [len(t["classes"]) for t in bundle.tasks] + [len(domain.classes)]
    state = learner.state()
    new_learned = learned_tensors(zs_text, sizes, kind, gates, bundle.method, state)
    inference_keys = RAIL_KEYS[bundle.method]
    with bundle.new_version() as writer:
        writer.manifest["method"]["settings"]["learner"] = learner.settings()
        writer.manifest["tasks"].append(task_record(domain, name, len(feats), threshold, gate_settings))
        writer.write_tensors(LEARNED, new_learned)
        writer.write_tensors(RAIL_STATE, {k: v for k, v in state.items() if k not in inference_keys and v is not None})
        write_gated_graph(writer, new_learned)
    return Bundle.open(bundle.root)


def write_gated_graph(writer: VersionWriter, learned: dict[str, np.ndarray]) -> None:
    """Re-compose the version's gated graph (and its int8 twin when the version has the int8
    encoder, `edgeclip export --int8`) in the writer's graph folder; the new graphs go to the
    bundle's shared graph store (``VersionWriter.graph_folder``)."""
    with writer.graph_folder() as graphs:
        if writer.manifest["method"]["name"] == "moe" and writer.manifest["tasks"]:
            from edgeclip.export.compose_moe import build_moe_gated_graph

            build_moe_gated_graph(graphs, learned, writer.manifest)
        else:
            from edgeclip.export.compose import build_gated_graph
            from edgeclip.export.quantize import build_gated_int8, has_int8

            build_gated_graph(graphs, learned, writer.manifest)
            if has_int8(writer.manifest["files"]):
                build_gated_int8(graphs, learned, writer.manifest)

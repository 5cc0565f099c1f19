"""Create a bundle from an open_clip model: the frozen encoders exported to ONNX, zero-shot only.

Needs torch and open_clip (the ``train`` extra): it reads the model and traces the encoders. Reached
from the CLI and the API through ``edgeclip.extras.import_torch_module``, so the torch-free paths
never import it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgeclip.bundle import Bundle, create_bundle
from edgeclip.edgeapp.tasks import DEFAULT_TEMPLATES, MethodSettings, initial_learned, write_gated_graph
from edgeclip.export.trace import export_image_encoder, export_text_encoder
from edgeclip.layout import LEARNED, MOE_STATE, VOCAB_FILE, graph_file
from edgeclip.tokenizer import default_vocab_path
from edgeclip.train.backbone import load_backbone
from edgeclip.train.registry import learner_spec


def init_bundle(
    root: Path,
    model: str,
    pretrained: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    settings: MethodSettings | None = None,
    zero_shot_labels: list[str] | None = None,
) -> Bundle:
    """A new bundle at ``root`` with no task: the frozen encoders of open_clip ``model`` exported to ONNX.

    Weights: ``pretrained`` (an open_clip tag or a checkpoint file) or ``random_weights`` with ``seed``.
    Raises BackboneLoadError (model or weights cannot be had), BundleError (``root`` holds something),
    UsageError (invalid settings), ExportParityError (ONNX differs from torch).
    """
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
                onnx_path = Path(export(backbone, tmp_dir))
                for produced in sorted(tmp_dir.iterdir()):
                    if produced.stem == onnx_path.stem:
                        writer.write_file(graph_file(produced.name), produced)
        writer.write_file(VOCAB_FILE, default_vocab_path())
        learned = initial_learned(settings, backbone.embed_dim)
        writer.write_tensors(LEARNED, learned)
        if learner_spec(settings.method).learns_from == "images":  # MoE: the adapters of a bundle with no task
            from edgeclip.edgeapp.moe_task import initial_moe_state
            from edgeclip.train.moe import MoEConfig

            config = MoEConfig.from_dict(manifest["method"]["settings"]["moe"])
            writer.write_tensors(MOE_STATE, initial_moe_state(backbone, config, settings.seed))
        write_gated_graph(writer, learned)
    return Bundle.open(root)


def _method_settings(s: MethodSettings, dim: int) -> dict[str, Any]:
    """What the manifest records under ``method.settings`` for the learner's head kind."""
    common = {"beta": s.beta, "fusion": s.fusion, "seed": s.seed}
    head = learner_spec(s.method).head
    if head == "ridge":
        return {**common, "hidden": s.hidden, "gamma": s.gamma, "dim": dim}
    if head == "kernel":
        return {**common, "gamma_kernel": s.gamma_kernel, "lam": s.lam, "dim": dim}
    from edgeclip.edgeapp.moe_task import moe_settings
    from edgeclip.train.moe import MoEConfig

    return {**common, **moe_settings(MoEConfig.from_dict(s.moe), s.moe_train)}



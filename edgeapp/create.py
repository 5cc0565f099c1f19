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
from edgeclip.edgeapp.tasks import MethodSettings, initial_learned, write_gated_graph
from edgeclip.export.trace import export_image_encoder, export_text_encoder
from edgeclip.layout import MOE_STATE, graph_file
from edgeclip.learned import write_learned
from edgeclip.manifest import DEFAULT_TEMPLATES
from edgeclip.train.backbone import check_method, load_backbone
from edgeclip.train.registry import learner_spec


def init_bundle(
    root: Path,
    model: str,
    pretrained: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    settings: MethodSettings | None = None,
    zero_shot_labels: list[str] | None = None,
    tokenizer: str | None = None,
    keep: int = 0,
) -> Bundle:
    """A new bundle at ``root`` with no task: the frozen encoders of open_clip ``model`` exported to ONNX.

    Weights: ``pretrained`` (an open_clip tag or a checkpoint file) or ``random_weights`` with ``seed``.
    Raises BackboneLoadError (model or weights cannot be had), BundleError (``root`` holds something),
    UsageError (invalid settings, a method the model cannot take), ExportParityError (ONNX differs from torch).
    ``tokenizer``: the tokenizer.json of a Hugging Face tokenizer model (SigLIP), see docs/MODELS.md.
    ``keep``: the retention setting (versions kept after each write, 0 = all; ``edgeclip.bundle.prune``).
    """
    settings = settings or MethodSettings()
    settings.validate()
    backbone = load_backbone(model, pretrained, random_weights=random_weights, seed=seed, tokenizer=tokenizer)
    check_method(backbone, settings.method)
    text = backbone.manifest_entry()["text"]  # the model's own text side (tokenizer, scale, bias)
    manifest: dict[str, Any] = {
        "backbone": backbone.manifest_entry(),
        "preprocess": backbone.preprocess,
        "method": {"name": settings.method, "settings": _method_settings(settings, backbone.embed_dim)},
        "gate": {"kind": settings.gate_kind, "k": settings.gate_k, "quantile": settings.gate_quantile},
        "zero_shot": {"templates": list(DEFAULT_TEMPLATES), "logit_scale": text["logit_scale"],
                      "labels": zero_shot_labels or []},
        "tasks": [],
    }
    if keep:
        manifest["retention"] = {"keep": int(keep)}
    writer = create_bundle(root, manifest)
    with writer:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_dir = Path(tmp)
            for export in (export_image_encoder, export_text_encoder):
                onnx_path = Path(export(backbone, tmp_dir))  # with its .data beside it
                writer.write_graph(graph_file(onnx_path.name), onnx_path, move=True)  # the shared graph store
        writer.write_file(text["file"], backbone.text.source)
        learned = initial_learned(settings, backbone.embed_dim)
        write_learned(writer, learned)
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



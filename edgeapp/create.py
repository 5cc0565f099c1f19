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
from edgeclip.edgeapp.tasks import init_sections, initial_learned, write_gated_graph
from edgeclip.export.trace import export_image_encoder, export_text_encoder
from edgeclip.layout import graph_file
from edgeclip.learned import write_learned
from edgeclip.manifest import DEFAULT_TEMPLATES, to_builtins, validate_manifest
from edgeclip.train.backbone import check_method, load_backbone
from edgeclip.train.registry import get_learner


def init_bundle(
    root: Path,
    model: str,
    pretrained: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    method: str = "rail-primal",
    zero_shot_labels: list[str] | None = None,
    tokenizer: str | None = None,
    keep: int = 0,
    **options: Any,
) -> Bundle:
    """A new bundle at ``root`` with no task: the frozen encoders of open_clip ``model`` exported to ONNX.

    Weights: ``pretrained`` (an open_clip tag or a checkpoint file) or ``random_weights`` with ``seed``.
    Raises BackboneLoadError (model or weights cannot be had), BundleError (``root`` holds something),
    UsageError (invalid settings, a method the model cannot take), ExportParityError (ONNX differs from torch).
    ``tokenizer``: the tokenizer.json of a Hugging Face tokenizer model (SigLIP), see docs/MODELS.md.
    ``keep``: the retention setting (versions kept after each write, 0 = all; ``edgeclip.bundle.prune``).
    ``method``: a learner of the registry; ``options``: its settings and the gate's (``tasks.init_sections``;
    the schema's defaults for the rest).
    """
    get_learner(method)  # UsageError naming the known learners, before the model is read
    backbone = load_backbone(model, pretrained, random_weights=random_weights, seed=seed, tokenizer=tokenizer)
    check_method(backbone, method)
    method_section, gate = init_sections(method, backbone.embed_dim, seed, **options)
    text = backbone.text.spec  # the model's own text side (tokenizer, scale, bias)
    meta = validate_manifest({
        "backbone": backbone.manifest_entry(),
        "preprocess": to_builtins(backbone.preprocess),
        "method": to_builtins(method_section),
        "gate": to_builtins(gate),
        "zero_shot": {"templates": list(DEFAULT_TEMPLATES), "logit_scale": text.logit_scale,
                      "labels": zero_shot_labels or []},
        "retention": {"keep": int(keep)},
    }, complete=False)
    writer = create_bundle(root, meta)
    with writer:
        with tempfile.TemporaryDirectory(prefix=".export-", dir=writer.staging) as tmp:  # a kill leaves nothing in /tmp
            tmp_dir = Path(tmp)
            for export in (export_image_encoder, export_text_encoder):
                onnx_path = Path(export(backbone, tmp_dir))  # with its .data beside it
                writer.write_graph(graph_file(onnx_path.name), onnx_path, move=True)  # the shared graph store
        writer.write_file(text.file, backbone.text.source)
        learned = initial_learned(meta.method, meta.gate.kind, backbone.embed_dim)
        write_learned(writer, learned)
        for name, tensors in get_learner(method).initial_files(meta.method.settings, backbone.model, seed).items():
            writer.write_tensors(name, tensors)  # the learner's own state (MoE: the adapters)
        write_gated_graph(writer, learned)
    return writer.bundle

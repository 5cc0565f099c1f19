"""MoE-Adapters at the bundle level: the adapter state of a new bundle, and learning a task into a new version.

Needs torch (the ``train`` extra). The frozen parts (DDAS gate on the frozen embedding, zero-shot
text classifier) are computed exactly as for RAIL, through the exported frozen encoders.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np

from edgeclip.bundle import Bundle, VersionWriter
from edgeclip.domain import Domain
from edgeclip.edgeapp.tasks import (
    ProgressFn,
    class_text_embeddings,
    embed_domain,
    fit_task_gate,
    task_record,
    write_gated_graph,
)
from edgeclip.errors import UsageError
from edgeclip.layout import LEARNED, MOE_DATA, MOE_GRAPH, MOE_GRAPH_FILES, MOE_STATE, TASK_TEXT
from edgeclip.manifest import WARMUP_RULES, MoERecipe, MoESettings, Training
from edgeclip.train.backbone import Backbone, load_backbone
from edgeclip.train.moe import (
    ZERO_SHOT,
    MoECLIP,
    MoEConfig,
    exact_fp32,
    load_moe_state,
    moe_state,
    text_classifier,
)
from edgeclip.train.moe_trainer import TrainSettings, train_task

log = logging.getLogger(__name__)
ESTIMATE_AFTER = 4  # iterations: the first is slower (allocations, worker start); estimate from 2..4


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cpu_time_estimate(iterations: int, progress: ProgressFn | None,
                      clock: Callable[[], float] = time.perf_counter) -> Callable[[int, int, float], None]:
    """An ``on_step`` callback for training on a CPU that, after `ESTIMATE_AFTER` iterations, says once
    how long the whole training will take: the measured time per iteration (iterations 2..4, the
    first carries one-off costs) x ``iterations``, as a logged warning and a progress line.
    It also forwards each step to ``progress("training", step, total)``."""
    marks: dict[int, float] = {}

    def on_step(step: int, total: int, loss: float) -> None:
        if step in (1, ESTIMATE_AFTER):
            marks[step] = clock()
        if step == ESTIMATE_AFTER and total > ESTIMATE_AFTER:
            per_step = (marks[ESTIMATE_AFTER] - marks[1]) / (ESTIMATE_AFTER - 1)
            message = (f"MoE training on the CPU: about {format_duration(per_step * total)} for {total} iterations "
                       f"({per_step:.2f} s per iteration, measured); --iterations N trains fewer, a CUDA GPU is "
                       "many times faster")
            log.warning("%s", message)
            if progress:
                progress(message, 0, 0)
        if progress:
            progress("training", step, total)

    return on_step


def task_recipe(train: MoERecipe, name: str, options: dict[str, Any] | None = None) -> MoERecipe:
    """One task's training recipe: the bundle's (manifest method.settings.train), then, when the
    bundle was made with a preset, that preset's learning rate for the task's dataset
    (``train.lr_by_dataset``: {"full": {dataset: lr}, "few": {...}}, keyed by `presets.dataset_key`;
    options["shots"] picks the few-shot table), then `options` (``MoERecipe`` fields, e.g. add-task
    --lr; None values are left out). The result has no ``lr_by_dataset``. Raises UsageError for an
    unknown option, an unknown warm-up rule or a learning rate that is not positive."""
    from edgeclip.train.presets import dataset_key

    options = dict(options or {})
    few = bool(options.pop("shots", None))
    by_dataset = (train.lr_by_dataset or {}).get("few" if few else "full", {})
    changes: dict[str, Any] = {"lr_by_dataset": msgspec.UNSET}
    key = dataset_key(name)
    if key in by_dataset:
        changes["lr"] = float(by_dataset[key])
    changes.update({k: v for k, v in options.items() if v is not None})
    unknown = set(changes) - set(MoERecipe.__struct_fields__)
    if unknown:
        raise UsageError(f"Unknown MoE training option(s) {', '.join(sorted(unknown))}; expected "
                         f"{', '.join(MoERecipe.__struct_fields__)}.")
    recipe = msgspec.structs.replace(train, **changes)
    if recipe.warmup_rule not in WARMUP_RULES:
        raise UsageError(f"warmup_rule must be one of {', '.join(WARMUP_RULES)}, got {recipe.warmup_rule!r}")
    if not float(recipe.lr) > 0:
        raise UsageError(f"the learning rate must be positive, got {recipe.lr}")
    return recipe


def warmup_steps(recipe: MoERecipe) -> int:
    """Warm-up steps: 'fixed' (the papers') takes them as given; 'capped' (edgeclip's default) caps
    them at a tenth of the iterations, so a short run is not all warm-up."""
    warmup, iterations = int(recipe.warmup), int(recipe.iterations)
    if recipe.warmup_rule == "fixed":
        return min(warmup, iterations)
    return min(warmup, max(iterations // 10, 0))


def load_moe_model(bundle: Bundle) -> tuple[Backbone, MoECLIP]:
    """The bundle's backbone and its MoE-Adapters model (section 1 of METHODS.md) with the stored
    adapter and router weights loaded (torch). Raises BundleError on a damaged state file,
    BackboneLoadError when the backbone cannot be loaded."""
    meta = bundle.meta
    backbone = load_backbone(meta.backbone.model, source=meta.backbone.weights)
    model = MoECLIP(backbone.model, MoEConfig.of(moe_settings_of(bundle).moe))
    load_moe_state(model, bundle.tensors(MOE_STATE))
    return backbone, model


def moe_settings_of(bundle: Bundle) -> MoESettings:
    """The MoE settings of ``bundle``; UsageError when it is not an MoE bundle."""
    settings = bundle.meta.method.settings
    if not isinstance(settings, MoESettings):
        raise UsageError(f"A '{bundle.method}' bundle has no MoE adapters.")
    return settings


def _task_texts(model: MoECLIP, tasks: list[tuple[list[str], list[str]]], backbone: Backbone,
                stored: np.ndarray | None, freeze_rule: str) -> np.ndarray:
    """Every task's class text embeddings [C, D] through the adapted text encoder with its own router.

    Strict rule: the earlier tasks' rows are the ones stored when each was learned (``stored``,
    learned.safetensors' task_text), only the new task is encoded. Its router and the experts it
    selects never change again, and a stored row cannot depend on the device or kernel that would
    recompute it: old tasks' scores stay bit-identical on any device. Paper rule: every task is
    recomputed, since an earlier task's experts may change and its classifier must match the image
    side it is compared with. ``tasks``: each task's (classes, templates), the new one last."""
    new = len(tasks) - 1
    if freeze_rule == "strict" and stored is not None and new >= 0 and \
            stored.shape[0] == sum(len(classes) for classes, _ in tasks[:new]):
        fresh = text_classifier(model, new, tasks[new][0], tasks[new][1], backbone.tokenize)
        return np.concatenate([np.asarray(stored, np.float32), fresh])
    return np.concatenate(
        [text_classifier(model, t, classes, templates, backbone.tokenize)
         for t, (classes, templates) in enumerate(tasks)]
    )


def frozen_encoder(model: MoECLIP) -> Callable[[np.ndarray], np.ndarray]:
    """pixels [B,3,S,S] float32 -> frozen CLIP embeddings [B,D] float32 (unit rows) with the model
    on its own device (``ZERO_SHOT``: no adapter), in float32 (TF32 off, no autocast): what the
    exported frozen encoder computes, for embedding a domain on the training GPU."""
    import torch

    device = next(model.parameters()).device

    def encode(pixels: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.inference_mode(), exact_fp32():
            batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
            return model.encode_image(batch, ZERO_SHOT, normalize=True).float().cpu().numpy()

    return encode


def _step_reporter(device: str, iterations: int, progress: ProgressFn | None) -> Callable | None:
    """Progress per step; on a CPU also the up-front time estimate (``cpu_time_estimate``)."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return cpu_time_estimate(iterations, progress)
    return (lambda step, total, loss: progress("training", step, total)) if progress else None


def add_moe_task(
    bundle: Bundle,
    domain: Domain,
    name: str,
    iterations: int | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    options: dict[str, Any] | None = None,
) -> Bundle:
    """Train the task's router and the free experts, fit its gate, export, write a new version.

    MoE-Adapters (METHODS.md section 1: new router, activate-freeze after the task) with the DDAS
    gate on the frozen embedding (section 2). ``options``: recipe fields (iterations, batch_size, lr,
    warmup, freeze_rule) overriding the bundle's; warm-up is capped at a tenth of the iterations.
    Under torchrun only rank 0 writes; other ranks return ``bundle``. Raises DomainError (too few
    readable images), UsageError (bad settings, CUDA asked for but absent), BundleError (damaged
    bundle, concurrent writer), ExportParityError (the adapted graph differs from torch)."""
    from edgeclip.train.decision import gate_states, learned_tensors

    overrides = {**(options or {}), **({"iterations": iterations} if iterations else {})}
    recipe = task_recipe(moe_settings_of(bundle).train, name, overrides)
    settings = TrainSettings(
        iterations=int(recipe.iterations), batch_size=int(recipe.batch_size), lr=float(recipe.lr),
        warmup=warmup_steps(recipe),
        freeze_rule=recipe.freeze_rule, seed=bundle.meta.method.settings.seed,
        device=device, on_step=_step_reporter(device, int(recipe.iterations), progress),
        exact_preprocess=bundle.meta.preprocess.exact,
    )
    backbone, model = load_moe_model(bundle)
    samples = [(str(path), label) for path, label in domain.samples]
    result = train_task(model, samples, domain.classes, domain.templates[0], settings, tokenize=backbone.tokenize)
    if int(os.environ.get("RANK", "0")) != 0:
        return bundle  # under torchrun every rank trains (same model at the end); rank 0 writes the version
    model.eval()
    on_gpu = next(model.parameters()).device.type == "cuda"
    # on the training GPU: the domain's frozen embeddings and the text classifiers (float32, TF32 off);
    # on a CPU the exported frozen encoder embeds (onnxruntime is faster there than torch eager)
    feats, _labels, _errors = embed_domain(bundle, domain, progress=progress,
                                           encode=frozen_encoder(model) if on_gpu else None)
    learned = bundle.tensors(LEARNED)
    with exact_fp32():
        task_text = _task_texts(model, [(t.classes, t.templates) for t in bundle.tasks]
                                + [(domain.classes, domain.templates)], backbone, learned.get(TASK_TEXT),
                                settings.freeze_rule)
    model.cpu()
    gate_state, gate_settings, threshold = fit_task_gate(bundle, feats)
    training = Training(
        iterations=settings.iterations,
        lr=settings.lr,
        warmup=settings.warmup,
        final_loss=float(np.mean(result.losses[-10:])) if result.losses else None,
        images_per_s=float(result.images_per_s),
        experts_frozen=int(sum(int(np.sum(v)) for v in result.frozen.values())),
        experts_added=int(sum(result.grown.values())),
        skipped_images=len(result.skipped),
    )
    record = task_record(name, domain.classes, domain.templates, str(domain.root), len(result.samples), threshold,
                         gate_settings, unreadable=len(_errors), training=training)
    tasks = [*bundle.tasks, record]
    zs_text = np.concatenate([learned["zs_text"], class_text_embeddings(bundle, domain)])
    kind = bundle.meta.gate.kind
    new_learned = learned_tensors(zs_text, [len(t.classes) for t in tasks], kind,
                                  gate_states(learned, kind) + [gate_state], bundle.method,
                                  {"task_text": task_text})
    with bundle.new_version() as writer:
        writer.add_task(record)
        writer.write_tensors(MOE_STATE, {k: v.numpy() for k, v in moe_state(model).items()})
        writer.write_tensors(LEARNED, new_learned)
        write_moe_encoder(writer, model)
        write_gated_graph(writer, new_learned)
    return writer.bundle


def write_moe_encoder(writer: VersionWriter, model: MoECLIP) -> str:
    """Write the adapted image encoder of this version into the shared graph store (replacing the
    inherited one); returns how: "filled" or "traced".

    When the parent version has one, its graph is the template: the same nodes with this model's
    adapters and routers written as new initialisers (`trace_moe.fill_moe_template`, under a
    second); the first task, or a template that cannot take the new adapters (a pool that grew),
    is traced (`trace_moe.export_moe_encoder`, tens of seconds). Either graph is checked against
    torch; a traced one is then pointed at the version's image_encoder.data for its frozen tensors,
    so the store adds only the adapters (a filled one already is)."""
    from edgeclip.export.compose_moe import share_frozen_weights
    from edgeclip.export.trace_moe import export_moe_encoder, fill_moe_template

    with tempfile.TemporaryDirectory(dir=writer.staging) as tmp, writer.graph_folder() as graphs:
        # tmp: same file system, so moves are renames
        made = None
        if (graphs / MOE_GRAPH).is_file() and (graphs / MOE_DATA).exists():
            made = fill_moe_template(graphs, model, Path(tmp))
        if made is None:
            export_moe_encoder(model, Path(tmp))
        for name in MOE_GRAPH_FILES:
            os.replace(Path(tmp) / Path(name).name, graphs / Path(name).name)
        if made is None:
            share_frozen_weights(graphs)
    return "traced" if made is None else "filled"

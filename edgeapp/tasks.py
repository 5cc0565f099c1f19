"""Learn a task into a new bundle version (and the settings and learned tensors a new bundle starts with).

Creating a bundle is ``edgeclip.edgeapp.create`` (torch). ``add_task`` for the RAIL methods needs no torch: features come from the exported image encoder through
onnxruntime, the ridge update and the linear DDAS gate are numpy, and the gated graph is
re-composed with onnx alone. MoE add-task imports torch (``train`` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec
import numpy as np

from edgeclip.bundle import Bundle, VersionWriter, utc_now
from edgeclip.discover import display_path
from edgeclip.domain import (
    MIN_IMAGES_PER_CLASS,
    MIN_TASK_IMAGES,
    MINIMUM_TEXT,
    Domain,
    check_class_names,
    check_task_name,
    check_templates,
    class_key,
    few_shot,
    read_domain,
    require_enough_images,
)
from edgeclip.edgeapp.rail_solver import RailSolverCache
from edgeclip.store.fs import probe_writable
from edgeclip.edgeapp.runtime import ImageEncoderRunner, TextEncoderRunner
from edgeclip.errors import BundleError, DomainError, UsageError
from edgeclip.export.compose import build_gated_graph, write_head_graph
from edgeclip.export.compose_moe import build_moe_gated_graph
from edgeclip.export.fp16 import has_fp16, write_fp16_graphs
from edgeclip.export.quantize import build_gated_int8, has_int8
from edgeclip.extras import import_torch_module, require_torch
from edgeclip.images import iter_batches
from edgeclip.learned import read_learned, write_learned
from edgeclip.layout import (
    RAIL_SOLVER_CACHE,
    RAIL_STATE,
    ZS_TEXT,
    rail_task_state,
)
from edgeclip.manifest import (
    Gate,
    Method,
    Task,
    TaskGate,
    Training,
)
from edgeclip.train.decision import gate_states, learned_tensors
from edgeclip.train.rail import RailPrimal
from edgeclip.train.registry import all_learners, get_learner

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


_GATE_OPTIONS = {"gate_kind": "kind", "gate_k": "k", "gate_quantile": "quantile"}  # init option -> Gate field


def init_sections(method: str, dim: int, seed: int = 0, **options: Any) -> tuple[Method, Gate]:
    """The typed ``method`` and ``gate`` sections of a new bundle: learner ``method`` (a registry
    name) with ``options`` (its settings: hidden, gamma, gamma_kernel, lam, beta, fusion, moe,
    moe_train; the gate's: gate_kind, gate_k, gate_quantile), the schema's defaults for the rest.
    ``dim``: the embedding size D. Raises UsageError for an unknown method or option, or a value out of
    range (naming the field)."""
    chosen = get_learner(method)
    known = {f for cls in all_learners().values() for f in cls.settings_type.__struct_fields__}
    unknown = set(options) - known - {"moe_train"} - set(_GATE_OPTIONS)
    if unknown:
        raise UsageError(f"Unknown setting(s) {', '.join(sorted(unknown))} for '{method}'.")
    settings = chosen.init_settings({**options, "seed": seed}, dim)
    gate = {_GATE_OPTIONS[k]: v for k, v in options.items() if k in _GATE_OPTIONS and v is not None}
    try:
        return (msgspec.convert({"name": method, "settings": msgspec.to_builtins(settings)}, Method),
                msgspec.convert(gate, Gate))
    except msgspec.ValidationError as exc:
        raise UsageError(f"Invalid setting: {exc}.") from None


def initial_learned(method: Method, gate_kind: str, dim: int) -> dict[str, np.ndarray]:
    """The learned tensors of a bundle with no task (an empty label space, an untrained head) for
    embeddings of width ``dim``; layout in ``edgeclip.layout``."""
    head = get_learner(method.name).initial_head(method.settings, dim)
    return learned_tensors(np.zeros((0, dim), np.float32), [], gate_kind, [], method.name, head)


# --------------------------------------------------------------------------- add-task


def check_new_task(bundle: Bundle, classes: Sequence[str], name: str) -> None:
    """Refuse (DomainError) what would corrupt the bundle or make a prediction ambiguous: a task name that
    is taken, empty, "zero-shot" or not plain text; class names that are empty, not plain text or twins
    of each other (`edgeclip.domain.class_key`).

    A class name an earlier task learned too is allowed: each label belongs to its task (a
    prediction carries its ``task``; tables show ``3 (digits8)``; ``--labels`` takes ``3 (digits8)``).
    The two stay two classes with their own columns (no merging: a task's classes are one block
    of columns, which the gate and the fusion rely on)."""
    check_task_name(name)
    check_class_names(list(classes))
    if any(class_key(task.name) == class_key(name) for task in bundle.tasks):
        taken = ", ".join(f"'{task.name}'" for task in bundle.tasks[:8])
        raise DomainError(f"A task named '{name}' is already learned (tasks: {taken}); pass --name with a new "
                          "name to learn this folder as another task.")


def embed_domain(
    bundle: Bundle, domain: Domain, backend: str = "auto", batch_size: int | None = None,
    progress: ProgressFn | None = None,
    pixels_out: list[np.ndarray] | None = None, for_learning: bool = False,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[Path, str]]]:
    """Frozen image embeddings [N, D] of a domain's readable images with the exported encoder
    (torch-free), their class indices [N], and the unreadable files with the error message.

    Images are decoded as classify decodes them (`edgeclip.images`, the bundle's `preprocess`).
    Each unreadable file is named in a logged warning. DomainError when no image can be read and,
    ``for_learning``, when a class is left with fewer readable images than `MIN_IMAGES_PER_CLASS`
    or the task with fewer than `MIN_TASK_IMAGES` (before anything is learned). ``pixels_out``, when given, receives the
    preprocessed batches in the same order, for callers that need the pixels too (each image
    is decoded once). ``encode``: pixels [B,3,S,S] -> embeddings [B,D] in place of the exported
    encoder (MoE add-task embeds on its training GPU with the frozen torch model). ``batch_size``:
    images per encoder run (None: the exported encoder's `ImageEncoderRunner.batch_size`, 8 on a CPU;
    32 with ``encode``)."""
    cfg = bundle.meta.preprocess
    if encode is None:
        runner = ImageEncoderRunner(bundle, backend)
        encode, batch_size = runner.embed, batch_size or runner.batch_size
    batch_size = batch_size or 32
    label_of = {path: label for path, label in domain.samples}
    feats, labels, errors = [], [], []
    done = 0
    for batch in iter_batches([p for p, _ in domain.samples], cfg, batch_size=batch_size):
        errors.extend(batch.errors)
        if batch.paths:
            feats.append(encode(batch.pixels))
            if pixels_out is not None:
                pixels_out.append(batch.pixels)
            labels.extend(label_of[p] for p in batch.paths)
        done += len(batch.paths) + len(batch.errors)
        if progress:
            progress("embedding", done, len(domain.samples))
    use = "training" if for_learning else "evaluation"
    for _path, message in errors:
        log.warning("left out of %s: %s", use, message)
    if errors:
        log.warning("%d of %d %s images of %s are unreadable and were left out",
                    len(errors), len(domain.samples), use, display_path(domain.root))
    readable = {int(k): int(v) for k, v in zip(*np.unique(np.asarray(labels, np.int64), return_counts=True))}
    unreadable: dict[int, int] = {}
    for path, _message in errors:
        unreadable[label_of[path]] = unreadable.get(label_of[path], 0) + 1
    if for_learning:
        require_enough_images(domain, readable, unreadable)
    if not feats:
        raise DomainError(f"No image of {display_path(domain.root)} could be read.")
    return np.concatenate(feats), np.asarray(labels, np.int64), errors


def class_text_embeddings(bundle: Bundle, domain: Domain, backend: str = "auto") -> np.ndarray:
    """Frozen zero-shot classifier of the domain's classes: templates averaged, re-normalised."""
    return TextEncoderRunner(bundle, backend).class_embeddings(domain.classes, domain.templates)


def load_domain(directory: Path, shots: int | None, seed: int) -> Domain:
    """Read the ``train`` split of a domain folder, cut to ``shots`` images per class when given.

    Raises DomainError when the folder cannot be learned from, UsageError when ``shots`` < 1."""
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
    """Learn one domain into a new bundle version (the previous one stays intact until the switch).

    RAIL (METHODS.md section 3) torch-free through the exported encoders; MoE-Adapters (section 1)
    trained with torch for ``iterations`` steps on ``device``. Both fit the task's DDAS gate
    (section 2). Raises BundleError (no or damaged bundle, a concurrent writer), DomainError (an
    unusable domain, a task name already learned), UsageError (bad ``shots``), and
    MissingExtraError for MoE without torch."""
    bundle = Bundle.open(root)
    probe_writable(bundle.root)  # a read-only bundle is refused before the work, not after it
    chosen = get_learner(bundle.method)
    if chosen.needs_torch:
        require_torch(f"{bundle.method} add-task (training)")
    domain = load_domain(Path(domain_dir), shots, bundle.meta.method.settings.seed)
    name = name or domain.name
    check_new_task(bundle, domain.classes, name)
    if chosen.learns_from_images:  # MoE: gradients through the adapted backbone, with torch
        moe_task = import_torch_module("edgeclip.edgeapp.moe_task", f"{bundle.method} add-task (training)")
        return moe_task.add_moe_task(bundle, domain, name, iterations=iterations, device=device, progress=progress,
                                     options=moe_options or {})
    return add_rail_task(bundle, domain, name, backend=backend, progress=progress)


def fit_task_gate(bundle: Bundle, feats: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any], float]:
    """The task's DDAS autoencoder (state, settings) and its calibrated threshold, fitted on the
    frozen embeddings ``feats`` [N, D] float32 (METHODS.md section 2: a quantile of its own errors)."""
    from edgeclip.train.ddas import fit_gate

    gate = bundle.meta.gate
    seed = bundle.meta.method.settings.seed
    autoencoder, threshold = fit_gate(feats, kind=gate.kind, k=gate.k, quantile=gate.quantile, seed=seed)
    return autoencoder.state(), autoencoder.settings(), float(threshold)


def task_record(name: str, classes: Sequence[str], templates: Sequence[str], source: str, n_images: int,
                threshold: float, gate_settings: dict[str, Any], unreadable: int = 0,
                training: Training | None = None) -> Task:
    """The manifest's record of a learned task (``tasks[i]``); BundleError when a value does not fit
    the schema."""
    try:
        gate = msgspec.convert(gate_settings, TaskGate)
    except msgspec.ValidationError as exc:
        raise BundleError(f"invalid task record: {exc} (in `$.tasks[].gate`)") from None
    return Task(name=name, classes=list(classes), templates=list(templates), n_images=int(n_images),
                threshold=float(threshold), gate=gate, source=source, created_at=utc_now(),
                training=training, unreadable_images=int(unreadable))


def rail_learner(bundle: Bundle, learned: dict[str, np.ndarray] | None = None) -> Any:
    """The bundle's RAIL learner, restored from its inference tensors (``learned``, read from the
    bundle unless the caller has them already) and its learning state."""
    spec = get_learner(bundle.method)
    settings = bundle.meta.method.settings
    learned = read_learned(bundle) if learned is None else learned
    if not bundle.tasks:
        return spec.untrained(settings, learned, bundle.meta.embed_dim)
    if getattr(settings, "learner", None) is None:
        raise BundleError(f"Bundle {bundle.root} {bundle.label}: `$.method.settings.learner` is missing; "
                          "the learner cannot be restored.")
    state = rail_learning_state(bundle)
    for key in spec.head_keys:
        state[key] = learned[spec.tensor_name(key)]
    return spec.model_class().from_state(state, settings.learner)


def rail_learning_state(bundle: Bundle) -> dict[str, np.ndarray]:
    """The learning state of a RAIL version: ``rail_state.safetensors`` (RAIL dual; RAIL primal of an
    older edgeclip), then, for RAIL primal, every task's own file (``layout.rail_task_state``) in task
    order, their embeddings ``x`` and ``labels`` concatenated."""
    state = dict(bundle.tensors(RAIL_STATE)) if bundle.has(RAIL_STATE) else {}
    parts = [bundle.tensors(rail_task_state(i)) for i in range(len(bundle.tasks)) if bundle.has(rail_task_state(i))]
    if parts:
        state["x"] = np.concatenate([state.get("x", np.zeros((0, parts[0]["x"].shape[1]), np.float32))]
                                    + [p["x"] for p in parts])
        state["labels"] = np.concatenate([state.get("labels", np.zeros(0, np.int64))] + [p["labels"] for p in parts])
    return state


def add_rail_task(bundle: Bundle, domain: Domain, name: str, backend: str = "auto",
                  progress: ProgressFn | None = None) -> Bundle:
    """RAIL add-task, torch-free: embed the domain's images with the exported frozen encoder (unreadable
    files named in a warning and counted in the task record), then ``add_rail_embeddings``."""
    feats, labels, errors = embed_domain(bundle, domain, backend, progress=progress, for_learning=True)
    return add_rail_embeddings(bundle, name, feats, labels, domain.classes, domain.templates, str(domain.root),
                               backend=backend, progress=progress, unreadable=len(errors))


def add_rail_embeddings(bundle: Bundle, name: str, feats: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                        templates: Sequence[str], source: str, backend: str = "auto",
                        progress: ProgressFn | None = None, unreadable: int = 0) -> Bundle:
    """Learn a task from frozen image embeddings the caller already has (RAIL only, torch-free).

    feats: [N,D] float32, the bundle's frozen image embeddings (L2-normalised rows); labels: [N] int64
    indices into ``classes``; unreadable: how many of the task's files could not be read (recorded).
    Updates the closed-form head (RAIL, METHODS.md section 3), fits the task's DDAS gate (section 2),
    encodes the classes' prompts with the exported text encoder, re-composes the gated graph and writes
    a new version. Raises DomainError (a task name already learned or not a folder name, class names
    as ``check_class_names`` refuses them, templates without ``{}``), UsageError (shapes, a learner
    that does not learn from embeddings).
    """
    if get_learner(bundle.method).learns_from_images:
        raise UsageError(f"A '{bundle.method}' bundle learns from images, not embeddings: add the task from a folder.")
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels)
    dim = bundle.meta.embed_dim
    if feats.ndim != 2 or feats.shape[1] != dim or labels.shape != (len(feats),) or labels.dtype.kind not in "iu":
        raise UsageError(f"expected embeddings [N, {dim}] float32 and integer labels [N], got {list(feats.shape)} "
                         f"and {labels.dtype} {list(labels.shape)}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise UsageError(f"labels must index the {len(classes)} classes")
    norms = np.linalg.norm(feats, axis=1)
    if not np.all(np.isfinite(feats)) or not np.allclose(norms, 1.0, atol=1e-3):
        raise UsageError("embeddings must be the bundle's frozen image embeddings: finite, unit rows "
                         "(Classifier.embed_images gives them)")
    if len(classes) < 2:
        raise DomainError(f"a task needs at least 2 classes, got {len(classes)}")
    check_new_task(bundle, list(classes), name)
    check_templates(list(templates))
    counts = np.bincount(labels, minlength=len(classes))
    short = [c for c, n in zip(classes, counts) if n < MIN_IMAGES_PER_CLASS]
    if short or len(labels) < MIN_TASK_IMAGES:
        raise DomainError(f"too few embeddings: class(es) {', '.join(repr(c) for c in short[:5]) or '-'} have fewer "
                          f"than {MIN_IMAGES_PER_CLASS}, or the task fewer than {MIN_TASK_IMAGES}; {MINIMUM_TEXT}")
    learned = read_learned(bundle)
    offset = learned[ZS_TEXT].shape[0]
    learner = rail_learner(bundle, learned)
    cache = RailSolverCache(bundle.root) if isinstance(learner, RailPrimal) else None
    try:
        _learn_head(bundle, learner, cache, feats, labels + offset, offset + len(classes), progress)
        new_bundle = _write_rail_version(bundle, learner, name, feats, classes, templates, source, backend, learned,
                                         unreadable, progress)
    except BaseException:
        if cache is not None:
            cache.discard()
        raise
    if cache is not None:
        cache.commit(learner)
    return new_bundle


def _learn_head(bundle: Bundle, learner: Any, cache: RailSolverCache | None, feats: np.ndarray, labels: np.ndarray,
                n_classes: int, progress: ProgressFn | None) -> None:
    """Fold the task's embeddings into the RAIL head, saying what is solved: the new images only when
    the solver cache holds the parent's state, else every learned image (once)."""
    if cache is None:  # RAIL dual: kernel ridge, its factor grown by one block (train/rail.py)
        if progress:
            progress(f"solving the {bundle.method} head ({len(feats)} new images, {len(learner.labels)} learned "
                     "before)", 0, 0)
        learner.add_domain(feats, labels, n_classes)
        learner.solve()
        return
    resumed = cache.resume(learner)
    before = learner.n_seen
    learner.add_domain(feats, labels, n_classes)
    cache.start(learner)
    if resumed:
        what = f"RAIL head: folding {len(feats)} new images into the inverse (hidden {learner.hidden})"
    else:
        what = (f"RAIL head: no solver state for this version, folding all {learner.n_seen} images "
                f"({before} learned before) into the inverse (hidden {learner.hidden}, once)")
    log.info("%s", what)
    if progress:
        progress(what, 0, learner.pending)  # the stage's clock starts before the first batch, not after it
    try:
        learner.solve(progress=(lambda done, total: progress(what, done, total)) if progress else None)
    except OSError as exc:  # a full disk, a read-only bundle: one line, nothing written
        raise BundleError(f"cannot write the RAIL solver state ({learner.inverse.nbytes / 1e9:.2f} GB in "
                          f"BUNDLE/{RAIL_SOLVER_CACHE}): {exc.strerror or exc}") from exc


def _write_rail_version(bundle: Bundle, learner: Any, name: str, feats: np.ndarray, classes: Sequence[str],
                        templates: Sequence[str], source: str, backend: str, learned: dict[str, np.ndarray],
                        unreadable: int, progress: ProgressFn | None) -> Bundle:
    """The task's gate, class text and the new version (head already solved)."""
    def stage(name: str) -> None:  # a step of unknown length (total 0): the bar shows a spinner
        if progress:
            progress(name, 0, 0)

    spec = get_learner(bundle.method)
    stage("fitting the DDAS gate")
    gate_state, gate_settings, threshold = fit_task_gate(bundle, feats)
    stage(f"encoding {len(classes)} class names")
    text = TextEncoderRunner(bundle, backend).class_embeddings(list(classes), list(templates))
    zs_text = np.concatenate([learned[ZS_TEXT], text])
    kind = bundle.meta.gate.kind
    gates = gate_states(learned, kind) + [gate_state]
    sizes = [len(t.classes) for t in bundle.tasks] + [len(classes)]
    state = learner.state()
    new_learned = learned_tensors(zs_text, sizes, kind, gates, bundle.method, state)
    inference_keys = spec.head_keys
    record = task_record(name, classes, templates, source, len(feats), threshold, gate_settings, unreadable)
    stage("composing the gated graph and writing the new version")
    with bundle.new_version() as writer:
        writer.set_learner_record(learner.settings())
        writer.add_task(record)
        write_learned(writer, new_learned)
        if isinstance(learner, RailPrimal):  # a version adds only what this task learned
            writer.write_tensors(rail_task_state(len(bundle.tasks)), {"x": learner.x[-len(feats):],
                                                                      "labels": learner.labels[-len(feats):]})
        else:
            writer.write_tensors(RAIL_STATE, {k: v for k, v in state.items() if k not in inference_keys and v is not None})
        write_gated_graph(writer, new_learned)
    return writer.bundle


def write_gated_graph(writer: VersionWriter, learned: dict[str, np.ndarray]) -> None:
    """Re-compose the version's gated graph (and its int8 and fp16 twins when the version has those
    encoders, `edgeclip export --int8` / `--precision fp16`; an MoE version's fp16 adapted encoder is
    converted again from the new adapted encoder) in the writer's graph folder; the new graphs go to
    the bundle's shared graph store (``VersionWriter.graph_folder``)."""
    with writer.graph_folder() as graphs:
        meta = writer.meta
        write_head_graph(graphs, learned, meta)  # the decision from a cached embedding (edgeapp/library.py)
        if get_learner(meta.method.name).learns_from_images and meta.tasks:
            build_moe_gated_graph(graphs, learned, meta)  # onnx only: torch-free like the RAIL graph
        else:
            build_gated_graph(graphs, learned, meta)
            if has_int8(meta.files):
                build_gated_int8(graphs, learned, meta)
        if has_fp16(meta.files):
            write_fp16_graphs(graphs, learned, meta)

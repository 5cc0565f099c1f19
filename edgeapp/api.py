"""edgeclip's public Python API: the library the ``edgeclip`` CLI is a thin layer over.

    import edgeclip
    clf = edgeclip.load("models/bundles/default")          # onnxruntime, no torch
    for p in clf.classify(["photo.jpg", pil_image, uint8_array], top_k=3):
        print(p.path, p.label, p.score, p.route)
    clf = clf.add_task("birds", "./birds")                # a new bundle version

``load`` opens a bundle (torch-free); ``create`` makes one from an open_clip model (the ``train``
extra). Errors are ``edgeclip.errors`` exceptions (``UsageError`` for bad arguments, ``BundleError``
for a missing or damaged bundle, ``MissingExtraError`` when torch is needed and missing).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from edgeclip.bundle import Bundle, rollback
from edgeclip.discover import discover_images
from edgeclip.edgeapp.classify import (
    LabelSpace,
    Prediction,
    as_image,
    build_label_space,
    classify_batches,
    is_file_input,
    parse_labels,
)
from edgeclip.edgeapp.runtime import GatedRunner, ImageEncoderRunner, TextEncoderRunner
from edgeclip.edgeapp.tasks import ProgressFn, add_rail_embeddings, add_task
from edgeclip.errors import UsageError
from edgeclip.extras import import_torch_module
from edgeclip.images import PreprocessConfig, preprocess

ImageInput = Union[str, Path, Image.Image, np.ndarray]  # a file, a PIL image, or uint8 [H,W,3] RGB


@dataclass(frozen=True)
class TaskInfo:
    """A learned task: its name, classes (global label order), training images and DDAS threshold
    (in the gate's error units, METHODS.md section 2)."""

    name: str
    classes: list[str]
    n_images: int
    threshold: float


class Classifier:
    """A loaded bundle version with its runners (sessions open on first use).

    ``bundle``: the validated version read; methods that learn return a new Classifier on the new version.
    backend: auto, ort-cpu, ort-cuda, ort-trt or tensorrt; precision: fp32, fp16 or int8 (after
    ``edgeclip export --precision fp16`` / ``--int8``); threads: CPU threads of onnxruntime (None: its
    default); cuda_graph: CUDA graphs on ort-cuda for the gated graph (batches padded to fixed sizes,
    one captured graph each: more GPU memory). Raises UsageError, BackendUnavailableError, or
    BundleError (e.g. fp16/int8 graphs missing) when the gated graph's session cannot be made.
    """

    def __init__(self, bundle: Bundle, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                 cuda_graph: bool = False):
        self.bundle = bundle
        self.backend, self.precision, self.threads, self.cuda_graph = backend, precision, threads, cuda_graph
        self._gated = GatedRunner(bundle, backend, threads=threads, precision=precision,  # checks the graphs now
                                  cuda_graph=cuda_graph)
        self._image: ImageEncoderRunner | None = None
        self._text: TextEncoderRunner | None = None
        self._cfg = PreprocessConfig.of(bundle.meta.preprocess)

    # -- facts -----------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The bundle's root folder (holding every version)."""
        return self.bundle.root

    @property
    def version(self) -> str:
        """The id of the version this Classifier reads."""
        return self.bundle.version

    @property
    def tasks(self) -> list[TaskInfo]:
        """The learned tasks, in learning order."""
        return [TaskInfo(t.name, list(t.classes), t.n_images, t.threshold)
                for t in self.bundle.tasks]

    @property
    def text_runner(self) -> TextEncoderRunner:
        """The frozen text encoder's runner, opened on first use."""
        if self._text is None:
            self._text = TextEncoderRunner(self.bundle, self.backend, threads=self.threads)
        return self._text

    # -- inference -------------------------------------------------------------------------------
    def label_space(self, labels: Sequence[str] | str = ()) -> LabelSpace:
        """The learned classes, then the bundle's default zero-shot labels and ``labels``, with their
        frozen text embeddings (``LabelSpace.text`` [L,D] float32, unit rows).

        ``labels``: a list of label strings, or one string of comma-separated labels (``"cat,dog"``, as the
        CLI's ``--labels``; a label holding a comma needs the list form). Raises UsageError for an empty
        string or a label that is not a string."""
        if isinstance(labels, str):
            labels = parse_labels(labels, None)
        labels = list(labels)
        bad = [label for label in labels if not isinstance(label, str)]
        if bad:
            raise UsageError(f"labels must be strings, got {bad[0]!r:.100} ({type(bad[0]).__name__})")
        return build_label_space(self.bundle, labels, self.text_runner.class_embeddings)

    def _pixels(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, 3, self._cfg.image_size, self._cfg.image_size), np.float32)
        return np.stack([preprocess(as_image(img), self._cfg) for img in images])  # [B,3,S,S] float32

    def classify(self, images: ImageInput | Iterable[ImageInput], labels: Sequence[str] | str = (), top_k: int = 5,
                 batch_size: int = 16) -> list[Prediction]:
        """One ``Prediction`` per input, in input order: label, score, route (task name or "zero-shot"),
        top-k and error (the reason a file could not be read; the other fields are then empty).

        images: files, folders (their images), PIL images or uint8 [H,W,3] RGB arrays (one or an iterable); labels: extra
        zero-shot labels beside the learned classes (a list, or one comma-separated string, ``label_space``).
        ``list(classify_iter(...))``: for many inputs, ``classify_iter`` keeps memory flat. Raises UsageError
        (nothing to classify into; None or another type, or a bad array, among the inputs). An image without
        pixels (0x0) gets an error row, as an unreadable file does.
        """
        return list(self.classify_iter(images, labels, top_k=top_k, batch_size=batch_size))

    def classify_iter(self, images: ImageInput | Iterable[ImageInput], labels: Sequence[str] | str = (), top_k: int = 5,
                      batch_size: int = 16, *, workers: int | None = None,
                      embeddings: bool = False) -> Iterator[Prediction]:
        """Yield one ``Prediction`` per input, in input order, as each batch is classified.

        ``images`` is read lazily (a generator of a million paths or arrays is fine): memory is bounded by
        the batch and the decode queue (two batches ahead), not by the input's length. Folders are replaced
        by their images (one folder's listing at a time). workers: decoding threads (default one per core);
        embeddings: also set each Prediction's ``embedding`` ([D] float32, unit norm). The arguments and the
        label space are checked now, before the first item is read: raises UsageError (top_k < 1,
        batch_size < 1, nothing to classify into); a bad array raises UsageError when it is reached.
        """
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1, not {top_k}")
        if batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, not {batch_size}")
        single = isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray))
        if images is None or not (single or isinstance(images, Iterable)):  # a Path is not Iterable
            raise UsageError(f"images must be files, folders, PIL images or uint8 [H, W, 3] RGB arrays (one or an "
                             f"iterable), got {type(images).__name__}")
        items: Iterable[ImageInput] = [images] if single else images  # type: ignore[list-item]
        space = self.label_space(labels)
        batches = classify_batches(self.bundle, _expand_folders(items), self._gated, space, top_k=top_k,
                                   batch_size=batch_size, workers=workers, embeddings=embeddings)
        return (pred for batch in batches for pred in batch)

    def embed_images(self, images: Iterable[Image.Image | np.ndarray | str | Path]) -> np.ndarray:
        """Frozen CLIP image embeddings [N,D] float32, unit rows (the plain encoder, no task).

        images: files, PIL images or uint8 [H,W,3] RGB arrays. Raises UsageError on a bad array, OSError
        (PIL's) when a file cannot be read.
        """
        if self._image is None:
            self._image = ImageEncoderRunner(self.bundle, self.backend, threads=self.threads, precision=self.precision)
        loaded = [Image.open(x) if isinstance(x, (str, Path)) else x for x in images]
        return self._image.embed(self._pixels(loaded))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Frozen CLIP text embeddings [N,D] float32, unit rows, of the texts as given (no template)."""
        return self.text_runner.embed(list(texts))

    # -- learning --------------------------------------------------------------------------------
    def add_task(self, name: str | None, data: str | Path | Sequence[tuple[Image.Image | np.ndarray, str]], *,
                 shots: int | None = None, iterations: int | None = None, device: str = "auto",
                 progress: ProgressFn | None = None) -> Classifier:
        """Learn a new task into a new bundle version and return a Classifier on it.

        name: the task's name (None: the folder's meta.json name, else its name); data: a domain folder
        (DIR/<class>/* or DIR/train/<class>/*), or (image, class name) pairs, which are written to a
        temporary domain folder first (a name is then required). RAIL learns torch-free; MoE trains with torch.
        Raises DomainError (too few classes or images, a task name already learned), UsageError (a bad
        class name or image among the pairs), MissingExtraError (MoE without torch).
        """
        if isinstance(data, (str, Path)):
            learned = add_task(self.root, Path(data), name=name, shots=shots, iterations=iterations, device=device,
                               backend=self.backend, progress=progress)
        else:
            if not name:
                raise UsageError("a task learned from (image, label) pairs needs a name")
            with tempfile.TemporaryDirectory(prefix="edgeclip-task-") as tmp:
                folder = _write_domain(Path(tmp) / name, data)
                learned = add_task(self.root, folder, name=name, shots=shots, iterations=iterations, device=device,
                                   backend=self.backend, progress=progress)
        return self._on(learned)

    def add_task_embeddings(self, name: str, embeddings: np.ndarray, labels: Sequence[int] | np.ndarray,
                            classes: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)) -> Classifier:
        """RAIL: learn a task from frozen embeddings the caller already has ([N,D] float32 from
        ``embed_images``; labels [N] index ``classes``). Returns a Classifier on the new version.

        RAIL closed form (METHODS.md section 3), torch-free. With retention (``keep``) the version this
        Classifier read may be pruned by the write: use the returned Classifier. Raises UsageError for an MoE
        bundle, shapes other than [N,D] and [N], labels outside ``classes``, or ``classes`` given as one
        string; DomainError for a task name already learned, names that could not name a domain folder
        (``/``), or a template without ``{}`` (as add-task refuses them). ``templates`` may be one string (one template).
        """
        if isinstance(classes, str):
            raise UsageError(f"classes must be a list of class names, not the string {classes!r:.100}")
        if isinstance(templates, str):
            templates = [templates]  # one template
        learned = add_rail_embeddings(self.bundle, name, embeddings, np.asarray(labels), list(classes),
                                      list(templates), source="embeddings", backend=self.backend)
        return self._on(learned)

    def rollback(self, to: str | None = None) -> Classifier:
        """Make an earlier version current (the parent of this Classifier's version unless ``to`` names
        one); a Classifier on it. Acts only on the version this object read: refuses when another
        process has made another version current since (``Classifier.reload`` first).

        Raises BundleError when CURRENT moved, there is no earlier version, or ``to`` names no complete
        version.
        """
        rollback(self.root, to, expect=self.bundle)
        return self.reload()

    def reload(self) -> Classifier:
        """A Classifier on the bundle's current version (BundleError when it cannot be opened)."""
        return self._on(Bundle.open(self.root))

    def _on(self, bundle: Bundle) -> Classifier:
        """A Classifier on ``bundle`` (the version a write made, not whatever is current by then)."""
        return Classifier(bundle, self.backend, self.precision, self.threads, self.cuda_graph)


def _expand_folders(items: Iterable[ImageInput]) -> Iterator[ImageInput]:
    """Folders become their images (recognised by content, hidden files skipped), in place, lazily."""
    for item in items:
        if is_file_input(item) and Path(os.fsdecode(item)).is_dir():  # type: ignore[arg-type]
            yield from discover_images([Path(os.fsdecode(item))]).images  # type: ignore[arg-type]
        else:
            yield item


def _write_domain(folder: Path, pairs: Sequence[tuple[Image.Image | np.ndarray, str]]) -> Path:
    for i, (image, label) in enumerate(pairs):
        if not isinstance(label, str) or not label.strip() or "/" in label or label.startswith("."):
            raise UsageError(f"class name {label!r} must be a non-empty name without '/' or a leading '.'")
        target = folder / label
        target.mkdir(parents=True, exist_ok=True)
        as_image(image).convert("RGB").save(target / f"{i:06d}.png")
    return folder


def load(bundle: str | Path, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
         cuda_graph: bool = False) -> Classifier:
    """Open a bundle's current version for classification and learning (torch-free).

    backend: auto, ort-cpu, ort-cuda, ort-trt or tensorrt; precision: fp32, fp16 or int8 (after
    ``edgeclip export --precision fp16`` / ``--int8``); cuda_graph: CUDA graphs on ort-cuda (Classifier).
    Raises BundleError, BackendUnavailableError, UsageError.
    """
    return Classifier(Bundle.open(Path(bundle)), backend, precision, threads, cuda_graph)


def create(bundle: str | Path, model: str = "ViT-B-16", pretrained: str | None = None, method: str = "rail-primal",
           random_weights: bool = False, seed: int = 0, zero_shot_labels: Sequence[str] | str = (),
           tokenizer: str | None = None, keep: int = 0, **settings: Any) -> Classifier:
    """Create a bundle from an open_clip model (the ``train`` extra): the counterpart of ``edgeclip init``.

    pretrained: an open_clip tag (e.g. "openai") or a checkpoint file; random_weights with seed for offline
    tests; keep: versions kept after each write (0 = all); tokenizer: a tokenizer.json for Hugging Face tokenizer models (SigLIP, docs/MODELS.md). ``settings``: the learner's and the gate's settings (hidden, gamma, gamma_kernel, lam, beta, fusion, moe, moe_train, gate_kind, gate_k, gate_quantile; ``edgeapp.tasks.init_sections``), the schema's defaults for the rest. Raises
    MissingExtraError without torch, BackboneLoadError when the weights cannot be had.
    """
    labels = parse_labels(zero_shot_labels, None) if isinstance(zero_shot_labels, str) else list(zero_shot_labels)
    create_module = import_torch_module("edgeclip.edgeapp.create", "creating a bundle (reading open_clip models)")
    created = create_module.init_bundle(Path(bundle), model, pretrained, random_weights=random_weights, seed=seed,
                                        method=method, zero_shot_labels=labels,
                                        tokenizer=tokenizer, keep=keep, **settings)
    return Classifier(created)

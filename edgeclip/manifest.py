"""The typed schema of a bundle version's ``manifest.json`` (msgspec Structs).

Every section has a Struct; each default is defined here once. ``validate_manifest`` checks a
manifest dict against the schema: an unknown field, a missing required field or a value of the
wrong type or range is refused with a ``BundleError`` naming the field (``$.gate.k``). File names
in ``files`` and ``tensors`` must be plain relative names (no ``..``, no absolute path, no hidden
component), so that no manifest can point outside its bundle.

The bundle store validates every manifest when it reads it and before it writes it
(``edgeclip.bundle``). Code reads typed values through ``Bundle.meta`` (a ``Manifest``); the plain
dict (``Bundle.manifest``) stays available, exactly as written.

Sections (and who writes them):

- ``backbone``: model name, weights source, embedding size, text context length (init);
- ``preprocess``: image size, normalisation, resize rule (init);
- ``method``: learner name and its settings; RAIL adds ``settings.learner`` at each add-task;
- ``gate``: the DDAS gate kind and its fit settings (init);
- ``zero_shot``: prompt templates, logit scale, default extra labels (init);
- ``tasks``: one record per learned task, in learning order (add-task);
- ``files``: every file of the version with its sha256 and size; ``tensors``: the shapes of each
  safetensors file (the store);
- ``quantization``: how the int8 encoder was made (``export --int8``);
- ``retention``: how many versions the store keeps (``init --keep``).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Mapping

import msgspec

from edgeclip.errors import BundleError

SCHEMA_VERSION = 1
VERSION_RE = re.compile(r"^v(\d{4,})$")
# one path component of a bundle file: starts with a letter, digit or underscore (never a dot)
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$")

# Every default a manifest field has, defined once (the papers' values; METHODS.md):
DEFAULT_TEMPLATES = ("a photo of a {}.",)  # one prompt, as RAIL and MoE-Adapters' X-TAIL
DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained temperature (OpenAI weights); init records the model's own
DEFAULT_BETA = 0.8  # RAIL-Fusion's weight of the learned scores
DEFAULT_FUSION = "ddas"  # edgeclip's gate; "paper" is RAIL's zero-shot top-1 rule
DEFAULT_HIDDEN = 15000  # RAIL primal random features
DEFAULT_GAMMA = 0.1  # RAIL primal ridge
DEFAULT_KERNEL_GAMMA = 0.1  # RAIL dual RBF kernel width
DEFAULT_LAMBDA = 1e-3  # RAIL dual ridge
DEFAULT_GATE_KIND = "linear"  # the DDAS gate's autoencoder: linear (closed form, torch-free) or mlp
DEFAULT_GATE_K = 4  # principal directions of the linear DDAS gate (measured best, docs/LEARNERS.md)
DEFAULT_GATE_QUANTILE = 0.95  # a task's gate threshold: this quantile of its held-out reconstruction errors
# MoE-Adapters (METHODS.md section 1): the adapters (``MoEAdapters``, read by ``train.moe.MoEConfig.of``) ...
DEFAULT_MOE_EXPERTS = 22  # experts per block per encoder (the paper's pool)
DEFAULT_MOE_TOP_K = 2  # experts each token is routed to
DEFAULT_MOE_BOTTLENECK = 64  # each expert's width r
DEFAULT_MOE_SCALE = 0.1  # expert output scale
DEFAULT_MOE_DROPOUT = 0.1  # inside each expert, after the ReLU
DEFAULT_MOE_NOISE_EPS = 0.01  # added to the noisy gate's std, so the noise never vanishes
DEFAULT_MOE_ENCODERS = ("image", "text")  # the adapted encoders
# ... and each task's training recipe (``MoERecipe``, read by ``edgeapp.moe_task.task_recipe``)
DEFAULT_MOE_ITERATIONS = 1000  # optimizer steps per task (the official full- and 5-shot scripts)
DEFAULT_MOE_BATCH_SIZE = 64  # images per step over all ranks
DEFAULT_MOE_LR = 1e-3  # AdamW peak rate (the paper tunes 1e-4 to 5e-3 per dataset: preset moe-paper)
DEFAULT_MOE_WARMUP = 100  # warm-up steps
DEFAULT_MOE_WARMUP_RULE = "capped"  # edgeclip's: warm-up at most a tenth of the iterations; "fixed": the paper's
DEFAULT_MOE_FREEZE_RULE = "strict"  # edgeclip's activate-freeze: learned tasks never drift; "paper": top-k per block
FREEZE_RULES = ("strict", "paper")  # MoE activate-freeze rules (train.moe.freeze_experts)
WARMUP_RULES = ("capped", "fixed")  # MoE warm-up rules (edgeapp.moe_task.warmup_steps)

Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
# Bounds far above any CLIP (input side 224-448, context 64-256) that keep a hostile manifest from asking for
# terabytes of pixels or positions (a MemoryError instead of a one-line error).
MAX_IMAGE_SIZE = 4096
MAX_CONTEXT_LENGTH = 4096
ContextLength = Annotated[int, msgspec.Meta(ge=1, le=MAX_CONTEXT_LENGTH)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every manifest section: unknown fields are refused."""


class Weights(_Section):
    """Where the backbone's weights come from: the seed, an open_clip tag or a checkpoint file."""

    kind: Literal["random", "tag", "file"]
    ref: str  # the seed (random), the open_clip tag, or the checkpoint's path
    sha256: Sha256 | None = None  # of the checkpoint file (kind "file")
    quick_gelu: bool | None = None  # the activation, decided once at init (None: a bundle from before)


class TextSide(_Section):
    """The model's own text side, read at init (``train.backbone.text_side``); the runtime follows it."""

    tokenizer: Literal["clip-bpe", "hf"]
    file: str  # the tokenizer's file in the bundle
    clean: str  # "lower", "whitespace" or "canonicalize" (edgeclip.tokenizer)
    context_length: ContextLength
    pad_id: int
    embed_dim: PosInt
    pool: str  # the text tower's pooling: argmax (end-of-text token), last, first, eos
    logit_scale: Annotated[float, msgspec.Meta(gt=0.0)]
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    logit_bias: float | None = None  # SigLIP
    sot_id: int | None = None  # clip-bpe
    eot_id: int | None = None  # clip-bpe
    hf_name: str | None = None  # hf
    padding_side: str | None = None  # hf
    truncation_side: str | None = None  # hf
    strip_sep_id: int | None = None  # hf
    checked: bool = False  # the runtime tokenizer was compared with open_clip's at init


class Backbone(_Section):
    """The frozen backbone: model name, weights source and the facts read from it at init."""
    model: str  # open_clip model name or an edgeclip config (edgeclip-tiny, ...)
    weights: Weights
    embed_dim: PosInt | None = None  # D, the embedding size
    context_length: ContextLength | None = None  # the text encoder's token count
    image_tower: str | None = None  # open_clip's image tower class (with the timm model for timm towers)
    text: TextSide | None = None  # None: a bundle from before (CLIP BPE, logit scale 100)


PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0)]
Interpolation = Literal["bicubic", "bilinear"]  # Pillow's filters that open_clip's eval transform uses
ResizeMode = Literal["shortest", "longest", "squash"]  # open_clip's resize modes (edgeclip.images)


class Preprocess(_Section, frozen=True):
    """The image preprocessing: open_clip's eval transform (``edgeclip.images.preprocess``).

    ``image_size`` S in pixels (the input is [3, S, S]); ``mean`` and ``std`` per RGB channel on the
    [0, 1] scale (finite, ``std`` > 0); ``interpolation`` and ``resize_mode`` as open_clip names them;
    ``exact``: decode at full resolution (open_clip's pixels bit for bit) instead of the fast reduced
    decode. Decoding a manifest checks every value (``validate_manifest``, ``parse_section``); a
    struct built in code is trusted (msgspec's rule) except for finiteness. Frozen and hashable:
    the runtime uses it as it is, built once from ``Bundle.meta.preprocess``."""

    image_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_IMAGE_SIZE)]
    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]
    interpolation: Interpolation = "bicubic"
    resize_mode: ResizeMode = "shortest"
    exact: bool = False

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError(f"mean and std must be finite numbers, not {self.mean!r} and {self.std!r}")

    def with_exact(self, exact: bool | None) -> Preprocess:
        """This preprocessing with ``exact`` overridden, unless ``exact`` is None (then ``self``)."""
        if exact is None or exact == self.exact:
            return self
        return msgspec.structs.replace(self, exact=bool(exact))


class _LearnerSettings(_Section, omit_defaults=False):
    """What every learner's settings hold: the fusion weight, the fusion rule and the seed."""

    beta: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = DEFAULT_BETA  # weight of the learned scores
    fusion: Literal["ddas", "paper"] = DEFAULT_FUSION  # how images are routed to the learned head
    seed: int = 0  # of the learner's random parts (RAIL's projection, MoE's experts) and of few-shot draws


class RailPrimalSettings(_LearnerSettings):
    """RAIL primal (random-feature ridge): ``hidden`` features, ridge ``gamma``, embedding size
    ``dim``; ``learner`` is the learner's own record (``RailPrimal.settings()``), written by add-task."""

    hidden: PosInt = DEFAULT_HIDDEN
    gamma: float = DEFAULT_GAMMA
    dim: PosInt | None = None
    learner: dict[str, Any] | None = None


class RailDualSettings(_LearnerSettings):
    """RAIL dual (kernel ridge): RBF width ``gamma_kernel``, ridge ``lam``, embedding size ``dim``;
    ``learner`` as for the primal."""

    gamma_kernel: float = DEFAULT_KERNEL_GAMMA
    lam: float = DEFAULT_LAMBDA
    dim: PosInt | None = None
    learner: dict[str, Any] | None = None


class MoEAdapters(_Section, omit_defaults=False):
    """MoE-Adapters' adapters (METHODS.md section 1), read by ``train.moe.MoEConfig.of``: E experts
    per block per encoder, each token routed to ``top_k``; expert width ``bottleneck`` r, output
    ``scale``, ``dropout`` after the ReLU; noisy top-k gating while training (std + ``noise_eps``);
    the adapted ``encoders``; adapters in the ``last_blocks`` blocks only (None: all); ``dense``: run
    every expert, weighted by the sparse gate. Every field is written (the file keeps all ten keys,
    as every release wrote them); ``MoEConfig`` checks the ranges."""

    n_experts: int = DEFAULT_MOE_EXPERTS
    top_k: int = DEFAULT_MOE_TOP_K
    bottleneck: int = DEFAULT_MOE_BOTTLENECK
    scale: float = DEFAULT_MOE_SCALE
    dropout: float = DEFAULT_MOE_DROPOUT
    noisy_gating: bool = True
    noise_eps: float = DEFAULT_MOE_NOISE_EPS
    encoders: tuple[str, ...] = DEFAULT_MOE_ENCODERS
    last_blocks: int | None = None
    dense: bool = False


class MoERecipe(_Section, omit_defaults=False):
    """MoE-Adapters' training recipe of each task, read by ``edgeapp.moe_task.task_recipe``:
    ``iterations`` optimizer steps, ``batch_size`` images per step over all ranks, AdamW peak ``lr``,
    ``warmup`` steps and their rule (``capped``: at most a tenth of the iterations; ``fixed``: the
    paper's), the activate-freeze rule (``strict`` or ``paper``). A bundle made with a preset also
    records its name (``preset``) and its learning rates per dataset (``lr_by_dataset``: {"full" |
    "few": {dataset: lr}}); both are absent from the file otherwise (UNSET), as releases wrote them.
    The rules and ranges are checked where the recipe is used (``TrainSettings``, ``task_recipe``),
    as when older bundles were written, so that every bundle written before opens."""

    iterations: int = DEFAULT_MOE_ITERATIONS
    batch_size: int = DEFAULT_MOE_BATCH_SIZE
    lr: float = DEFAULT_MOE_LR
    warmup: int = DEFAULT_MOE_WARMUP
    warmup_rule: str = DEFAULT_MOE_WARMUP_RULE  # absent from bundles of November 2026 before the rule existed
    freeze_rule: str = DEFAULT_MOE_FREEZE_RULE
    preset: str | msgspec.UnsetType = msgspec.UNSET
    lr_by_dataset: dict[str, dict[str, float]] | msgspec.UnsetType = msgspec.UNSET


class MoESettings(_LearnerSettings):
    """MoE-Adapters: ``moe`` the adapters' configuration, ``train`` the training recipe; their
    defaults are the ``DEFAULT_MOE_*`` constants above."""

    moe: MoEAdapters = msgspec.field(default_factory=MoEAdapters)
    train: MoERecipe = msgspec.field(default_factory=MoERecipe)


class _MethodBase(_Section, tag_field="name"):
    """The learner, tagged by its registry name (``method.name``), and its settings."""

    @property
    def name(self) -> str:
        """The learner's registry name (the tag): ``rail-primal``, ``rail-dual`` or ``moe``."""
        return type(self).__struct_config__.tag  # type: ignore[return-value]


class RailPrimalMethod(_MethodBase, tag="rail-primal"):
    """``method`` of a RAIL primal bundle."""

    settings: RailPrimalSettings = msgspec.field(default_factory=RailPrimalSettings)


class RailDualMethod(_MethodBase, tag="rail-dual"):
    """``method`` of a RAIL dual bundle."""

    settings: RailDualSettings = msgspec.field(default_factory=RailDualSettings)


class MoEMethod(_MethodBase, tag="moe"):
    """``method`` of an MoE-Adapters bundle."""

    settings: MoESettings = msgspec.field(default_factory=MoESettings)


# The learner and its settings: a tagged union on ``name`` (the learner registry's names; a test keeps them equal)
Method = RailPrimalMethod | RailDualMethod | MoEMethod
METHODS: dict[str, type[_MethodBase]] = {cls.__struct_config__.tag: cls  # type: ignore[misc]
                                         for cls in (RailPrimalMethod, RailDualMethod, MoEMethod)}
LearnerSettings = RailPrimalSettings | RailDualSettings | MoESettings


def method_of(name: str, **settings: Any) -> Method:
    """The typed ``method`` section of learner ``name`` with ``settings`` (the rest at the schema's
    defaults). Raises BundleError for an unknown name or a setting that does not fit."""
    if name not in METHODS:
        raise BundleError(f"invalid manifest: unknown method {name!r} at `$.method.name`; expected one of "
                          f"{', '.join(METHODS)}")
    try:
        return msgspec.convert({"name": name, "settings": settings}, Method)
    except msgspec.ValidationError as exc:
        raise BundleError(f"invalid manifest: {exc} (in `$.method`)") from None


class GateSettings(_Section):
    """Extra settings of the DDAS gate's decision."""
    route_rule: str | None = None  # train.ddas.ROUTE_RULES; None: the default rule


class Gate(_Section, omit_defaults=False):
    """The DDAS gate: one autoencoder per task, thresholded at a quantile of its training errors."""

    kind: Literal["linear", "mlp"] = DEFAULT_GATE_KIND
    k: PosInt = DEFAULT_GATE_K  # linear autoencoder rank
    quantile: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = DEFAULT_GATE_QUANTILE
    settings: GateSettings | None = None


class ZeroShot(_Section):
    """The zero-shot side: prompt templates, logit scale (CLIP: 100) and the extra zero-shot labels."""
    templates: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    logit_scale: Annotated[float, msgspec.Meta(gt=0.0)] = DEFAULT_LOGIT_SCALE
    labels: list[str] = msgspec.field(default_factory=list)


class TaskGate(_Section):
    """One task's fitted autoencoder (``Autoencoder.settings()``)."""

    kind: Literal["linear", "mlp"]
    k: PosInt | None = None
    hidden: PosInt | None = None


class Training(_Section):
    """What MoE training reported for a task."""

    iterations: NonNegInt | None = None
    final_loss: float | None = None
    images_per_s: float | None = None
    experts_frozen: NonNegInt | None = None
    experts_added: NonNegInt | None = None
    skipped_images: NonNegInt | None = None
    lr: float | None = None  # the learning rate the task was trained with
    warmup: NonNegInt | None = None  # its warm-up steps


class Task(_Section):
    """One learned task (domain): its classes in label order, gate threshold and provenance."""
    name: Annotated[str, msgspec.Meta(min_length=1)]
    classes: Annotated[list[str], msgspec.Meta(min_length=1)]
    threshold: Annotated[float, msgspec.Meta(gt=0.0)]  # the gate's error threshold
    templates: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    n_images: NonNegInt = 0
    gate: TaskGate | None = None
    source: str | None = None  # the domain folder it was learned from
    created_at: str | None = None
    training: Training | None = None
    unreadable_images: NonNegInt = 0  # training files that could not be read (left out, named in a warning)


class FileEntry(_Section):
    """One file of a version: size in bytes, sha256, and whether it lies in the shared graph store."""
    blob: bool = False
    sha256: Sha256 | None = None  # None only while a version is being written
    size: NonNegInt | None = None


class QuantizedEncoder(_Section):
    """How the int8 image encoder was quantised (method, weight and activation types, op types)."""
    method: str
    weights: str
    activations: str
    op_types: list[str] = msgspec.field(default_factory=list)
    onnxruntime: str | None = None


class Quantization(_Section):
    """The quantised graphs of the version (``edgeclip export --int8``)."""
    image_encoder: QuantizedEncoder


class Retention(_Section):
    """How many versions a write keeps (``edgeclip retention``)."""
    keep: NonNegInt = 0  # versions kept after each write (0: all); see bundle.prune


class Manifest(_Section, omit_defaults=False):
    """A whole version's manifest."""

    backbone: Backbone
    preprocess: Preprocess
    method: Method
    schema_version: int = SCHEMA_VERSION
    edgeclip_version: str | None = None
    version: str | None = None
    parent: str | None = None
    created_at: str | None = None
    bundle_created_at: str | None = None
    gate: Gate = msgspec.field(default_factory=Gate)
    zero_shot: ZeroShot = msgspec.field(default_factory=ZeroShot)
    tasks: list[Task] = msgspec.field(default_factory=list)
    files: dict[str, FileEntry] = msgspec.field(default_factory=dict)
    tensors: dict[str, dict[str, list[NonNegInt]]] = msgspec.field(default_factory=dict)
    quantization: Quantization | None = None
    retention: Retention = msgspec.field(default_factory=Retention)

    @property
    def embed_dim(self) -> int:
        """D, the width of the backbone's embeddings; BundleError when the manifest does not record it."""
        dim = self.backbone.embed_dim or (self.backbone.text.embed_dim if self.backbone.text else None)
        if dim is None:
            raise BundleError("invalid manifest: `$.backbone.embed_dim` is missing")
        return dim


def check_file_name(name: str) -> str:
    """Refuse a bundle file name that is not a plain relative name: ``graphs/gated.onnx`` passes;
    an absolute path, ``..``, ``.``, an empty or hidden component, a backslash or a control
    character raise ``BundleError`` (the name is not echoed beyond its first 80 characters)."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or len(name) > 400 or not all(_NAME_PART.match(p) for p in parts) or name == "manifest.json":
        raise BundleError(f"invalid bundle file name {name[:80]!r}: expected a plain relative name "
                          "such as 'graphs/gated.onnx'")
    return name


def check_version_name(name: Any) -> str:
    """A version name ``vNNNN``; BundleError otherwise."""
    if not isinstance(name, str) or not VERSION_RE.match(name):
        raise BundleError(f"invalid version name {str(name)[:40]!r}: expected v0001, v0002, ...")
    return name


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise BundleError(f"invalid manifest: non-finite number at `{where}`")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def validate_manifest(data: Mapping[str, Any], complete: bool = True) -> Manifest:
    """The typed manifest of ``data``; ``BundleError`` naming the field when it does not fit.

    ``complete``: also require what a committed version has (schema version, version name and
    every file's sha256 and size); ``False`` for a manifest still being written.
    """
    if not isinstance(data, Mapping):
        raise BundleError("invalid manifest: expected a JSON object")
    _check_finite(dict(data), "$")
    try:
        meta = msgspec.convert(dict(data), Manifest)
    except msgspec.ValidationError as exc:
        raise BundleError(f"invalid manifest: {exc}") from None
    if meta.schema_version != SCHEMA_VERSION:
        raise BundleError(f"manifest schema version {meta.schema_version!r}; this edgeclip reads schema "
                          f"{SCHEMA_VERSION}. Upgrade edgeclip or re-create the bundle.")
    for name in list(meta.files) + list(meta.tensors):
        check_file_name(name)
    if meta.backbone.text is not None:
        check_file_name(meta.backbone.text.file)  # the tokenizer file must be a plain name of the bundle
    for name in meta.tensors:
        if name not in meta.files:
            raise BundleError(f"invalid manifest: `$.tensors` names '{name}', which is not in `$.files`")
    names = [t.name for t in meta.tasks]
    if len(set(names)) != len(names):
        raise BundleError("invalid manifest: two tasks share a name at `$.tasks`")
    if complete:
        check_version_name(meta.version)
        if meta.parent is not None:
            check_version_name(meta.parent)
        for name, entry in meta.files.items():
            if entry.sha256 is None or entry.size is None:
                raise BundleError(f"invalid manifest: `$.files.{name}` lacks its sha256 or size")
    return meta


_SECTIONS: dict[str, type] = {"method": Method, "gate": Gate, "zero_shot": ZeroShot, "preprocess": Preprocess,
                               "backbone": Backbone}


def parse_section(manifest: Mapping[str, Any], name: str) -> Any:
    """One typed section of a (possibly partial) manifest dict, its defaults filled in: ``method``,
    ``gate``, ``zero_shot``, ``preprocess`` or ``backbone``. A missing optional section gives its
    defaults. Raises BundleError naming the field that does not fit."""
    try:
        return msgspec.convert(manifest.get(name) or {}, _SECTIONS[name])
    except msgspec.ValidationError as exc:
        raise BundleError(f"invalid manifest: {exc} (in `$.{name}`)") from None


def to_builtins(meta: msgspec.Struct) -> dict[str, Any]:
    """The JSON-ready dict of a typed manifest or section, as ``json.loads`` reads it back: fields at
    their default left out, arrays as lists (``preprocess.mean`` is a tuple in memory)."""
    return _json_arrays(msgspec.to_builtins(meta))


def _json_arrays(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_arrays(v) for v in value]
    return value


def full_dict(value: Any) -> Any:
    """A typed manifest value as plain JSON-ready data with every field, defaults and ``None``
    included (for reports such as ``edgeclip tasks --format json``); ``to_builtins`` leaves
    defaults out, as the manifest file does."""
    if isinstance(value, msgspec.Struct):
        data = {f: full_dict(getattr(value, f)) for f in value.__struct_fields__
                if getattr(value, f) is not msgspec.UNSET}
        tag_field, tag = value.__struct_config__.tag_field, value.__struct_config__.tag
        return {tag_field: tag, **data} if tag_field else data
    if isinstance(value, dict):
        return {k: full_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [full_dict(v) for v in value]
    return value

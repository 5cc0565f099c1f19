"""The frozen open_clip backbone: resolve a model name and weights source, build, freeze.

Three steps kept apart (open_clip's ``create_model`` does all of them in one function):
``resolve_weights`` decides where the weights come from (and, once, the activation: QuickGELU
or GELU), ``load_backbone`` builds the model and loads them, ``Backbone`` encodes images and
texts. Offline, a pretrained tag that is not in the local cache fails at once with a message
that says how to pass a local file.

Model families (docs/MODELS.md): ``check_supported`` refuses, in one line naming the model and
the reason, what edgeclip cannot run right; ``text_side`` reads the text side of each model from
its own open_clip config (tokenizer kind and file, cleaning, context length, pad/end rules,
pooling, width, logit scale and bias) into the manifest's ``backbone.text``, builds the
torch-free runtime tokenizer from it and checks it against open_clip's own tokenizer.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import msgspec
import numpy as np

from edgeclip.bundle import sha256_of
from edgeclip.errors import BackboneLoadError, MissingExtraError, UnknownModelError, UsageError
from edgeclip.layout import HF_TOKENIZER_FILE, VOCAB_FILE
from edgeclip.manifest import Preprocess, TextSide, Weights
from edgeclip.models import CONFIG_DIR
from edgeclip.tokenizer import ClipTokenizer, HFTokenizer, default_vocab_path
from edgeclip.train.registry import get_learner

_HUB_HOST = ("huggingface.co", 443)
log = logging.getLogger(__name__)


class _OpenClipNotices(logging.Filter):
    """Drops open_clip's informational notices, which it logs on the root logger (e.g. "No pretrained
    weights loaded ... initialized randomly" for --random-weights); its errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "open_clip" not in record.pathname


def _quiet_create_model(open_clip: Any, model: str, pretrained: str | None = None, quick_gelu: bool = False) -> Any:
    """The fp32 CPU model ``model``, random (``pretrained`` None) or with the weights of the file ``pretrained``.

    open_clip's own models come from ``open_clip.create_model``, with its root-logger notices filtered for
    the duration of the call only (no process-wide logging state is changed); edgeclip's configs are built
    by ``_build_own`` (open_clip's registry is never changed). Raises what open_clip raises."""
    own = _own_configs().get(model)
    if own is not None:
        return _build_own(open_clip, own, pretrained, quick_gelu)
    notices = _OpenClipNotices()
    root = logging.getLogger()
    root.addFilter(notices)
    try:
        return open_clip.create_model(model, pretrained=pretrained, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(notices)


def _build_own(open_clip: Any, config: dict[str, Any], pretrained: str | None, quick_gelu: bool) -> Any:
    """An edgeclip config (``models/configs``) built as ``open_clip.create_model`` builds a registered one
    (precision fp32, device cpu, no timm or Hugging Face tower): the same model class (``CLIP``, or
    ``CustomTextCLIP`` when ``custom_text``) from the same keyword arguments, so a seed gives the same
    weights; ``quick_gelu`` forced as ``force_quick_gelu`` does; the weights of the file ``pretrained``
    loaded strictly (``open_clip.load_checkpoint``); the preprocessing config open_clip's defaults with the
    tower's image size."""
    import dataclasses
    import inspect

    cfg = copy.deepcopy(config)
    if quick_gelu:
        cfg["quick_gelu"] = True
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    clip = model_class(**cfg, cast_dtype=open_clip.get_cast_dtype("fp32"))
    clip.to(device="cpu")
    if pretrained:
        safe = {"weights_only": True} if "weights_only" in inspect.signature(open_clip.load_checkpoint).parameters else {}
        open_clip.load_checkpoint(clip, pretrained, strict=True, **safe)
    preprocess = dataclasses.asdict(open_clip.transform.PreprocessCfg())
    preprocess["size"] = clip.visual.image_size
    open_clip.set_model_preprocess_cfg(clip, preprocess)
    return clip


def import_torch_stack() -> tuple[Any, Any]:
    """Import torch and open_clip, or say which extra to install."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised with torch made unimportable
        raise MissingExtraError("Reading open_clip models", "train", "torch") from exc
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover
        raise MissingExtraError("Reading open_clip models", "train", "open_clip_torch") from exc
    return torch, open_clip


@lru_cache(maxsize=1)
def _own_configs() -> dict[str, dict[str, Any]]:
    """edgeclip's model configs, ``models/configs/<name>.json`` (edgeclip-tiny, edgeclip-small), in open_clip's
    config format. They are never registered with open_clip (``open_clip.add_model_config`` would change
    its process-wide registry): ``model_config``, ``known_models`` and ``_quiet_create_model`` read them."""
    configs = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):  # open_clip's own test
            configs[path.stem] = cfg
    return configs


def known_models() -> list[str]:
    """Every model name edgeclip can build: its own configs, then open_clip's (``open_clip.list_models()``)."""
    _, open_clip = import_torch_stack()
    own = _own_configs()
    return [*own, *(name for name in open_clip.list_models() if name not in own)]


def create_model(model: str, pretrained: str | None = None, quick_gelu: bool = False) -> Any:
    """The open_clip model ``model`` (fp32, CPU), random from torch's global generator (``pretrained`` None)
    or with the weights of the file ``pretrained``; QuickGELU when ``quick_gelu``. open_clip's own models
    through ``open_clip.create_model``, edgeclip's configs built without registering them. Raises
    MissingExtraError without torch and open_clip, and what open_clip raises (``load_backbone`` turns
    that into one line)."""
    _, open_clip = import_torch_stack()
    return _quiet_create_model(open_clip, model, pretrained, quick_gelu)


def reference_tokenizer(model: str) -> Any:
    """open_clip's tokenizer of ``model`` (``open_clip.get_tokenizer``); for edgeclip's own configs the one
    ``get_tokenizer`` builds from a config without a Hugging Face tokenizer: ``SimpleTokenizer`` with the
    config's context length and ``tokenizer_kwargs``."""
    _, open_clip = import_torch_stack()
    own = _own_configs().get(model)
    if own is None:
        return open_clip.get_tokenizer(model)
    text_cfg = own.get("text_cfg", {})
    return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                                               **text_cfg.get("tokenizer_kwargs", {}))


# Labels the runtime tokenizer must tokenize exactly as open_clip does before a bundle is written:
# long, unicode, punctuation, case, HTML entities, whitespace (tests use the same set).
AWKWARD_LABELS = [
    "a photo of a cat.",
    "",
    "A PHOTO OF A DOG",
    "Café naïve façade — “quotes” ‘single’ … ellipsis",
    "日本語のテキスト 中文 한국어 русский",
    "emoji 😀👍🏽",
    "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;x&quot;",
    "it's they're we've I'm you'll",
    "numbers 1234567890 3.14159 -42",
    "punctuation!!! ??? ... --- ((( ))) [x] {y} <z>",
    "under_score snake_case CamelCase kebab-case",
    "tab\tseparated\nnew line",
    " ".join(f"word{i}" for i in range(120)),
    "x " * 76,
]


def model_config(model: str) -> dict[str, Any]:
    """open_clip's config of a known model (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...).
    Raises BackboneLoadError when open_clip has no config for it."""
    _, open_clip = import_torch_stack()
    own = _own_configs().get(model)
    cfg = copy.deepcopy(own) if own is not None else open_clip.get_model_config(model)
    if cfg is None:
        raise BackboneLoadError(f"Unknown model '{model}'.")
    return cfg


def check_supported(model: str) -> None:
    """Refuse, in one line naming the model and the reason, a model family edgeclip cannot run right.

    Refused: text towers that are Hugging Face ``transformers`` models (``text_cfg.hf_model_name``:
    roberta, xlm-roberta, mT5, NLLB; they need transformers and the hub to build, and edgeclip does
    not export them); tokenizer modes and options open_clip has but the runtime does not implement.
    Raises ``BackboneLoadError``."""
    text_cfg = model_config(model).get("text_cfg", {})
    hf_model = text_cfg.get("hf_model_name")
    if hf_model:
        raise BackboneLoadError(
            f"Model '{model}' is not supported: its text tower is the Hugging Face transformers model "
            f"'{hf_model}', which edgeclip does not build offline or export (see docs/MODELS.md)."
        )
    if text_cfg.get("tokenizer_mode"):
        raise BackboneLoadError(f"Model '{model}' is not supported: tokenizer mode "
                                f"'{text_cfg['tokenizer_mode']}' is not implemented by the edgeclip runtime.")
    known = {"clean", "strip_sep_token"} if text_cfg.get("hf_tokenizer_name") else {"clean"}
    extra = sorted(set(text_cfg.get("tokenizer_kwargs", {})) - known)
    if extra:
        raise BackboneLoadError(f"Model '{model}' is not supported: tokenizer options {', '.join(extra)} are not "
                                "implemented by the edgeclip runtime.")
    if not text_cfg.get("hf_tokenizer_name") and "siglip" in model.lower():
        raise BackboneLoadError(f"Model '{model}' is not supported: open_clip would download a SentencePiece "
                                "vocabulary for it at run time, and its config names no Hugging Face tokenizer.")


def decide_quick_gelu(model: str, kind: str, ref: str) -> bool:
    """The activation of the text and image towers, decided once for a bundle.

    True when the model config says so (``*-quickgelu`` names) or, for a pretrained tag, when
    open_clip's pretrained metadata says the weights were trained with QuickGELU (``openai`` and
    some others); a random or file model follows its config (an OpenAI-trained file needs the
    ``-quickgelu`` model name, as the checkpoint holds no activation)."""
    _, open_clip = import_torch_stack()
    if bool(model_config(model).get("quick_gelu", False)):
        return True
    if kind == "tag":
        return bool(open_clip.get_pretrained_cfg(model, ref).get("quick_gelu", False))
    return False


def unknown_model_message(model: str, known: list[str]) -> str:
    """'Unknown model ...' naming the closest few known names (difflib), not all of them."""
    import difflib

    by_lower = {name.lower(): name for name in known}
    close = [by_lower[c] for c in difflib.get_close_matches(model.lower(), list(by_lower), n=4, cutoff=0.5)]
    if close:
        return (f"Unknown model '{model}'. Known models: {', '.join(close)} (the closest of {len(known)}; "
                "open_clip.list_models() lists them all)")
    common = [m for m in ("edgeclip-tiny", "edgeclip-small", "ViT-B-16", "ViT-B-32", "ViT-L-14") if m in by_lower.values()]
    return (f"Unknown model '{model}'. Known models: {', '.join(common)}, ... ({len(known)} in all; "
            "open_clip.list_models() lists them)")


def canonical_model_name(model: str) -> str:
    """open_clip's spelling of ``model``: names match case-insensitively ('vit-b-16' is 'ViT-B-16', said in
    the log). Raises UnknownModelError naming the closest known names when none matches; MissingExtraError
    without torch and open_clip."""
    known = known_models()
    if model in known:
        return model
    same = [name for name in known if name.lower() == model.strip().lower()]
    if len(same) == 1:
        log.info("model '%s' is open_clip's '%s'", model, same[0])
        return same[0]
    raise UnknownModelError(unknown_model_message(model, known))


def _download_hint(open_clip: Any, model: str, tag: str) -> str:
    """Which file to download for a pretrained tag, and where to put it (offline machines)."""
    try:
        cfg = open_clip.get_pretrained_cfg(model, tag)
    except Exception:  # noqa: BLE001 - a hint only
        cfg = {}
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    where = []
    if hub:
        parts = hub.split("/")
        repo = "/".join(parts[:2])
        name = parts[2] if len(parts) > 2 and parts[2] else "open_clip_model.safetensors"
        where.append(f"https://huggingface.co/{repo}/resolve/main/{name} (or run `huggingface-cli download {repo} "
                     f"{name}` where the hub can be reached and copy the Hugging Face cache folder, "
                     "~/.cache/huggingface/hub, to this machine)")
    if url:
        where.append(url)
    if not where:
        return ""
    return f" The file: {' or '.join(where)}."


def resolve_weights(
    model: str, pretrained: str | None, random_weights: bool = False, seed: int = 0
) -> Weights:
    """Check the model name and the weights request before anything heavy is built.

    Raises UnknownModelError for a name open_clip does not know, BackboneLoadError for an
    unsupported model family or a weights request that cannot be met; MissingExtraError without
    torch and open_clip."""
    _, open_clip = import_torch_stack()
    known = known_models()
    if model not in known:
        raise UnknownModelError(unknown_model_message(model, known))
    check_supported(model)
    if random_weights:
        if pretrained:
            raise BackboneLoadError("Give either --pretrained or --random-weights, not both.")
        return Weights("random", str(seed), quick_gelu=decide_quick_gelu(model, "random", str(seed)))
    if not pretrained:
        raise BackboneLoadError(
            f"No weights given for '{model}': pass --pretrained TAG (e.g. 'openai') or a local "
            "checkpoint file, or --random-weights --seed N for an offline test model."
        )
    path = Path(pretrained).expanduser()
    if path.is_file():
        return Weights("file", str(path.resolve()), sha256_of(path),
                             quick_gelu=decide_quick_gelu(model, "file", str(path)))
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained.lower() not in [t.lower() for t in tags]:
        if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
            raise BackboneLoadError(f"Checkpoint file not found: {pretrained}")
        choices = ", ".join(tags) if tags else "none (use --random-weights or a local checkpoint)"
        raise BackboneLoadError(
            f"'{pretrained}' is neither a file nor a pretrained tag of '{model}'. Known tags: {choices}"
        )
    tag = pretrained.lower()
    return Weights("tag", tag, quick_gelu=decide_quick_gelu(model, "tag", tag))


def _cached_tag_file(open_clip: Any, model: str, tag: str) -> str | None:
    """The local path of a pretrained tag's weights if they are already downloaded."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    parts = hub.split("/")  # "org/repo/" or "org/repo/filename"
    repo = "/".join(parts[:2])
    names = [parts[2]] if len(parts) > 2 and parts[2] else []
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        found = try_to_load_from_cache(repo_id=repo, filename=name)
        if isinstance(found, str):
            return found
    return None


def _download_tag(open_clip: Any, model: str, tag: str) -> str:
    """Download a pretrained tag's weights (open_clip's own downloader) and return the local file."""
    try:
        path = open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(model, tag))
    except Exception as exc:  # network and hub errors of every kind
        raise BackboneLoadError(f"Cannot download pretrained weights '{tag}' for model '{model}': "
                                f"{_first_line(exc)}") from exc
    if not path or not Path(path).is_file():
        raise BackboneLoadError(f"Cannot download pretrained weights '{tag}' for model '{model}' "
                                "(open_clip gave no file).")
    return str(path)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


# --------------------------------------------------------------------------- text side


@dataclass(frozen=True)
class LoadedTextSide:
    """The text side of a model as read at init, with what the bundle is made from.

    ``spec``: the manifest's ``backbone.text`` (``edgeclip.manifest.TextSide``, see ``text_side``);
    ``source``: the local file to store in the bundle at ``spec.file``; ``tokenizer``: the
    torch-free runtime tokenizer."""

    spec: TextSide
    source: Path
    tokenizer: ClipTokenizer | HFTokenizer


def _text_pool(clip: Any) -> str:
    text = getattr(clip, "text", None)
    if text is not None:
        return str(getattr(text, "pool_type", type(text).__name__))
    return str(getattr(clip, "text_pool_type", "argmax"))


def _scoring(clip: Any) -> dict[str, Any]:
    scale = float(clip.logit_scale.detach().float().exp().reshape(-1)[0])
    bias = getattr(clip, "logit_bias", None)
    bias_value = None if bias is None else float(bias.detach().float().reshape(-1)[0])
    return {"logit_scale": scale, "logit_bias": bias_value, "scoring": "softmax" if bias is None else "sigmoid"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_tokenizer_file(model: str, hf_name: str, tokenizer: str | None) -> Path:
    """The ``tokenizer.json`` of a Hugging Face tokenizer model: ``tokenizer`` (a file, or a folder
    holding one) or the local Hugging Face cache, downloading it when the hub can be reached."""
    if tokenizer:
        path = Path(tokenizer).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise BackboneLoadError(f"Tokenizer file not found: {path} (pass the tokenizer.json of '{hf_name}', "
                                    "or the folder that holds it)")
        return path.resolve()
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError as exc:  # pragma: no cover - installed with open_clip
        raise MissingExtraError(f"Finding the tokenizer of '{model}'", "train", "huggingface_hub") from exc
    found = try_to_load_from_cache(repo_id=hf_name, filename="tokenizer.json")
    if isinstance(found, str):
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            try_to_load_from_cache(repo_id=hf_name, filename=extra)
        return Path(found)
    if not _hub_reachable():
        raise BackboneLoadError(
            f"Model '{model}' tokenizes with the Hugging Face tokenizer '{hf_name}', which is not in the local "
            "cache, and the hub cannot be reached (offline): pass --tokenizer /path/to/tokenizer.json (a copy "
            f"of {hf_name}'s tokenizer.json, with its tokenizer_config.json beside it)."
        )
    try:
        path = Path(hf_hub_download(repo_id=hf_name, filename="tokenizer.json"))
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            try:
                hf_hub_download(repo_id=hf_name, filename=extra)
            except Exception:  # optional files
                pass
    except Exception as exc:
        raise BackboneLoadError(f"Cannot download the tokenizer '{hf_name}' of model '{model}': "
                                f"{_first_line(exc)}; pass --tokenizer /path/to/tokenizer.json") from exc
    return path


def _hf_reference(open_clip: Any, folder: Path, ctx: int, kwargs: dict[str, Any]) -> Any | None:
    """open_clip's own ``HFTokenizer`` built from the same folder (needs ``transformers``); None
    when transformers is missing or cannot read the folder."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return None
    try:
        return open_clip.tokenizer.HFTokenizer(str(folder), context_length=ctx, **kwargs)
    except Exception as exc:  # transformers cannot make a tokenizer of the folder
        log.info("open_clip HFTokenizer unavailable for %s: %s", folder, _first_line(exc))
        return None


def text_tokenizer(model: str, tokenizer: str | None = None) -> tuple[dict[str, Any], Path, Any, Any]:
    """The runtime tokenizer of ``model`` from its open_clip config, without building the model.

    Returns ``(spec, source, runtime, reference)``: the tokenizer part of ``backbone.text`` (see
    ``text_side``), the local file to store in the bundle, the torch-free runtime tokenizer, and
    open_clip's own tokenizer for the same model (None when it cannot be built here: a Hugging
    Face tokenizer without the ``transformers`` package). Raises ``BackboneLoadError``."""
    _, open_clip = import_torch_stack()
    text_cfg = model_config(model).get("text_cfg", {})
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    ctx = int(text_cfg.get("context_length", 77))
    hf_name = text_cfg.get("hf_tokenizer_name", "")
    if not hf_name:
        if tokenizer:
            raise BackboneLoadError(f"Model '{model}' uses the CLIP tokenizer shipped with edgeclip; "
                                    "--tokenizer is only for Hugging Face tokenizer models (SigLIP, CLIPA).")
        clean = kwargs.get("clean", "lower")
        source = default_vocab_path()
        runtime: ClipTokenizer | HFTokenizer = ClipTokenizer(source, ctx, clean=clean)
        spec = {"tokenizer": "clip-bpe", "file": VOCAB_FILE, "clean": clean, "context_length": ctx,
                "sot_id": runtime.sot_token_id, "eot_id": runtime.eot_token_id, "pad_id": 0}
        return spec, source, runtime, reference_tokenizer(model)
    source = _hf_tokenizer_file(model, hf_name, tokenizer)
    clean = kwargs.get("clean", "whitespace")  # open_clip HFTokenizer's default
    ref = _hf_reference(open_clip, source.parent, ctx, kwargs)
    if ref is not None:
        hf = ref.tokenizer
        pad_id, padding_side, truncation_side = hf.pad_token_id, hf.padding_side, hf.truncation_side
        sep_id = hf.sep_token_id
    else:
        padding_side = truncation_side = "right"
        pad_id, sep_id = _pad_and_sep_from_files(source)
    if pad_id is None:
        raise BackboneLoadError(f"The tokenizer {source} of model '{model}' names no pad token: pass the "
                                "tokenizer folder with its tokenizer_config.json (--tokenizer DIR).")
    strip_sep_id = sep_id if kwargs.get("strip_sep_token") else None
    if kwargs.get("strip_sep_token") and sep_id is None:
        raise BackboneLoadError(f"Model '{model}' strips the separator token, but {source} names none.")
    runtime = HFTokenizer(source, ctx, clean=clean, pad_id=int(pad_id), strip_sep_id=strip_sep_id,
                          padding_side=padding_side, truncation_side=truncation_side)
    spec = {"tokenizer": "hf", "file": HF_TOKENIZER_FILE, "hf_name": hf_name, "clean": clean, "context_length": ctx,
            "pad_id": int(pad_id), "padding_side": padding_side, "truncation_side": truncation_side,
            "strip_sep_id": None if strip_sep_id is None else int(strip_sep_id)}
    return spec, source, runtime, ref


def text_side(model: str, clip: Any, tokenizer: str | None = None) -> LoadedTextSide:
    """Read the text side of ``model`` from its open_clip config and the built ``clip``.

    The returned ``spec`` (manifest ``backbone.text``, a ``manifest.TextSide``) holds: ``tokenizer`` ("clip-bpe" | "hf"),
    ``file`` (its path in the bundle), ``hf_name`` (hf only), ``clean`` ("lower" | "whitespace" |
    "canonicalize"), ``context_length``, ``sot_id``/``eot_id`` (clip-bpe), ``pad_id``,
    ``padding_side``/``truncation_side``/``strip_sep_id`` (hf), ``pool`` (the text tower's pooling:
    argmax = end-of-text token, last, first, eos), ``embed_dim``, ``logit_scale`` (exp of the
    model's learned temperature), ``logit_bias`` (SigLIP) and ``scoring`` ("softmax" | "sigmoid"),
    and ``checked`` (whether the runtime tokenizer was compared with open_clip's own).

    ``tokenizer``: a tokenizer.json (or its folder) for Hugging Face tokenizer models (SigLIP,
    CLIPA); without it the local Hugging Face cache is used. Raises ``BackboneLoadError`` when the
    tokenizer cannot be had or when the runtime tokenizer differs from open_clip's on
    ``AWKWARD_LABELS`` (the bundle would give wrong results)."""
    facts, source, runtime, reference = text_tokenizer(model, tokenizer)
    try:
        spec = msgspec.convert({**facts, "embed_dim": int(model_config(model)["embed_dim"]), "pool": _text_pool(clip),
                                **_scoring(clip), "checked": reference is not None}, TextSide)
    except msgspec.ValidationError as exc:
        raise BackboneLoadError(f"Model '{model}' has a text side edgeclip cannot record: {exc}") from None
    if reference is not None:
        want = reference(list(AWKWARD_LABELS))
        want = want.numpy() if hasattr(want, "numpy") else np.asarray(want)
        got = runtime(list(AWKWARD_LABELS))
        if got.shape != want.shape or not (got == want).all():
            bad = [label for i, label in enumerate(AWKWARD_LABELS) if got.shape != want.shape or (got[i] != want[i]).any()]
            raise BackboneLoadError(f"Model '{model}' is refused: the edgeclip runtime tokenizer differs from "
                                    f"open_clip's on {len(bad)} test labels (e.g. {bad[0][:40]!r}).")
    return LoadedTextSide(spec=spec, source=Path(source), tokenizer=runtime)


def _pad_and_sep_from_files(tokenizer_json: Path) -> tuple[int | None, int | None]:
    """Pad and separator token ids of a tokenizer.json without transformers: the token names from
    tokenizer_config.json / special_tokens_map.json beside it, else the file's own padding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    names: dict[str, str] = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(tokenizer_json.parent / extra)
        for key in ("pad_token", "sep_token"):
            value = _token_content(data.get(key))
            if value is not None:
                names[key] = value
    pad = tok.token_to_id(names["pad_token"]) if "pad_token" in names else None
    if pad is None:
        padding = _read_json(tokenizer_json).get("padding") or {}
        pad = padding.get("pad_id") if isinstance(padding, dict) else None
    sep = tok.token_to_id(names["sep_token"]) if "sep_token" in names else None
    return pad, sep


def image_tower(clip: Any) -> str:
    """The image tower's kind: open_clip's class name, with the timm model for timm towers
    (e.g. 'VisionTransformer', 'TimmModel:fastvit_mci0')."""
    visual = clip.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return type(visual).__name__
    cfg = getattr(trunk, "pretrained_cfg", None) or getattr(trunk, "default_cfg", None) or {}
    return f"{type(visual).__name__}:{cfg.get('architecture') or type(trunk).__name__}"


def preprocess_of(clip: Any, exact: bool = False) -> Preprocess:
    """The manifest's ``preprocess`` of an open_clip model (``clip.visual.preprocess_cfg``: size, mean, std,
    interpolation, resize mode), checked by the schema; ``exact``: decode at full resolution. Raises
    ``BackboneLoadError`` when edgeclip cannot reproduce the model's preprocessing."""
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"]
    values = {"image_size": int(size[0] if isinstance(size, (tuple, list)) else size),
              "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
              "interpolation": cfg.get("interpolation") or "bicubic", "resize_mode": cfg.get("resize_mode") or "shortest",
              "exact": exact}
    try:
        return msgspec.convert(values, Preprocess)
    except (msgspec.ValidationError, ValueError) as exc:
        raise BackboneLoadError(f"The model's preprocessing is not one edgeclip reproduces: {exc}") from None


# --------------------------------------------------------------------------- the backbone


@dataclass
class Backbone:
    """A frozen open_clip model with the facts the bundle records about it."""

    name: str
    source: Weights
    model: Any  # open_clip.CLIP / CustomTextCLIP, eval mode, requires_grad False
    preprocess: Preprocess  # the manifest's ``preprocess`` (``preprocess_of``)
    embed_dim: int
    context_length: int
    text: LoadedTextSide | None = field(default=None, repr=False)

    def tokenize(self, texts: Sequence[str]) -> Any:
        """int64 token ids [N, context_length] (torch) by the runtime tokenizer of the bundle."""
        torch, _ = import_torch_stack()
        if self.text is None:
            self.text = text_side(self.name, self.model)
        return torch.from_numpy(self.text.tokenizer(list(texts)))

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``backbone`` section: model, weights (with ``quick_gelu``), ``embed_dim``,
        ``context_length``, ``image_tower`` and ``text`` (see ``text_side``)."""
        if self.text is None:
            self.text = text_side(self.name, self.model)
        return {"model": self.name, "weights": msgspec.to_builtins(self.source), "embed_dim": self.embed_dim,
                "context_length": self.context_length, "image_tower": image_tower(self.model),
                "text": msgspec.to_builtins(self.text.spec)}

    def encode_images(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """L2-normalised image embeddings [N, D] (float32) of preprocessed pixels [N, 3, S, S]."""
        torch, _ = import_torch_stack()
        out = []
        with torch.inference_mode():
            for start in range(0, len(pixels), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size]))
                feats = self.model.encode_image(chunk, normalize=True)
                out.append(feats.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings [N, D] (float32)."""
        torch, _ = import_torch_stack()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[start : start + batch_size])
                out.append(self.model.encode_text(tokens, normalize=True).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def class_text_embeddings(self, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Zero-shot classifier [C, D] float32: each class's prompts (``template.format(class)``)
        embedded, averaged, then L2-normalised (CLIP's prompt ensembling)."""
        prompts = [t.format(c) for c in classes for t in templates]
        feats = self.encode_texts(prompts).reshape(len(classes), len(templates), -1).mean(axis=1)
        return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


def moe_refusal(backbone: Backbone) -> str | None:
    """Why MoE-Adapters cannot run on this backbone (one line), or None when they can.

    MoE-Adapters insert experts into the transformer blocks of open_clip's own ViT image tower and
    text transformer; timm towers (MobileCLIP's FastViT, SigLIP's timm ViT, ConvNeXt), ResNets and
    Hugging Face tokenizers are refused. RAIL works on any image embedding."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    clip = backbone.model
    tower = image_tower(clip)
    if type(clip).__name__ == "CoCa":
        return (f"--method moe is not supported for '{backbone.name}': MoE-Adapters are implemented for CLIP's "
                "contrastive towers, not CoCa's captioning model; use --method rail-primal or rail-dual.")
    if not isinstance(clip.visual, VisionTransformer):
        return (f"--method moe is not supported for '{backbone.name}': MoE-Adapters need open_clip's ViT image "
                f"tower to insert experts into, and its image tower is {tower}; use --method rail-primal or "
                "rail-dual (any image tower).")
    text = getattr(clip, "transformer", None) or getattr(getattr(clip, "text", None), "transformer", None)
    blocks = getattr(text, "resblocks", None)
    if blocks is None or any(type(b) is not ResidualAttentionBlock for b in blocks):
        return (f"--method moe is not supported for '{backbone.name}': its text tower is not open_clip's "
                "transformer; use --method rail-primal or rail-dual.")
    if backbone.text is not None and backbone.text.spec.tokenizer != "clip-bpe":
        return (f"--method moe is not supported for '{backbone.name}': MoE add-task supports the CLIP tokenizer "
                "only; use --method rail-primal or rail-dual.")
    return None


def check_method(backbone: Backbone, method: str) -> None:
    """Refuse a learner the backbone cannot run (``UsageError``, one line): MoE needs a ViT."""
    if get_learner(method).learns_from_images:  # adapters go into the backbone's blocks
        reason = moe_refusal(backbone)
        if reason:
            raise UsageError(reason)


def load_backbone(
    model: str,
    pretrained: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    source: Weights | None = None,
    tokenizer: str | None = None,
) -> Backbone:
    """Build a frozen open_clip model. ``source`` (from a bundle) replaces the other weight arguments.

    The activation is ``source.quick_gelu`` for every way the weights come (random, file, cached
    tag, downloaded tag). ``tokenizer``: see ``text_side``. Every failure is a one-line
    ``BackboneLoadError`` naming the model (never a traceback of open_clip's)."""
    torch, open_clip = import_torch_stack()
    if source is None:
        model = canonical_model_name(model)  # names match case-insensitively
        source = resolve_weights(model, pretrained, random_weights, seed)
    quick_gelu = source.quick_gelu
    if quick_gelu is None:  # a bundle from before the activation was recorded
        quick_gelu = decide_quick_gelu(model, source.kind, source.ref)
    hf_name = model_config(model).get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_name:  # find the tokenizer before building a large model, so that offline fails at once
        tokenizer = str(_hf_tokenizer_file(model, hf_name, tokenizer))
    if source.kind == "random":
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's global RNG is left as it was
            torch.manual_seed(int(source.ref))
            try:
                clip = _quiet_create_model(open_clip, model, None, quick_gelu)
            except Exception as exc:
                raise BackboneLoadError(f"Cannot build model '{model}': {type(exc).__name__}: {_first_line(exc)}") from exc
    elif source.kind == "file":
        path = Path(source.ref)
        if not path.is_file():
            raise BackboneLoadError(f"Checkpoint file of '{model}' is gone: {path}")
        if source.sha256 and sha256_of(path) != source.sha256:
            raise BackboneLoadError(f"Checkpoint {path} changed since the bundle was made (sha256 mismatch).")
        _refuse_torchscript(path, model)
        clip = _create_or_explain(open_clip, model, str(path), quick_gelu)
    else:
        cached = _cached_tag_file(open_clip, model, source.ref)
        if cached is None:
            if not _hub_reachable():
                raise BackboneLoadError(
                    f"Cannot load pretrained weights '{source.ref}' for model '{model}': they are not in the "
                    "local cache and the model hub cannot be reached (offline). Download them on a machine "
                    "with internet access and pass the file with --pretrained /path/to/weights "
                    "(.safetensors, .bin or .pt); use --random-weights --seed N for an offline test model."
                    + _download_hint(open_clip, model, source.ref)
                )
            cached = _download_tag(open_clip, model, source.ref)
        _refuse_torchscript(Path(cached), model)
        clip = _create_or_explain(open_clip, model, cached, quick_gelu)
        # a tag's preprocessing (MobileCLIP: mean 0, std 1) is open_clip's pretrained metadata, not the file's
        tag_cfg = open_clip.get_pretrained_cfg(model, source.ref)
        for key in ("mean", "std", "interpolation", "resize_mode"):
            if tag_cfg.get(key):
                clip.visual.preprocess_cfg[key] = tag_cfg[key]
    clip.eval()
    for param in clip.parameters():
        param.requires_grad_(False)
    preprocess = preprocess_of(clip)
    embed_dim = int(model_config(model)["embed_dim"])
    text = text_side(model, clip, tokenizer)
    return Backbone(
        name=model,
        source=Weights(source.kind, source.ref, source.sha256, quick_gelu),
        model=clip,
        preprocess=preprocess,
        embed_dim=embed_dim,
        context_length=text.spec.context_length,
        text=text,
    )


# --------------------------------------------------------------------------- checkpoint errors


def _refuse_torchscript(path: Path, model: str) -> None:
    """An OpenAI TorchScript archive is never loaded (it holds pickled code): say how to convert it."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return
    if any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names):
        qg = model if model.endswith("-quickgelu") else f"{model}-quickgelu"
        raise BackboneLoadError(
            f"'{path}' is a TorchScript archive (OpenAI's original CLIP release), which edgeclip never loads "
            f"(it runs pickled code): use --pretrained openai, or convert it once on a trusted machine with "
            f"python -c \"import open_clip, safetensors.torch as st; m = open_clip.load_openai_model('{path}', "
            f"device='cpu'); st.save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, "
            f"'weights.safetensors')\" and pass --model {qg} --pretrained weights.safetensors"
        )


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, read safely (safetensors, or torch.load weights_only)."""
    torch, _ = import_torch_stack()
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise BackboneLoadError(f"'{path}' holds no state dict")
    shapes = {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}
    if shapes and next(iter(shapes)).startswith("module."):
        shapes = {k[7:]: v for k, v in shapes.items()}
    return shapes


def _shown(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def explain_checkpoint(open_clip: Any, model: str, path: str, quick_gelu: bool, exc: BaseException) -> str:
    """One line on why a checkpoint does not load: the missing and unexpected keys (first few plus
    counts) or the shape mismatches; the -quickgelu hint only when keys and shapes match."""
    head = f"Cannot load weights '{path}' into model '{model}'"
    try:
        have = _checkpoint_shapes(path)
    except BackboneLoadError as err:
        return f"{head}: {err}"
    except Exception as err:
        return f"{head}: the file cannot be read as a weights file ({_first_line(err, 200)})"
    try:
        want = {k: tuple(v.shape) for k, v in
                _quiet_create_model(open_clip, model, None, quick_gelu).state_dict().items()}
    except Exception:
        return f"{head}: {_first_line(exc)}"
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected:
        return (f"{head}: {len(missing)} of the model's {len(want)} keys are missing ({_shown(missing)}) and "
                f"{len(unexpected)} of the file's {len(have)} are unexpected ({_shown(unexpected)}); the file is "
                "probably for another architecture: pass the model name it was trained as.")
    if shapes:
        shown = ", ".join(f"{k} file {list(have[k])} vs model {list(want[k])}" for k in shapes[:3])
        return (f"{head}: {len(shapes)} tensors differ in shape ({shown}{', ...' if len(shapes) > 3 else ''}); "
                "the file is for another size of this architecture.")
    hint = ""
    if not quick_gelu and f"{model}-quickgelu" in [*_own_configs(), *open_clip.list_models()]:
        hint = (f" The keys and shapes match; if the file is an OpenAI-trained checkpoint, use "
                f"--model {model}-quickgelu (its activation).")
    return f"{head}: {_first_line(exc)}.{hint}"


def _create_or_explain(open_clip: Any, model: str, pretrained: str, quick_gelu: bool) -> Any:
    try:
        return _quiet_create_model(open_clip, model, pretrained, quick_gelu)
    except Exception as exc:  # open_clip raises RuntimeError (and others) for every failure
        raise BackboneLoadError(explain_checkpoint(open_clip, model, pretrained, quick_gelu, exc)) from exc

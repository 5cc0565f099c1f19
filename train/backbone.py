"""The frozen open_clip backbone: resolve a model name and weights source, build, freeze.

Three steps kept apart (open_clip's ``create_model`` does all of them in one function):
``resolve_weights`` decides where the weights come from, ``load_backbone`` builds the model
and loads them, ``Backbone`` encodes images and texts. Offline, a pretrained tag that is not
in the local cache fails at once with a message that says how to pass a local file.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from edgeclip.models import CONFIG_DIR

from edgeclip.bundle import sha256_of, weights_label
from edgeclip.errors import BackboneLoadError, MissingExtraError, UnknownModelError

_HUB_HOST = ("huggingface.co", 443)


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


def register_model_configs() -> None:
    """Make the configs in ``models/configs`` (edgeclip-tiny, edgeclip-small) known to open_clip."""
    _, open_clip = import_torch_stack()
    known = set(open_clip.list_models())
    if not all(p.stem in known for p in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from, as recorded in the bundle manifest.

    ``kind`` is ``random`` (seeded), ``tag`` (an open_clip pretrained tag) or ``file``.
    ``ref`` is the seed, the tag, or the file's path; ``sha256`` is set for files.
    """

    kind: str
    ref: str
    sha256: str | None = None

    @property
    def label(self) -> str:
        """Short text for reports: every output that used random weights says so."""
        return weights_label(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ref": self.ref, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightsSource":
        return cls(kind=data["kind"], ref=str(data["ref"]), sha256=data.get("sha256"))


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


def resolve_weights(
    model: str, pretrained: str | None, random_weights: bool = False, seed: int = 0
) -> WeightsSource:
    """Check the model name and the weights request before anything heavy is built."""
    _, open_clip = import_torch_stack()
    register_model_configs()
    if model not in open_clip.list_models():
        raise UnknownModelError(unknown_model_message(model, open_clip.list_models()))
    if random_weights:
        if pretrained:
            raise BackboneLoadError("Give either --pretrained or --random-weights, not both.")
        return WeightsSource("random", str(seed))
    if not pretrained:
        raise BackboneLoadError(
            f"No weights given for '{model}': pass --pretrained TAG (e.g. 'openai') or a local "
            "checkpoint file, or --random-weights --seed N for an offline test model."
        )
    path = Path(pretrained).expanduser()
    if path.is_file():
        return WeightsSource("file", str(path.resolve()), sha256_of(path))
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained.lower() not in [t.lower() for t in tags]:
        if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
            raise BackboneLoadError(f"Checkpoint file not found: {pretrained}")
        choices = ", ".join(tags) if tags else "none (use --random-weights or a local checkpoint)"
        raise BackboneLoadError(
            f"'{pretrained}' is neither a file nor a pretrained tag of '{model}'. Known tags: {choices}"
        )
    return WeightsSource("tag", pretrained.lower())


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


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Backbone:
    """A frozen open_clip model with the facts the bundle records about it."""

    name: str
    source: WeightsSource
    model: Any  # open_clip.CLIP, eval mode, requires_grad False
    preprocess: dict[str, Any]
    embed_dim: int
    context_length: int
    _tokenizer: Any = field(default=None, repr=False)

    def tokenize(self, texts: Sequence[str]) -> Any:
        if self._tokenizer is None:
            _, open_clip = import_torch_stack()
            self._tokenizer = open_clip.get_tokenizer(self.name)
        return self._tokenizer(list(texts))

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
        """Zero-shot classifier [C, D]: each class's prompts averaged, then re-normalised."""
        prompts = [t.format(c) for c in classes for t in templates]
        feats = self.encode_texts(prompts).reshape(len(classes), len(templates), -1).mean(axis=1)
        return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


def load_backbone(
    model: str,
    pretrained: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    source: WeightsSource | None = None,
) -> Backbone:
    """Build a frozen open_clip model. ``source`` (from a bundle) replaces the other weight arguments."""
    torch, open_clip = import_torch_stack()
    if source is None:
        source = resolve_weights(model, pretrained, random_weights, seed)
    else:
        register_model_configs()
    logging.getLogger("root").setLevel(logging.ERROR)  # open_clip warns through the root logger
    if source.kind == "random":
        torch.manual_seed(int(source.ref))
        clip = open_clip.create_model(model, pretrained=None)
    elif source.kind == "file":
        path = Path(source.ref)
        if not path.is_file():
            raise BackboneLoadError(f"Checkpoint file of '{model}' is gone: {path}")
        if source.sha256 and sha256_of(path) != source.sha256:
            raise BackboneLoadError(f"Checkpoint {path} changed since the bundle was made (sha256 mismatch).")
        clip = _create_or_explain(open_clip, model, str(path))
    else:
        cached = _cached_tag_file(open_clip, model, source.ref)
        if cached is None and not _hub_reachable():
            raise BackboneLoadError(
                f"Cannot load pretrained weights '{source.ref}' for model '{model}': they are not in the "
                "local cache and the model hub cannot be reached (offline). Download them on a machine "
                "with internet access, or pass a local checkpoint file with --pretrained /path/to/weights "
                "(.safetensors, .bin or .pt); use --random-weights --seed N for an offline test model."
            )
        pretrained_cfg = open_clip.get_pretrained_cfg(model, source.ref)
        if cached is not None:
            clip = _create_or_explain(
                open_clip, model, cached, force_quick_gelu=bool(pretrained_cfg.get("quick_gelu", False))
            )
        else:
            clip = _create_or_explain(open_clip, model, source.ref)
    clip.eval()
    for param in clip.parameters():
        param.requires_grad_(False)
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"]
    preprocess = {
        "image_size": int(size[0] if isinstance(size, (tuple, list)) else size),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }
    embed_dim = int(clip.text_projection.shape[1]) if clip.text_projection is not None else int(
        clip.visual.output_dim
    )
    return Backbone(
        name=model,
        source=source,
        model=clip,
        preprocess=preprocess,
        embed_dim=embed_dim,
        context_length=int(clip.context_length),
    )


def _create_or_explain(open_clip: Any, model: str, pretrained: str, **kwargs: Any) -> Any:
    try:
        return open_clip.create_model(model, pretrained=pretrained, **kwargs)
    except Exception as exc:  # open_clip raises RuntimeError for every failure
        raise BackboneLoadError(
            f"Cannot load weights '{pretrained}' into model '{model}': {str(exc).splitlines()[0][:300]}. "
            "If the file is for another architecture, pass the matching model name "
            "(OpenAI checkpoints need the '-quickgelu' variant, e.g. ViT-B-16-quickgelu)."
        ) from exc

"""Helpers of the MoE tests (``test_moe``, ``test_moe_trainer``, ``test_moe_ddp`` and its torchrun
workers): a frozen random-weight open_clip model and a small synthetic domain on disk."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgeclip.train.backbone import create_model


def frozen_clip(name: str = "edgeclip-tiny", seed: int = 0):
    """A random-weight open_clip model, frozen like the project's backbone (eval, no grads)."""
    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(seed)
    clip = create_model(name).eval()
    return clip.requires_grad_(False)


TEMPLATE = "a photo of a {}."


def make_domain(root: Path, n_classes: int = 3, per_class: int = 4, seed: int = 0) -> list[tuple[str, int]]:
    """Small synthetic images, one colour tint per class: (path, class) pairs."""
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(n_classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.uniform(0, 255, 3)
        for i in range(per_class):
            pixels = np.clip(tint + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{i}.png"
            Image.fromarray(pixels).save(path)
            samples.append((str(path), c))
    return samples

"""Images the demo generates itself (no dataset download): two small domains, a query folder
of new images of every class, and "unseen" images of no learned domain.

The domains are made to be told apart even by a backbone with random weights (the demo runs
offline): shapes are yellow on dark blue, stripes are grey-scale with a fixed period, and the
unseen images are warm-coloured gradients, blobs and noise unlike either, so the DDAS gate sends
them to zero-shot CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96
UNSEEN = "unseen"


def _shape(kind: str, rng: np.random.Generator) -> Image.Image:
    background = (int(rng.integers(0, 30)), int(rng.integers(0, 30)), int(rng.integers(90, 140)))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    colour = (int(rng.integers(220, 256)), int(rng.integers(200, 256)), int(rng.integers(0, 60)))
    cx, cy = (int(v) for v in rng.integers(44, 53, 2))
    r = int(rng.integers(26, 32))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def _stripes(kind: str, rng: np.random.Generator) -> Image.Image:
    period = 16
    phase = int(rng.integers(0, period))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    coord = {"horizontal stripes": y, "vertical stripes": x, "diagonal stripes": x + y}[kind]
    mask = ((coord + phase) // (period // 2)) % 2 == 0
    dark, light = int(rng.integers(0, 50)), int(rng.integers(205, 256))
    return Image.fromarray(np.where(mask, light, dark).astype(np.uint8)).convert("RGB")


def _unseen(i: int, rng: np.random.Generator) -> Image.Image:
    """Warm-coloured images of no learned domain: blobs, gradients and noise, in turn."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    a = np.array([int(rng.integers(200, 256)), int(rng.integers(60, 140)), int(rng.integers(0, 40))])
    b = np.array([int(rng.integers(120, 200)), 0, int(rng.integers(60, 120))])
    kind = i % 3
    if kind == 0:
        small = np.stack([rng.integers(150, 256, (3, 3)), rng.integers(0, 120, (3, 3)), rng.integers(0, 80, (3, 3))], -1)
        return Image.fromarray(small.astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    if kind == 1:
        t = ((x + y) / (2 * SIZE))[..., None]
        return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    noise = rng.integers(0, 60, (SIZE, SIZE, 1))
    return Image.fromarray(np.clip(a + noise - 30, 0, 255).astype(np.uint8))


DOMAINS = {
    "shapes": (("circle", "square", "triangle"), _shape),
    "stripes": (("horizontal stripes", "vertical stripes", "diagonal stripes"), _stripes),
}


@dataclass
class DemoImages:
    """What ``write_demo`` wrote. ``expected[file name] = (label, domain)`` for each query
    image; an unseen image has label None and domain ``"unseen"`` (it should go to zero-shot)."""

    domains: list[Path]
    query: Path
    expected: dict[str, tuple[str | None, str]] = field(default_factory=dict)


def write_demo(root: Path, train_per_class: int = 16, query_per_class: int = 3, unseen: int = 6,
               seed: int = 0) -> DemoImages:
    """Write ``root/<domain>/train/<class>/*.png`` for each domain and ``root/query/*.png``: new
    images of every class (``<class>-<i>.png``) and ``unseen`` images of no domain
    (``unseen-<i>.png``). The same seed writes the same pixels."""
    rng = np.random.default_rng(seed)
    query = root / "query"
    query.mkdir(parents=True, exist_ok=True)
    result = DemoImages([], query)
    for domain, (classes, draw) in DOMAINS.items():
        for name in classes:
            folder = root / domain / "train" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(train_per_class):
                draw(name, rng).save(folder / f"{i:03d}.png")
            for i in range(query_per_class):
                file = f"{name.replace(' ', '-')}-{i}.png"
                draw(name, rng).save(query / file)
                result.expected[file] = (name, domain)
        result.domains.append(root / domain)
    for i in range(unseen):
        file = f"{UNSEEN}-{i}.png"
        _unseen(i, rng).save(query / file)
        result.expected[file] = (None, UNSEEN)
    return result


def write_demo_images(root: Path, train_per_class: int = 16, query_per_class: int = 2, seed: int = 0) -> tuple[list[Path], Path]:
    """``write_demo`` returning only (domain folders, query folder)."""
    images = write_demo(root, train_per_class, query_per_class, unseen=query_per_class, seed=seed)
    return images.domains, images.query

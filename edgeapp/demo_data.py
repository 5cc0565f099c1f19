"""Images the demo generates itself (no dataset download): two small domains and a query folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96


def _shape(kind: str, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(v) for v in rng.integers(150, 256, 3))
    cx, cy = rng.integers(35, 61, 2)
    r = int(rng.integers(18, 30))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def _stripes(kind: str, rng: np.random.Generator) -> Image.Image:
    period = int(rng.integers(8, 16))
    phase = int(rng.integers(0, period))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    coord = {"horizontal stripes": y, "vertical stripes": x, "diagonal stripes": x + y}[kind]
    mask = ((coord + phase) // (period // 2)) % 2 == 0
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = np.where(mask[..., None], a, b).astype(np.uint8)
    return Image.fromarray(pixels)


def _noise(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


DOMAINS = {
    "shapes": (("circle", "square", "triangle"), _shape),
    "stripes": (("horizontal stripes", "vertical stripes", "diagonal stripes"), _stripes),
}


def write_demo_images(root: Path, train_per_class: int = 16, query_per_class: int = 2, seed: int = 0) -> tuple[list[Path], Path]:
    """Write ``root/<domain>/train/<class>/*.png`` for each domain and ``root/query/*.png``
    (new images of every class plus noise images of no learned domain). Returns (domains, query)."""
    rng = np.random.default_rng(seed)
    domains = []
    query = root / "query"
    query.mkdir(parents=True, exist_ok=True)
    for domain, (classes, draw) in DOMAINS.items():
        for name in classes:
            folder = root / domain / "train" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(train_per_class):
                draw(name, rng).save(folder / f"{i:03d}.png")
            for i in range(query_per_class):
                draw(name, rng).save(query / f"{name.replace(' ', '-')}-{i}.png")
        domains.append(root / domain)
    for i in range(query_per_class):
        _noise(rng).save(query / f"unseen-noise-{i}.png")
    return domains, query

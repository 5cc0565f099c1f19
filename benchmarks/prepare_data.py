"""Build the domain folders of the papers' protocols from datasets the user has downloaded.

    python benchmarks/prepare_data.py mtil  --source ~/data/torchvision --out data/mtil
    python benchmarks/prepare_data.py xtail --source ~/data/coop        --out data/xtail

writes, per dataset, ``OUT/<dataset>/train/<class>/*``, ``OUT/<dataset>/test/<class>/*`` (symbolic
links to the source images; decoded PNGs for the binary formats of CIFAR-100 and MNIST) and
``OUT/<dataset>/meta.json`` ({"name", "templates", "protocol", "classes", "source", "split"}),
the layout ``edgeclip eval`` and ``add-task`` read.

- MTIL (MoE-Adapters, after ZSCL): the 11 datasets in torchvision's layouts under ``--source``;
  torchvision's splits (Aircraft train/test, DTD partition 1, Flowers102 train/test, ...) and a
  random 80/20 split with seed 42 for Caltech101, EuroSAT and SUN397 (``torch.randperm`` with a
  generator seeded 42, as ``torch.utils.data.random_split`` draws it; needs torch); ZSCL's class
  names and per-dataset templates. CIFAR-100 is read from its binary version
  (``cifar-100-binary``), never from the pickled python version.
- X-TAIL (RAIL): the 10 datasets (MTIL without CIFAR-100) in CoOp's layout under ``--source``
  (``split_zhou_*.json`` files, Aircraft's ``images_variant_*.txt``) and MNIST in torchvision's;
  CoOp's train and test splits; RAIL's class names (CoOp's, EuroSAT's with " satellite location"
  appended, MNIST's as 'number: "0 - zero"'); the single template "a photo of a {}.".

Where a class name holds '/' (SUN397's 'apse/indoor'), the folder name has a space instead (a
folder name cannot hold '/'); meta.json keeps the original names. The few-shot draw is eval's
(`--shots`), not done here. Sources of the names and templates: ZSCL's / MoE-Adapters'
``mtil/src/datasets/collections.py`` and RAIL's ``scenario_datasets/`` (JiazuoYu/MoE-Adapters4CL,
linghan1997/Regression-based-Analytic-Incremental-Learning); written here as data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MTIL = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
        "stanford_cars", "sun397")
XTAIL = tuple(d for d in MTIL if d != "cifar100")
ONE_TEMPLATE = ("a photo of a {}.",)

# -- ZSCL's class names where they are not torchvision's -------------------------------------------------
CALTECH101_NAMES = (
    "off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant", "barrel",
    "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon",
    "side of a car", "ceiling fan", "cellphone", "chair", "chandelier", "body of a cougar cat", "face of a cougar cat",
    "crab", "crayfish", "crocodile", "head of a  crocodile", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly",
    "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "head of a flamingo", "garfield",
    "gerenuk", "gramophone", "grand piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis",
    "inline skate", "joshua tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin",
    "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors", "scorpion",
    "sea horse", "snoopy (cartoon beagle)", "soccer ball", "stapler", "starfish", "stegosaurus", "stop sign",
    "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch", "water lilly", "wheelchair", "wild cat",
    "windsor chair", "wrench", "yin and yang symbol",
)
EUROSAT_NAMES = (  # in the sorted folder order AnnualCrop, Forest, HerbaceousVegetation, ...
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
)
FLOWERS_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)
MNIST_NAMES = ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
               "8 - eight", "9 - nine")  # torchvision's MNIST.classes

# -- ZSCL's templates per dataset (MTIL) ------------------------------------------------------------------
_CALTECH_T = ("a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.", "a sketch of a {}.",
              "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.", "a embroidered {}.", "a cartoon {}.",
              "a {} in a video game.", "a plushie {}.", "a origami {}.", "art of a {}.", "graffiti of a {}.",
              "a drawing of a {}.", "a doodle of a {}.", "a photo of the {}.", "a painting of the {}.",
              "the plastic {}.", "a sculpture of the {}.", "a sketch of the {}.", "a tattoo of the {}.",
              "the toy {}.", "a rendition of the {}.", "the embroidered {}.", "the cartoon {}.",
              "the {} in a video game.", "the plushie {}.", "the origami {}.", "art of the {}.",
              "graffiti of the {}.", "a drawing of the {}.", "a doodle of the {}.")
_CIFAR_T = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
            "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
            "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
            "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
            "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
            "a photo of the small {}.", "a photo of the big {}.")
MTIL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "aircraft": ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
    "caltech101": _CALTECH_T,
    "cifar100": _CIFAR_T,
    "dtd": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."),
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "flowers": ("a photo of a {}, a type of flower.",),
    "food": ("a photo of a {}, a type of food.",),
    "mnist": ('a photo of the number: "{}".',),
    "oxford_pet": ("a photo of a {}, a type of pet.",),
    "stanford_cars": ("a photo of a {}, a type of car.", "a photo of a {}.", "a photo of the {}.",
                      "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.", "a photo of my clean {}.",
                      "a photo of my new {}.", "a photo of my old {}."),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
}

# CoOp's folders and split files (X-TAIL)
COOP = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food": ("food-101", "images", "split_zhou_Food101.json"),
    "oxford_pet": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
}


class DataError(Exception):
    """A source dataset is missing or malformed (the message says which file)."""


@dataclass
class Split:
    """One dataset as read: class names (label order) and (image, label) pairs per split. An image is a
    path (linked) or a uint8 array [H,W] / [H,W,3] (written as PNG)."""

    classes: list[str]
    train: list[tuple[Path | np.ndarray, int]]
    test: list[tuple[Path | np.ndarray, int]]
    split: str


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"missing {path}")
    return path


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in _need(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def _spaces(name: str) -> str:
    return name.replace("_", " ")


def seeded_split(n: int, ratio: float = 0.8, seed: int = 42) -> tuple[list[int], list[int]]:
    """ZSCL's split: torch.utils.data.random_split(range(n), [int(ratio n), rest], Generator seeded 42)."""
    try:
        import torch
    except ImportError as err:
        raise DataError("the 80/20 split of ZSCL is drawn by torch.randperm: pip install torch") from err
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(ratio * n)
    return perm[:cut], perm[cut:]


def _split_items(items: list[tuple[Path, int]]) -> tuple[list, list]:
    train, test = seeded_split(len(items))
    return [items[i] for i in train], [items[i] for i in test]


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    return loadmat(_need(path), squeeze_me=True)


def _idx(path: Path) -> np.ndarray:
    """An MNIST idx file (raw or .gz) as an array."""
    if not path.exists() and path.with_suffix(path.suffix + ".gz").exists():
        path = path.with_suffix(path.suffix + ".gz")
    raw = (gzip.open if path.suffix == ".gz" else open)(_need(path), "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ----------------------------------------------------------------------------- MTIL (torchvision layouts)


def mtil_aircraft(root: Path) -> Split:
    base = root / "fgvc-aircraft-2013b" / "data"
    classes = _lines(base / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}

    def read(split: str) -> list:
        out = []
        for line in _lines(base / f"images_variant_{split}.txt"):
            image, name = line.split(" ", 1)
            out.append((base / "images" / f"{image}.jpg", index[name]))
        return out

    return Split(classes, read("train"), read("test"), "torchvision FGVCAircraft train / test (variant)")


def mtil_caltech101(root: Path) -> Split:
    base = _need(root / "caltech101" / "101_ObjectCategories")
    cats = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")
    if len(cats) != len(CALTECH101_NAMES):
        raise DataError(f"{base}: expected {len(CALTECH101_NAMES)} categories, found {len(cats)}")
    items = []
    for label, cat in enumerate(cats):  # torchvision: image_0001.jpg .. image_<count>.jpg per category
        for i in range(1, len(list((base / cat).iterdir())) + 1):
            items.append((base / cat / f"image_{i:04d}.jpg", label))
    return Split(list(CALTECH101_NAMES), *_split_items(items), "random 80/20 of torchvision Caltech101, seed 42")


def mtil_cifar100(root: Path) -> Split:
    base = root / "cifar-100-binary"
    classes = [_spaces(c) for c in _lines(base / "fine_label_names.txt")]

    def read(name: str) -> list:
        raw = np.frombuffer(_need(base / name).read_bytes(), np.uint8).reshape(-1, 2 + 3072)
        return [(row[2:].reshape(3, 32, 32).transpose(1, 2, 0), int(row[1])) for row in raw]

    return Split(classes, read("train.bin"), read("test.bin"), "CIFAR-100 train / test (binary version)")


def mtil_dtd(root: Path) -> Split:
    base = root / "dtd" / "dtd"
    raw = sorted(p.name for p in _need(base / "images").iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(raw)}

    def read(split: str) -> list:
        return [(base / "images" / line, index[line.split("/")[0]]) for line in _lines(base / "labels" / f"{split}1.txt")]

    return Split([_spaces(c) for c in raw], read("train"), read("test"), "torchvision DTD partition 1 train / test")


def mtil_eurosat(root: Path) -> Split:
    base = _need(root / "eurosat" / "2750")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(folders) != len(EUROSAT_NAMES):
        raise DataError(f"{base}: expected {len(EUROSAT_NAMES)} class folders, found {len(folders)}")
    items = [(f, label) for label, c in enumerate(folders) for f in sorted(p for p in (base / c).iterdir() if p.is_file())]
    return Split(list(EUROSAT_NAMES), *_split_items(items), "random 80/20 of torchvision EuroSAT, seed 42")


def mtil_flowers(root: Path) -> Split:
    base = root / "flowers-102"
    labels = np.atleast_1d(_loadmat(base / "imagelabels.mat")["labels"]).astype(int)
    ids = _loadmat(base / "setid.mat")

    def read(key: str) -> list:
        return [(base / "jpg" / f"image_{int(i):05d}.jpg", int(labels[int(i) - 1]) - 1) for i in np.atleast_1d(ids[key])]

    return Split(list(FLOWERS_NAMES), read("trnid"), read("tstid"), "torchvision Flowers102 train / test")


def mtil_food(root: Path) -> Split:
    base = root / "food-101"

    def meta(split: str) -> dict:
        return json.loads(_need(base / "meta" / f"{split}.json").read_text(encoding="utf-8"))

    train, test = meta("train"), meta("test")
    raw = sorted(train)
    index = {c: i for i, c in enumerate(raw)}

    def read(data: dict) -> list:
        return [(base / "images" / f"{im}.jpg", index[c]) for c in raw for im in data.get(c, [])]

    return Split([_spaces(c) for c in raw], read(train), read(test), "torchvision Food101 train / test")


def _mnist(root: Path, classes: Sequence[str]) -> Split:
    base = root / "MNIST" / "raw"

    def read(prefix: str) -> list:
        images, labels = _idx(base / f"{prefix}-images-idx3-ubyte"), _idx(base / f"{prefix}-labels-idx1-ubyte")
        return [(img, int(y)) for img, y in zip(images, labels)]

    return Split(list(classes), read("train"), read("t10k"), "torchvision MNIST train / test")


def mtil_mnist(root: Path) -> Split:
    return _mnist(root, MNIST_NAMES)


def mtil_oxford_pet(root: Path) -> Split:
    base = root / "oxford-iiit-pet"

    def rows(split: str) -> list[tuple[str, int]]:
        return [(ln.split()[0], int(ln.split()[1]) - 1) for ln in _lines(base / "annotations" / f"{split}.txt")]

    train, test = rows("trainval"), rows("test")
    raw = dict(sorted({(label, image.rsplit("_", 1)[0]) for image, label in train + test}))
    classes = [" ".join(part.title() for part in raw[i].split("_")) for i in range(len(raw))]

    def read(data: list) -> list:
        return [(base / "images" / f"{image}.jpg", label) for image, label in data]

    return Split(classes, read(train), read(test), "torchvision OxfordIIITPet trainval / test")


def mtil_stanford_cars(root: Path) -> Split:
    base = root / "stanford_cars"
    classes = [str(c) for c in np.atleast_1d(_loadmat(base / "devkit" / "cars_meta.mat")["class_names"])]

    def read(mat: Path, folder: str) -> list:
        ann = np.atleast_1d(_loadmat(mat)["annotations"])
        return [(base / folder / str(a["fname"]), int(a["class"]) - 1) for a in ann]

    return Split([_spaces(c) for c in classes], read(base / "devkit" / "cars_train_annos.mat", "cars_train"),
                 read(base / "cars_test_annos_withlabels.mat", "cars_test"), "torchvision StanfordCars train / test")


def mtil_sun397(root: Path) -> Split:
    base = root / "SUN397"
    raw = [c[3:] for c in _lines(base / "ClassName.txt")]  # '/a/abbey' -> 'abbey'
    index = {c: i for i, c in enumerate(raw)}
    items = []
    for path in sorted(base.rglob("sun_*.jpg")):  # torchvision's order is the file system's; sorted here
        items.append((path, index["/".join(path.relative_to(base).parts[1:-1])]))
    return Split([_spaces(c) for c in raw], *_split_items(items), "random 80/20 of torchvision SUN397 (sorted), seed 42")


# ----------------------------------------------------------------------------- X-TAIL (CoOp layouts)


def _coop(root: Path, dataset: str) -> Split:
    folder, images, split_file = COOP[dataset]
    base = root / folder
    data = json.loads(_need(base / split_file).read_text(encoding="utf-8"))
    names: dict[int, str] = {}
    for rel, label, name in data["train"] + data["test"]:
        names.setdefault(int(label), name)
    classes = [names[i] for i in range(len(names))]

    def read(key: str) -> list:
        return [(base / images / rel, int(label)) for rel, label, _ in data[key]]

    return Split(classes, read("train"), read("test"), f"CoOp {split_file} train / test")


def xtail_aircraft(root: Path) -> Split:
    base = root / "fgvc_aircraft"
    classes = _lines(base / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}

    def read(split: str) -> list:
        return [(base / "images" / f"{ln.split(' ', 1)[0]}.jpg", index[ln.split(" ", 1)[1]])
                for ln in _lines(base / f"images_variant_{split}.txt")]

    return Split(classes, read("train"), read("test"), "CoOp fgvc_aircraft images_variant_train / test")


def xtail_eurosat(root: Path) -> Split:
    split = _coop(root, "eurosat")
    split.classes = [f"{c} satellite location" for c in split.classes]  # RAIL's EuroSAT names
    return split


def xtail_mnist(root: Path) -> Split:
    return _mnist(root, [f'number: "{c}"' for c in MNIST_NAMES])  # RAIL's MNIST names


READERS: dict[str, dict[str, Callable[[Path], Split]]] = {
    "mtil": {d: globals()[f"mtil_{d}"] for d in MTIL},
    "xtail": {**{d: (lambda r, d=d: _coop(r, d)) for d in COOP}, "aircraft": xtail_aircraft,
              "eurosat": xtail_eurosat, "mnist": xtail_mnist},
}


# ----------------------------------------------------------------------------- writing


def folder_name(name: str) -> str:
    """A class name as a folder name: '/' (not allowed) becomes a space; a leading dot is dropped."""
    return re.sub(r"\s+", " ", name.replace("/", " ")).strip().lstrip(".") or "_"


def write_domain(split: Split, dest: Path, dataset: str, protocol: str, copy: bool = False) -> dict:
    """Write one dataset's train/ and test/ (links, copies or PNGs) and meta.json; returns meta."""
    if dest.exists():
        raise DataError(f"{dest} exists; remove it or choose another --out")
    folders = [folder_name(c) for c in split.classes]
    if len({f.lower() for f in folders}) != len(folders):
        raise DataError(f"{dataset}: two class names map to the same folder name")
    for part, items in (("train", split.train), ("test", split.test)):
        for f in folders:
            (dest / part / f).mkdir(parents=True)
        for n, (image, label) in enumerate(items):
            target = dest / part / folders[label]
            if isinstance(image, np.ndarray):
                Image.fromarray(image).save(target / f"{n:06d}.png")
                continue
            source = _need(Path(image))
            out = target / f"{n:06d}_{source.name}"
            if copy:
                shutil.copy2(source, out)
            else:
                out.symlink_to(source.resolve())
    templates = MTIL_TEMPLATES[dataset] if protocol == "mtil" else ONE_TEMPLATE
    meta = {"name": dataset, "templates": list(templates), "protocol": protocol, "classes": split.classes,
            "split": split.split, "n_train": len(split.train), "n_test": len(split.test)}
    (dest / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def prepare(protocol: str, source: Path, out: Path, datasets: Sequence[str] | None = None,
            copy: bool = False) -> list[dict]:
    """Build every dataset of `protocol` ('mtil' or 'xtail') found under `source` into `out`."""
    order = MTIL if protocol == "mtil" else XTAIL
    datasets = list(datasets or order)
    bad = [d for d in datasets if d not in order]
    if bad:
        raise DataError(f"unknown dataset(s) {', '.join(bad)} for {protocol}; known: {', '.join(order)}")
    return [write_domain(READERS[protocol][d](Path(source)), Path(out) / d, d, protocol, copy) for d in datasets]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=("mtil", "xtail"))
    parser.add_argument("--source", type=Path, required=True, help="the downloaded datasets' root folder")
    parser.add_argument("--out", type=Path, required=True, help="where the domain folders go")
    parser.add_argument("--datasets", default=None, help="comma-separated subset, in protocol order by default")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    args = parser.parse_args(argv)
    try:
        metas = prepare(args.protocol, args.source, args.out,
                        args.datasets.split(",") if args.datasets else None, args.copy)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    order = " ".join(str(args.out / m["name"]) for m in metas)
    for m in metas:
        print(f"{m['name']:>14}: {len(m['classes'])} classes, {m['n_train']} train, {m['n_test']} test ({m['split']})")
    print(f"\nlearning order for edgeclip eval:\n  {order}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    raise SystemExit(main())

"""benchmarks/prepare_data.py on small synthetic stand-ins of every source layout it reads
(torchvision's for MTIL, CoOp's for X-TAIL), built here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import prepare_data as prep  # noqa: E402

from edgeclip.domain import read_domain  # noqa: E402


def img(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(path, format="PNG")
    return path


def lines(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


def idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    idx(raw / "train-images-idx3-ubyte", np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256)
    idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 7]))
    idx(raw / "t10k-images-idx3-ubyte", np.full((2, 28, 28), 9))
    idx(raw / "t10k-labels-idx1-ubyte", np.array([7, 0]))


def torchvision_layouts(root: Path) -> None:
    """One stand-in per MTIL dataset, in torchvision's layout."""
    from scipy.io import savemat

    air = root / "fgvc-aircraft-2013b" / "data"
    lines(air / "variants.txt", ["707-320", "A300B4"])
    lines(air / "images_variant_train.txt", ["0001 707-320", "0002 A300B4"])
    lines(air / "images_variant_test.txt", ["0003 A300B4", "0004 707-320"])
    for i in range(1, 5):
        img(air / "images" / f"000{i}.jpg", i)
    cal = root / "caltech101" / "101_ObjectCategories"
    img(cal / "BACKGROUND_Google" / "image_0001.jpg")
    for k in range(101):
        for i in range(1, 3):
            img(cal / f"cat{k:03d}" / f"image_{i:04d}.jpg", k)
    cif = root / "cifar-100-binary"
    lines(cif / "fine_label_names.txt", ["apple", "aquarium_fish", "bear"])
    rows = np.zeros((4, 3074), np.uint8)
    rows[:, 1] = [0, 1, 2, 1]
    rows[:, 2:] = np.arange(4)[:, None] * 10
    (cif / "train.bin").write_bytes(rows.tobytes())
    (cif / "test.bin").write_bytes(rows[:2].tobytes())
    dtd = root / "dtd" / "dtd"
    for c in ("banded", "bubbly"):
        for i in range(2):
            img(dtd / "images" / c / f"{c}_{i}.jpg")
    lines(dtd / "labels" / "train1.txt", ["banded/banded_0.jpg", "bubbly/bubbly_0.jpg"])
    lines(dtd / "labels" / "test1.txt", ["banded/banded_1.jpg", "bubbly/bubbly_1.jpg"])
    euro = root / "eurosat" / "2750"
    for k, c in enumerate(["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                           "PermanentCrop", "Residential", "River", "SeaLake"]):
        for i in range(5):
            img(euro / c / f"{c}_{i}.jpg", k)
    flo = root / "flowers-102"
    for i in range(1, 5):
        img(flo / "jpg" / f"image_{i:05d}.jpg", i)
    flo.mkdir(exist_ok=True)
    savemat(flo / "imagelabels.mat", {"labels": np.array([[1, 2, 1, 102]])})
    savemat(flo / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[3, 4]])})
    food = root / "food-101"
    (food / "meta").mkdir(parents=True)
    (food / "meta" / "train.json").write_text(json.dumps({"apple_pie": ["apple_pie/1"], "sushi": ["sushi/2"]}))
    (food / "meta" / "test.json").write_text(json.dumps({"apple_pie": ["apple_pie/3"], "sushi": ["sushi/4"]}))
    for c, i in (("apple_pie", 1), ("sushi", 2), ("apple_pie", 3), ("sushi", 4)):
        img(food / "images" / c / f"{i}.jpg", i)
    mnist(root)
    pet = root / "oxford-iiit-pet"
    lines(pet / "annotations" / "trainval.txt", ["Abyssinian_1 1 1 1", "american_bulldog_2 2 2 1"])
    lines(pet / "annotations" / "test.txt", ["american_bulldog_3 2 2 1", "Abyssinian_4 1 1 1"])
    for n in ("Abyssinian_1", "american_bulldog_2", "american_bulldog_3", "Abyssinian_4"):
        img(pet / "images" / f"{n}.jpg")
    cars = root / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    savemat(cars / "devkit" / "cars_meta.mat", {"class_names": np.array([["AM General Hummer SUV 2000",
                                                                           "Acura RL Sedan 2012"]], dtype=object)})
    ann = np.array([("00001.jpg", 2), ("00002.jpg", 1)], dtype=[("fname", "O"), ("class", "O")])
    savemat(cars / "devkit" / "cars_train_annos.mat", {"annotations": ann.reshape(1, -1)})
    savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": ann.reshape(1, -1)})
    for folder in ("cars_train", "cars_test"):
        for n in ("00001.jpg", "00002.jpg"):
            img(cars / folder / n)
    sun = root / "SUN397"
    lines(sun / "ClassName.txt", ["/a/abbey", "/a/apse/indoor"])
    for i in range(5):
        img(sun / "a" / "abbey" / f"sun_a{i}.jpg")
        img(sun / "a" / "apse" / "indoor" / f"sun_b{i}.jpg")


def coop_layouts(root: Path) -> None:
    """One stand-in per X-TAIL dataset, in CoOp's layout (MNIST in torchvision's)."""
    names = {"caltech101": ["face", "leopard"], "dtd": ["banded", "bubbly"],
             "eurosat": ["Annual Crop Land", "Forest"], "flowers": ["pink primrose", "sweet pea"],
             "food": ["apple pie", "sushi"], "oxford_pet": ["abyssinian", "beagle"],
             "stanford_cars": ["Acura RL Sedan 2012", "AM General Hummer SUV 2000"], "sun397": ["abbey", "apse indoor"]}
    for dataset, (folder, images, split_file) in prep.COOP.items():
        data = {"train": [], "val": [], "test": []}
        for split in ("train", "test"):
            for label, name in enumerate(names[dataset]):
                rel = f"{split}/{label}_{dataset}.jpg"
                img(root / folder / images / rel, label)
                data[split].append([rel, label, name])
        (root / folder / split_file).write_text(json.dumps(data))
    air = root / "fgvc_aircraft"
    lines(air / "variants.txt", ["707-320", "A300B4"])
    lines(air / "images_variant_train.txt", ["0001 707-320", "0002 A300B4"])
    lines(air / "images_variant_test.txt", ["0003 A300B4", "0004 707-320"])
    for i in range(1, 5):
        img(air / "images" / f"000{i}.jpg", i)
    mnist(root)


def linked(domain: Path, split: str) -> dict[str, list[str]]:
    """class folder -> sorted names of the source files its links point at (or its PNG files)."""
    return {c.name: sorted(p.resolve().name if p.is_symlink() else p.name for p in c.iterdir())
            for c in sorted((domain / split).iterdir())}


def test_mtil_from_torchvision_layouts(tmp_path: Path) -> None:
    pytest.importorskip("torch")  # ZSCL's 80/20 split is drawn by torch.randperm
    pytest.importorskip("scipy")
    torchvision_layouts(tmp_path / "src")
    metas = {m["name"]: m for m in prep.prepare("mtil", tmp_path / "src", tmp_path / "out")}
    out = tmp_path / "out"
    assert list(metas) == list(prep.MTIL)
    for name, meta in metas.items():
        on_disk = json.loads((out / name / "meta.json").read_text())
        assert on_disk["templates"] == list(prep.MTIL_TEMPLATES[name]) and on_disk["protocol"] == "mtil"
    assert linked(out / "aircraft", "train") == {"707-320": ["0001.jpg"], "A300B4": ["0002.jpg"]}
    assert linked(out / "aircraft", "test") == {"707-320": ["0004.jpg"], "A300B4": ["0003.jpg"]}
    cal = metas["caltech101"]
    assert cal["classes"][:2] == ["off-center face", "centered face"] and (cal["n_train"], cal["n_test"]) == (161, 41)
    train_idx, test_idx = prep.seeded_split(202)
    assert len(train_idx) == 161 and sorted(train_idx + test_idx) == list(range(202))
    assert not (out / "caltech101" / "train" / "BACKGROUND_Google").exists()
    assert metas["cifar100"]["classes"] == ["apple", "aquarium fish", "bear"]
    png = next((out / "cifar100" / "train" / "bear").iterdir())
    assert np.asarray(Image.open(png)).shape == (32, 32, 3) and np.asarray(Image.open(png))[0, 0, 0] == 20
    assert linked(out / "dtd", "test") == {"banded": ["banded_1.jpg"], "bubbly": ["bubbly_1.jpg"]}
    euro = metas["eurosat"]
    assert euro["classes"] == list(prep.EUROSAT_NAMES) and (euro["n_train"], euro["n_test"]) == (40, 10)
    assert len(linked(out / "flowers", "test")) == 102  # every class folder, even one empty in this stand-in
    assert linked(out / "flowers", "test")["pink primrose"] == ["image_00003.jpg"]
    assert linked(out / "flowers", "test")["blackberry lily"] == ["image_00004.jpg"]
    assert linked(out / "food", "train") == {"apple pie": ["1.jpg"], "sushi": ["2.jpg"]}
    assert metas["mnist"]["classes"][7] == "7 - seven" and len(linked(out / "mnist", "test")["7 - seven"]) == 1
    assert metas["oxford_pet"]["classes"] == ["Abyssinian", "American Bulldog"]
    assert linked(out / "oxford_pet", "test") == {"Abyssinian": ["Abyssinian_4.jpg"],
                                                  "American Bulldog": ["american_bulldog_3.jpg"]}
    assert linked(out / "stanford_cars", "train") == {"AM General Hummer SUV 2000": ["00002.jpg"],
                                                      "Acura RL Sedan 2012": ["00001.jpg"]}
    assert metas["sun397"]["classes"] == ["abbey", "apse/indoor"]  # meta keeps the name, the folder cannot
    assert sorted(p.name for p in (out / "sun397" / "train").iterdir()) == ["abbey", "apse indoor"]
    domain = read_domain(out / "dtd", split="train")  # edgeclip reads what was written
    assert domain.name == "dtd" and domain.classes == ["banded", "bubbly"] and len(domain.templates) == 8


def test_xtail_from_coop_layouts_with_rails_class_names(tmp_path: Path) -> None:
    coop_layouts(tmp_path / "src")
    metas = {m["name"]: m for m in prep.prepare("xtail", tmp_path / "src", tmp_path / "out")}
    out = tmp_path / "out"
    assert list(metas) == list(prep.XTAIL) and "cifar100" not in metas
    for name in metas:
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["templates"] == ["a photo of a {}."] and meta["protocol"] == "xtail"
        assert "CoOp" in meta["split"] or name == "mnist"
    assert metas["eurosat"]["classes"] == ["Annual Crop Land satellite location", "Forest satellite location"]
    assert metas["mnist"]["classes"][0] == 'number: "0 - zero"'
    assert linked(out / "caltech101", "test") == {"face": ["0_caltech101.jpg"], "leopard": ["1_caltech101.jpg"]}
    assert linked(out / "stanford_cars", "train")["AM General Hummer SUV 2000"] == ["1_stanford_cars.jpg"]
    assert linked(out / "aircraft", "test") == {"707-320": ["0004.jpg"], "A300B4": ["0003.jpg"]}
    domain = read_domain(out / "eurosat", split="test")
    assert domain.templates == ["a photo of a {}."] and domain.classes[0] == "Annual Crop Land satellite location"


def test_bad_sources_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(prep.DataError, match="missing .*variants.txt"):
        prep.prepare("xtail", tmp_path, tmp_path / "out", ["aircraft"])
    with pytest.raises(prep.DataError, match="unknown dataset"):
        prep.prepare("xtail", tmp_path, tmp_path / "out", ["cifar100"])
    coop_layouts(tmp_path / "src")
    prep.prepare("xtail", tmp_path / "src", tmp_path / "out", ["dtd"])
    with pytest.raises(prep.DataError, match="exists"):
        prep.prepare("xtail", tmp_path / "src", tmp_path / "out", ["dtd"])
    assert prep.main(["xtail", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2

"""Every kind of awkward input file: each decodes to the right RGB image or fails with a
one-line ImageError naming the file; nothing else escapes, alone or in `iter_batches`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import numpy as np
import pytest
from PIL import Image

from edgeclip.discover import display_path
from edgeclip.errors import ImageError
from edgeclip.images import decode_image, iter_batches, load_image
from edgeclip.manifest import Preprocess
from image_helpers import BAD, GOOD, corrupt_exif_jpeg, process_state, write

CFG = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def assert_clear_error(err: ImageError, path: Path, word: str) -> None:
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"cannot read image {display_path(path)}: "), message
    assert word in message, message
    message.encode("utf-8")  # printable whatever the file name


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_files_decode_to_rgb(name, tmp_path):
    """...without a warning: palette transparency, EXIF orientation and the rest are read the way Pillow
    does not warn about (the library leaves warnings to the application, so there must be none to leave)."""
    import warnings

    path = write(tmp_path, {name: GOOD[name]})[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(path)
        assert decode_image(path, cover=2).image.mode == "RGB"
    assert img.mode == "RGB"
    GOOD[name][1](np.asarray(img))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_a_clear_image_error(name, tmp_path):
    path = write(tmp_path, {name: BAD[name]})[name]
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert_clear_error(info.value, path, BAD[name][1])


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(path)
    assert load_image(path, max_pixels=200).size == (20, 10)
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=199)
    assert_clear_error(info.value, path, "20x10 = 200 pixels, limit 199")


def test_missing_file_and_folder_in_place_of_a_file(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.jpg")
    assert_clear_error(info.value, tmp_path / "nope.jpg", "no such file")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageError) as info:
        load_image(folder)
    assert_clear_error(info.value, folder, "is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as info:
        load_image(fifo)
    assert_clear_error(info.value, fifo, "not a regular file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert_clear_error(info.value, path, "permission denied")
    finally:
        path.chmod(0o600)


def test_non_utf8_file_names(tmp_path):
    good = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    Image.new("RGB", (4, 4), (3, 3, 3)).save(good)
    assert load_image(good).getpixel((0, 0)) == (3, 3, 3)
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.jpg"))
    bad.write_bytes(b"junk")
    with pytest.raises(ImageError) as info:
        load_image(bad)
    assert "bad\\xff.jpg" in str(info.value)
    assert_clear_error(info.value, bad, "not a recognised")


def test_iter_batches_keeps_good_reports_bad_in_order(tmp_path):
    files = {**GOOD, **BAD}
    order = sorted(files)  # interleaves good and bad
    paths = write(tmp_path, files)
    missing = tmp_path / "missing.png"
    inputs = [paths[n] for n in order] + [missing, tmp_path]
    batches = list(iter_batches(inputs, CFG, batch_size=3, workers=2))
    decoded = [p for b in batches for p in b.paths]
    errors = [p for b in batches for p, _ in b.errors]
    assert decoded == [paths[n] for n in order if n in GOOD]
    assert errors == [paths[n] for n in order if n in BAD] + [missing, tmp_path]
    for b in batches:
        assert b.pixels.shape == (len(b.paths), 3, 16, 16) and b.pixels.dtype == np.float32
        assert np.isfinite(b.pixels).all()
        for path, message in b.errors:
            assert message.startswith(f"cannot read image {display_path(path)}: ")


# ---------------------------------------------------------------- through the CLI


def run_cli(args: list[str]) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    code = f"import sys\nsys.argv = ['edgeclip'] + {[str(a) for a in args]!r}\nfrom edgeclip.edgeapp.cli.app import main\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A RAIL bundle of the tiny config with random weights and no task (zero-shot labels)."""
    pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("bad-inputs") / "bundle"
    result = run_cli(["init", "--bundle", root, "--model", "edgeclip-tiny", "--random-weights", "--seed", "0",
                      "--method", "rail-primal", "--hidden", "256", "--labels", "a cat,a dog", "--quiet"])
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.slow
def test_every_file_in_a_folder_is_accounted_for(tiny_bundle, tmp_path):
    """Each unreadable kind inside a folder is an error row (exit 3), a HEIC photo is classified,
    non-images are counted as skipped (listed with --verbose), hidden and AppleDouble files ignored."""
    folder = tmp_path / "camera roll"
    folder.mkdir()
    write(folder, {"good.jpg": GOOD["rotated.jpg"], "empty.jpg": BAD["empty.jpg"],
                   "truncated.jpg": BAD["truncated.jpg"], "random.png": BAD["random.jpg"],
                   "text.png": BAD["text.png"], "bomb.png": BAD["bomb.png"], "plain.tga": GOOD["plain.tga"],
                   "float.tiff": GOOD["float.tiff"]})
    (folder / "exif.jpg").write_bytes(corrupt_exif_jpeg())
    expected_ok = {"good.jpg", "plain.tga", "float.tiff", "exif.jpg"}
    pytest.importorskip("pillow_heif").register_heif_opener()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(folder / "IMG_0001.HEIC", "HEIF")
    expected_ok.add("IMG_0001.HEIC")
    (folder / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20)  # a broken HEIC
    expected_bad = {"empty.jpg", "truncated.jpg", "random.png", "text.png", "bomb.png", "IMG_0002.HEIC"}
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "pipe.jpg")
        expected_bad.add("pipe.jpg")
    (folder / "notes.txt").write_text("shopping list")
    (folder / "clip.mov").write_bytes(b"\x00\x00\x00\x14ftypqt  " + b"\x00" * 30)
    (folder / "._good.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00")
    (folder / ".thumbnail.png").write_bytes(GOOD["grey.png"][0])

    result = run_cli(["classify", folder, "--bundle", tiny_bundle, "--format", "json", "--verbose"])
    assert result.returncode == 3, result.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert {n for n, r in rows.items() if r["error"] is None and r["label"]} == expected_ok
    assert {n for n, r in rows.items() if r["error"]} == expected_bad
    assert "empty" in rows["empty.jpg"]["error"] and "not a regular file" in rows.get("pipe.jpg", {"error": "not a regular file"})["error"]
    assert rows["bomb.png"]["error"].endswith(": image too large (100000x100000 = 10000000000 pixels, limit 89478485), "
                                              "refused as a possible decompression bomb; --max-pixels raises the limit")
    assert "Truncated File Read" in rows["exif.jpg"]["note"] and "Truncated" not in result.stderr
    assert f"{len(expected_ok)} classified, {len(expected_bad)} unreadable, 2 skipped (not images)" in result.stderr
    assert "skipped" in result.stderr and "notes.txt: not an image" in result.stderr and "clip.mov" in result.stderr
    assert "._good.jpg" not in result.stdout + result.stderr and ".thumbnail.png" not in result.stdout

    exact = run_cli(["classify", folder / "good.jpg", "--bundle", tiny_bundle, "--format", "json", "--quiet",
                     "--exact-preprocess", "--max-pixels", "1000000"])
    assert exact.returncode == 0, exact.stderr
    refused = run_cli(["classify", folder / "good.jpg", "--bundle", tiny_bundle, "--format", "json", "--quiet",
                       "--exact-preprocess", "--max-pixels", "100"])
    assert refused.returncode == 3 and "--max-pixels" in json.loads(refused.stdout)["error"]


@pytest.mark.slow
def test_classifying_leaves_the_process_as_it_was(tiny_bundle, tmp_path, recwarn):
    """Issue 19: after the API classified a large photo and one with a corrupt EXIF block, Pillow's
    MAX_IMAGE_PIXELS, the warnings machinery and Pillow's modules are as they were (the old code raised the
    limit to 5.7 GP and patched the modules for good); Pillow's warning went to the application. The CLI
    (in this process) still makes it the file's note, also for files the API put in the embedding cache
    (their cached notes lack Pillow's warnings, so the CLI does not read them), and undoes its settings."""
    import edgeclip
    from cli_helpers import invoke

    large = tmp_path / "large.jpg"
    Image.linear_gradient("L").resize((4000, 3000)).convert("RGB").save(large, quality=80)  # 12 MP
    (tmp_path / "exif.jpg").write_bytes(corrupt_exif_jpeg())
    before = process_state()
    predictions = edgeclip.load(tiny_bundle).classify([large, tmp_path / "exif.jpg"], top_k=1)
    assert [p.error for p in predictions] == [None, None] and all(p.label for p in predictions)
    assert process_state() == before
    assert [w for w in recwarn if "Truncated File Read" in str(w.message)]
    result = invoke("classify", large, tmp_path / "exif.jpg", "--bundle", tiny_bundle, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    notes = [json.loads(line)["note"] for line in result.stdout.splitlines()]
    assert notes[0] is None and "Truncated File Read" in notes[1]
    table = invoke("classify", tmp_path / "exif.jpg", "--bundle", tiny_bundle, "--quiet").stdout
    assert "(note: " in table and "Truncated File Read" in table  # the default format shows it too
    assert process_state() == before


def test_a_ray_decoding_task_gives_notes_and_leaves_its_worker_as_it_was(tmp_path):
    """`decode_batch` runs alone in a Ray worker, so it opts in as the CLI does, for its duration only."""
    pytest.importorskip("pyarrow")
    from edgeclip.edgeapp.distributed import decode_batch

    write(tmp_path, {"exif.jpg": (corrupt_exif_jpeg(), None), "bomb.png": BAD["bomb.png"]})
    before = process_state()
    files = np.array([os.fsencode(tmp_path / "exif.jpg"), os.fsencode(tmp_path / "bomb.png")], dtype=object)
    out = decode_batch({"file": files}, msgspec.json.encode(Preprocess(8, (0.5,) * 3, (0.5,) * 3)), 0)
    assert process_state() == before
    assert "Truncated File Read" in out["note"][0] and out["error"][0] == ""
    assert out["error"][1].endswith("refused as a possible decompression bomb; --max-pixels raises the limit")


def _domain(root: Path, good: dict[str, int], bad: dict[str, int]) -> Path:
    for cls, n in good.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    for cls, n in bad.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"broken{i}.jpg").write_bytes(b"" if i % 2 else b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.mark.slow
def test_add_task_refuses_an_all_unreadable_class_and_names_unreadable_files(tiny_bundle, tmp_path):
    from edgeclip.bundle import Bundle

    before = Bundle.open(tiny_bundle).version
    domain = _domain(tmp_path / "pets", {"cat": 4}, {"dog": 3})
    result = run_cli(["add-task", domain, "--bundle", tiny_bundle, "--quiet"])
    assert result.returncode == 2, result.stderr
    assert "'dog' (0 readable, 3 unreadable)" in result.stderr
    assert "at least 1 readable image per class and 3 in the task" in result.stderr
    assert "broken0.jpg" in result.stderr  # the warning names the files
    assert Bundle.open(tiny_bundle).version == before  # nothing learned

    domain = _domain(tmp_path / "pets2", {"cat": 4, "dog": 3}, {"dog": 2})
    result = run_cli(["add-task", domain, "--bundle", tiny_bundle])
    assert result.returncode == 0, result.stderr
    assert "broken0.jpg" in result.stderr and "broken1.jpg" in result.stderr
    assert "7 images, 2 unreadable left out" in result.stderr
    task = Bundle.open(tiny_bundle).tasks[-1]
    assert task.n_images == 7 and task.unreadable_images == 2


def test_minimum_readable_images_message():
    from edgeclip.domain import Domain, require_enough_images
    from edgeclip.errors import DomainError

    domain = Domain("pets", Path("pets"), ["cat", "dog"], [])
    require_enough_images(domain, {0: 2, 1: 1}, {})
    with pytest.raises(DomainError, match=r"'dog' \(0 readable, 3 unreadable\).*at least 1 readable image per class"):
        require_enough_images(domain, {0: 5}, {1: 3})
    with pytest.raises(DomainError, match=r"only 2 readable image\(s\).*1 unreadable.*3 in the task"):
        require_enough_images(domain, {0: 1, 1: 1}, {0: 1})

"""Photo folders: the marginal cost of a 12 MP phone JPEG in `edgeclip classify`, next to Pillow's
DCT-scaled decode of the same files measured in the same run, and the difference between the fast
(reduced) decode and the exact (full-resolution, open_clip) decode.

Part 1, speed (`--part speed`):
  * generates phone-like 12 MP JPEGs (4032x3024, EXIF orientation 6 on every other one, about 3 MB
    each: smooth light plus sensor-like noise and edges) with a fixed seed; no internet needed;
  * makes (or reuses, `--bundle`) an edgeclip-small bundle with random weights;
  * times the real CLI (`edgeclip classify DIR --format json --quiet`, a fresh process each) on a
    folder of N/2 and of N photos, fast and `--exact-preprocess`, in interleaved rounds; the
    marginal cost per photo is (t(N) - t(N/2)) / (N/2), so start-up and model loading cancel out;
  * times Pillow's DCT-scaled decode (`Image.open`, `draft("RGB", (S, S))`, `load()`, one thread)
    of the same files, in the same rounds;
  * reports the ratio marginal / Pillow (the goal: at most 1.5).

Part 2, quality (`--part quality`): the real images of ../shared/datasets (caltech101, dtd10) decoded
fast and exact, each as it is and upscaled to 12 MP phone resolution (bicubic, saved as JPEG
quality 92), through the bundle's image encoder: embedding cosine and top-1 agreement over the
dataset's classes (zero-shot through the bundle's text encoder). The weights are random, so the
figures measure how much the inputs differ as the encoder sees them, not accuracy.

Usage: python benchmarks/bench_photos.py [--photos 24] [--rounds 5] [--bundle DIR] [--part both]
Writes benchmarks/results/photos.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_name  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "datasets"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/datasets")
PHONE = (4032, 3024)


def phone_jpeg(path: Path, seed: int) -> None:
    """A 12 MP phone-like photo: smooth light, a few edges, sensor noise; EXIF-rotated on odd seeds."""
    rng = np.random.default_rng(seed)
    w, h = PHONE
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    phase = rng.uniform(0, 6, 3).astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 90 * np.sin(3 * x + 2 * y + phase[c]) * np.cos(2 * y - x + phase[c])
    for _ in range(12):  # objects with hard edges
        x0, y0 = rng.integers(0, w - 400), rng.integers(0, h - 400)
        img[y0:y0 + rng.integers(100, 400), x0:x0 + rng.integers(100, 400)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 7, (h, w, 1)).astype(np.float32)  # luminance noise
    exif = Image.Exif()
    exif[0x0112] = 6 if seed % 2 else 1
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90, exif=exif)


CLI = "import sys; from edgeclip.edgeapp.cli.app import main; sys.argv = ['edgeclip'] + sys.argv[1:]; main()"


def make_bundle(root: Path, labels: str) -> None:
    """An edgeclip-small RAIL bundle with random weights (needs the train extra to export)."""
    subprocess.run([sys.executable, "-c", CLI, "init", "--bundle", str(root), "--model", "edgeclip-small",
                    "--random-weights", "--seed", "0", "--method", "rail-primal", "--labels", labels, "--quiet"],
                   check=True)


def classify_seconds(folder: Path, bundle: Path, exact: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process: user + system) of one `edgeclip classify` run."""
    import resource

    args = [sys.executable, "-c", CLI, "classify", str(folder), "--bundle", str(bundle), "--format", "json", "--quiet"]
    if exact:
        args.append("--exact-preprocess")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"classify failed: {done.stderr}")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(r["error"] is None for r in rows), rows
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def pillow_draft_ms(files: list[Path], size: int) -> tuple[float, float]:
    """(wall, CPU) mean ms per file of Pillow's DCT-scaled decode (one thread)."""
    start, cpu = time.perf_counter(), time.process_time()
    for f in files:
        with Image.open(f) as img:
            img.draft("RGB", (size, size))
            img.load()
    return ((time.perf_counter() - start) * 1000 / len(files), (time.process_time() - cpu) * 1000 / len(files))


def speed(args: argparse.Namespace, bundle: Path, work: Path) -> dict:
    photos = work / "photos"
    half, full = photos / "half", photos / "full"
    half.mkdir(parents=True, exist_ok=True)
    full.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(args.photos):
        path = full / f"IMG_{i:04d}.jpg"
        if not path.exists():
            phone_jpeg(path, i)
        files.append(path)
        if i < args.photos // 2 and not (half / path.name).exists():
            os.link(path, half / path.name)
    n_half = args.photos // 2
    size = 224
    keys = ["fast_half", "fast_full", "exact_half", "exact_full"]
    timings: dict[str, list[float]] = {k: [] for k in keys + ["pillow_draft_ms"]}
    cpu: dict[str, list[float]] = {k: [] for k in keys + ["pillow_draft_ms"]}
    classify_seconds(half, bundle, False)  # warm the file cache and the bundle
    for r in range(args.rounds):
        order = [("fast", False), ("exact", True)]
        if r % 2:
            order.reverse()
        for name, exact in order:
            for part, folder in (("half", half), ("full", full)):
                wall, used = classify_seconds(folder, bundle, exact)
                timings[f"{name}_{part}"].append(wall)
                cpu[f"{name}_{part}"].append(used)
        wall, used = pillow_draft_ms(files, size)
        timings["pillow_draft_ms"].append(wall)
        cpu["pillow_draft_ms"].append(used)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in timings.items()), flush=True)
    out = {"breakdown": breakdown(files, bundle, size, args.rounds)}
    out |= {"photos": args.photos, "photo_size": list(PHONE), "file_mb": round(sum(f.stat().st_size for f in files)
                                                                              / len(files) / 1e6, 2),
           "rounds": args.rounds, "wall_s": timings, "cpu_s": cpu}
    for measure, data in (("wall", timings), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in data.items()}
        pillow = med["pillow_draft_ms"]
        out[f"pillow_draft_{measure}_ms"] = round(pillow, 1)
        for name in ("fast", "exact"):
            marginal = (med[f"{name}_full"] - med[f"{name}_half"]) * 1000 / (args.photos - n_half)
            out[f"{name}_marginal_{measure}_ms"] = round(marginal, 1)
            out[f"{name}_{measure}_ratio"] = round(marginal / pillow, 2)
    return out


def breakdown(files: list[Path], bundle_dir: Path, size: int, rounds: int) -> dict:
    """Per-photo ms (wall and CPU, medians over interleaved rounds, one thread) of the parts of
    classify's marginal cost: Pillow's DCT-scaled decode alone, edgeclip's fast decode + preprocess,
    the exact decode + preprocess, and the gated graph's inference per photo at batch 16."""
    from edgeclip.edgeapp.classify import build_label_space
    from edgeclip.edgeapp.runtime import GatedRunner, TextEncoderRunner

    from edgeclip.bundle import Bundle
    from edgeclip.images import decode_and_preprocess

    bundle = Bundle.open(bundle_dir)
    cfg = bundle.meta.preprocess
    runner = GatedRunner(bundle, "auto")
    labels = build_label_space(bundle, [], TextEncoderRunner(bundle, "auto").class_embeddings)
    pixels = np.stack([decode_and_preprocess(f, cfg)[0] for f in files[:16]])

    def per_photo(fn, items) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for item in items:
            fn(item)
        return ((time.perf_counter() - start) * 1000 / len(items), (time.process_time() - cpu) * 1000 / len(items))

    def draft(f: Path) -> None:
        with Image.open(f) as img:
            img.draft("RGB", (size, size))
            img.load()

    parts = {
        "pillow draft decode": lambda: per_photo(draft, files),
        "edgeclip fast decode + preprocess": lambda: per_photo(lambda f: decode_and_preprocess(f, cfg), files),
        "edgeclip exact decode + preprocess": lambda: per_photo(
            lambda f: decode_and_preprocess(f, cfg.with_exact(True)), files[:6]),
        "gated graph inference (batch 16)": lambda: tuple(
            v / 16 for v in per_photo(lambda _: runner.run(pixels, labels.text), [0, 1])),
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in parts}
    for r in range(rounds):
        keys = list(parts)[r % len(parts):] + list(parts)[:r % len(parts)]
        for key in keys:
            samples[key].append(parts[key]())
    return {k: {"wall_ms": round(statistics.median(w for w, _ in v), 1), "cpu_ms": round(statistics.median(c for _, c in v), 1)}
            for k, v in samples.items()}


def _extract(name: str, per_class: int, classes: int, dest: Path) -> tuple[list[Path], list[int], list[str], list[str]]:
    """Up to `per_class` test images of the first `classes` classes of a shared data set."""
    with tarfile.open(SHARED / f"{name}.tar") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/test/" in m.name]
        meta = json.load(tar.extractfile(f"{name}/meta.json"))
        names = sorted({m.name.split("/")[2] for m in members})[:classes]
        chosen = []
        for c in names:
            chosen += sorted((m for m in members if m.name.split("/")[2] == c), key=lambda m: m.name)[:per_class]
        tar.extractall(dest, members=chosen, filter="data")
    paths = [dest / m.name for m in chosen]
    labels = [names.index(m.name.split("/")[2]) for m in chosen]
    return paths, labels, names, list(meta.get("templates") or ["a photo of a {}."])


def quality(args: argparse.Namespace, bundle_dir: Path, work: Path) -> dict:
    from edgeclip.edgeapp.runtime import ImageEncoderRunner, TextEncoderRunner

    from edgeclip.bundle import Bundle
    from edgeclip.images import iter_batches

    bundle = Bundle.open(bundle_dir)
    cfg = bundle.meta.preprocess
    images = ImageEncoderRunner(bundle)
    texts = TextEncoderRunner(bundle)
    results = {}
    for name in ("caltech101", "dtd10"):
        if not (SHARED / f"{name}.tar").exists():
            print(f"skipping {name}: {SHARED} not found")
            continue
        dest = work / "real"
        paths, labels, classes, templates = _extract(name, args.per_class, args.classes, dest)
        text = texts.class_embeddings(classes, templates[:4])
        upscaled = []
        for p in paths:
            out = work / "upscaled" / name / (p.stem + ".jpg")
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(p) as img:
                    img = img.convert("RGB")
                    scale = max(PHONE) / max(img.size)  # the long side becomes 4032
                    img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC).save(
                        out, "JPEG", quality=92)
            upscaled.append(out)
        for variant, files in (("as stored", paths), ("upscaled to 12 MP", upscaled)):
            emb, pix = {}, {}
            for mode, exact in (("fast", False), ("exact", True)):
                c = cfg.with_exact(exact)
                batches = list(iter_batches(files, c, batch_size=32))
                pix[mode] = np.concatenate([b.pixels for b in batches])
                emb[mode] = np.concatenate([images.embed(b.pixels) for b in batches])
                emb[mode] /= np.linalg.norm(emb[mode], axis=1, keepdims=True)
            cos = np.sum(emb["fast"] * emb["exact"], axis=1)
            others = emb["exact"] @ emb["exact"].T
            between = others[~np.eye(len(files), dtype=bool)]  # different images, exact path
            top_fast = np.argmax(emb["fast"] @ text.T, axis=1)
            top_exact = np.argmax(emb["exact"] @ text.T, axis=1)
            # nearest other image (retrieval) by each path's embedding: does the neighbour change?
            nn = {m: np.argmax(np.where(np.eye(len(files), dtype=bool), -np.inf, emb[m] @ emb["exact"].T), axis=1)
                  for m in emb}
            std = np.asarray(cfg.std, np.float32)[None, :, None, None]
            sizes = [Image.open(f).size for f in files[:50]]
            results[f"{name} ({variant})"] = {
                "images": len(files), "classes": len(classes),
                "median_size": [int(np.median([s[0] for s in sizes])), int(np.median([s[1] for s in sizes]))],
                "pixel_mean_abs_diff_8bit": float(np.mean(np.abs(pix["fast"] - pix["exact"]) * std) * 255),
                "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                "cosine_between_different_images_mean": float(between.mean()),
                "relative_distance": float(np.mean(1 - cos) / np.mean(1 - between)),
                "top1_agreement": float(np.mean(top_fast == top_exact)),
                "top1_distinct_labels_exact": int(len(np.unique(top_exact))),
                "nearest_neighbour_agreement": float(np.mean(nn["fast"] == nn["exact"])),
                "top1_exact_accuracy": float(np.mean(top_exact == np.asarray(labels))),
            }
            print(name, variant, json.dumps(results[f"{name} ({variant})"]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=24, help="12 MP photos in the full folder (half in the other)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bundle", type=Path, help="an edgeclip-small bundle to reuse (made with random weights if absent)")
    parser.add_argument("--work", type=Path, help="folder for the generated files (default: a temporary one)")
    parser.add_argument("--part", choices=("speed", "quality", "both"), default="both")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--classes", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = args.bundle or work / "bundle"
        if not bundle.exists():
            make_bundle(bundle, "a cat,a dog,a car,a tree,a person,a building")
        import onnxruntime
        import PIL

        report: dict = {
            "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "versions": {"pillow": PIL.__version__, "onnxruntime": onnxruntime.__version__},
            "model": "edgeclip-small (random weights), 224 px",
        }
        if args.part in ("speed", "both"):
            report["speed"] = speed(args, bundle, work)
        if args.part in ("quality", "both"):
            report["quality"] = quality(args, bundle, work)

    out = HERE / "results" / "photos.json"
    out.parent.mkdir(exist_ok=True)
    if args.part != "both" and out.exists():  # keep the other part's last figures, with their own date
        previous = json.loads(out.read_text())
        other = "quality" if args.part == "speed" else "speed"
        if other in previous:
            report[other] = previous[other]
            report[f"{other}_date"] = previous.get(f"{other}_date", previous.get("date"))
    report[f"{args.part}_date" if args.part != "both" else "date"] = report["date"]
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmachine: {report['machine']}; {report['date']}; {report['model']}")
    if "speed" in report:
        s = report["speed"]
        print("\n| part (one thread) | wall ms / photo | CPU ms / photo |")
        print("|---|---|---|")
        for key, v in s["breakdown"].items():
            print(f"| {key} | {v['wall_ms']} | {v['cpu_ms']} |")
        print(f"\n{s['photos']} photos of {s['photo_size'][0]}x{s['photo_size'][1]} ({s['file_mb']} MB each)")
        print("| path | measure | classify marginal ms / photo | Pillow draft decode ms / photo | ratio |")
        print("|---|---|---|---|---|")
        for name in ("fast", "exact"):
            for measure in ("wall", "cpu"):
                print(f"| classify, {name} decode | {measure} | {s[f'{name}_marginal_{measure}_ms']} | "
                      f"{s[f'pillow_draft_{measure}_ms']} | {s[f'{name}_{measure}_ratio']}x |")
    if report.get("quality"):
        print("\n| images | n | median size | pixel diff (8-bit) | cosine mean | cosine min | cosine, different images "
              "| relative distance | top-1 agreement (distinct labels) | nearest-neighbour agreement |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for key, q in report["quality"].items():
            print(f"| {key} | {q['images']} | {q['median_size'][0]}x{q['median_size'][1]} | "
                  f"{q['pixel_mean_abs_diff_8bit']:.2f} | {q['cosine_mean']:.5f} | {q['cosine_min']:.5f} | "
                  f"{q['cosine_between_different_images_mean']:.4f} | {q['relative_distance']:.4f} | "
                  f"{100 * q['top1_agreement']:.1f} % ({q['top1_distinct_labels_exact']}) | "
                  f"{100 * q['nearest_neighbour_agreement']:.1f} % |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

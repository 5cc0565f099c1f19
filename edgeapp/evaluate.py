"""The continual-learning protocols (METHODS.md section 4) run on a copy of a bundle.

Learn the domains in the given order with `pipeline.add_task`; after each step classify every
domain's test split:

- MTIL: task identity known. Each image is classified over its own domain's classes: a learned
  domain through that task's head, fused with zero-shot exactly as the gated graph does for an
  image routed to that task; a domain not yet learned by zero-shot CLIP over its class names.
- X-TAIL: task-agnostic. Every image is classified over the union of all domains' class names
  (learned classes first, in task order, then the domains not yet learned) through the gated
  decision, whose route is also scored (seen images to their task, unseen ones to zero-shot).

The backbone is frozen, so each test image is embedded once per run (`TestSuite`) and every
step re-scores the cached embeddings. For RAIL bundles the decision is computed by
`train/decision.py`, the numpy reference that the tests prove equal to graphs/gated.onnx;
`decision="graph"` instead runs graphs/gated.onnx itself on the cached pixels (the only way for
MoE X-TAIL, whose adapters change the image features; MoE MTIL forces the task through the torch
model, which needs the train extra). RAIL scoring is numpy only, no torch.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeclip.bundle import Bundle, link_or_copy
from edgeclip.domain import Domain, few_shot, read_domain
from edgeclip.edgeapp import tasks as pipeline
from edgeclip.errors import DomainError, UsageError
from edgeclip.extras import import_torch_module
from edgeclip.train import fusion

PROTOCOLS = ("mtil", "xtail")
GATES = ("ddas", "paper")  # X-TAIL gates of RAIL; MTIL needs none (task identity known)
DECISIONS = ("reference", "graph")
KNOWN_TASK = "known-task"  # the gate name under which MTIL results are stored
RAIL_METHODS = ("rail-primal", "rail-dual")

ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- metrics


def protocol_metrics(matrix: np.ndarray) -> dict[str, Any]:
    """Transfer / Average / Last per domain and their means, from A[i, j] = accuracy on domain j
    after learning step i (steps and domains in learning order, same count).

    Transfer_j = mean over i < j of A[i, j] (undefined for the first domain, so None there);
    Average_j = mean over i of A[i, j]; Last_j = A[n-1, j]. Means: Transfer over domains 2..n.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise UsageError(f"the accuracy matrix must be square [steps, domains], got {list(a.shape)}")
    n = a.shape[0]
    transfer = [None] + [float(a[:j, j].mean()) for j in range(1, n)]
    average = [float(v) for v in a.mean(axis=0)]
    last = [float(v) for v in a[-1]]
    defined = [t for t in transfer if t is not None]
    return {
        "transfer": float(np.mean(defined)) if defined else None,
        "average": float(np.mean(average)),
        "last": float(np.mean(last)),
        "per_domain": {"transfer": transfer, "average": average, "last": last},
    }


# --------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class EvalDomain:
    """A domain as the run learns and scores it: `learn_dir` is what add-task reads (the user's
    folder, or a view of it whose clashing class folders are renamed)."""

    name: str
    source: Path
    learn_dir: Path
    test: Domain
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.test.classes


def _view(domain_dir: Path, dest: Path, renames: Mapping[str, str]) -> Path:
    """A folder of symbolic links mirroring domain_dir's train/ and test/ with some class folders renamed."""
    dest.mkdir(parents=True)
    if (domain_dir / "meta.json").is_file():
        (dest / "meta.json").symlink_to((domain_dir / "meta.json").resolve())
    for split in ("train", "test"):
        (dest / split).mkdir()
        for class_dir in sorted((domain_dir / split).iterdir()):
            if class_dir.is_dir():
                (dest / split / renames.get(class_dir.name, class_dir.name)).symlink_to(class_dir.resolve())
    return dest


def prepare_domains(domain_dirs: Sequence[Path], workdir: Path,
                    test_per_class: int | Sequence[int | None] | None = None, seed: int = 0) -> list[EvalDomain]:
    """Read every domain's train and test splits; check they name the same classes.

    A bundle refuses a class name that an earlier task already learned (a prediction must name
    its task), but real benchmarks share names (Caltech101 and CIFAR-10 both have 'airplane').
    Such a class of a later domain is learned and scored as '<class> (<domain>)', through a view
    folder of symbolic links; the renames are reported. `test_per_class` (one count for all
    domains, or one per domain) subsamples the test split deterministically (few-shot's draw).
    """
    if not domain_dirs:
        raise UsageError("Give at least one domain folder.")
    per_class = (list(test_per_class) if isinstance(test_per_class, Sequence)
                 else [test_per_class] * len(domain_dirs))
    if len(per_class) != len(domain_dirs):
        raise UsageError(f"{len(per_class)} test sizes for {len(domain_dirs)} domains")
    seen: dict[str, str] = {}
    names: set[str] = set()
    out = []
    for directory, limit in zip(map(Path, domain_dirs), per_class):
        train = read_domain(directory, split="train")
        test = read_domain(directory, split="test")
        if train.classes != test.classes:
            raise DomainError(f"{directory}: train/ and test/ must hold the same class folders "
                              f"(train has {len(train.classes)}, test {len(test.classes)})")
        if train.name in names:
            raise UsageError(f"Two domains are named '{train.name}'; each domain can be learned once.")
        names.add(train.name)
        renames = {c: f"{c} ({train.name})" for c in train.classes if c.lower() in seen}
        learn_dir = directory
        if renames:
            learn_dir = _view(directory, workdir / "views" / train.name, renames)
            test = read_domain(learn_dir, split="test")
        seen.update({c.lower(): train.name for c in test.classes})
        if limit:
            test = few_shot(test, limit, seed)
        out.append(EvalDomain(train.name, directory, learn_dir, test, renames))
    return out


# --------------------------------------------------------------------------- frozen test features


@dataclass
class TestSuite:
    """Every domain's test images, embedded once by the frozen encoder, with the text
    embeddings of each domain's class names (frozen too)."""

    domains: list[EvalDomain]
    features: list[np.ndarray]  # per domain [N_j, D]
    labels: list[np.ndarray]  # per domain [N_j] int64, index into the domain's classes
    texts: list[np.ndarray]  # per domain [C_j, D]
    unreadable: list[tuple[str, str]]
    seconds: float
    pixels: list[np.ndarray] | None = None  # per domain [N_j, 3, S, S], only for decision="graph"

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]


def build_suite(bundle: Bundle, domains: list[EvalDomain], backend: str = "auto", keep_pixels: bool = False,
                progress: ProgressFn | None = None) -> TestSuite:
    start = time.perf_counter()
    feats, labels, texts, pixels, unreadable = [], [], [], [], []
    for d in domains:
        batches: list[np.ndarray] | None = [] if keep_pixels else None
        x, y, errors = pipeline.embed_domain(bundle, d.test, backend, progress=progress, pixels_out=batches)
        feats.append(x)
        labels.append(y)
        texts.append(pipeline.class_text_embeddings(bundle, d.test, backend))
        unreadable += [(str(p), msg) for p, msg in errors]
        if batches is not None:
            pixels.append(np.concatenate(batches))
    return TestSuite(domains, feats, labels, texts, unreadable, time.perf_counter() - start,
                     pixels if keep_pixels else None)


# --------------------------------------------------------------------------- one step's scores


@dataclass
class StepScores:
    """Accuracy (percent) per domain for each (protocol, gate), and X-TAIL routing per gate."""

    accuracy: dict[tuple[str, str], list[float]]
    routing: dict[str, dict[str, float | None]]


def _label_layout(n_domains: int, learned: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """Column offset of each domain in the X-TAIL label space: learned domains first (task order)."""
    order = list(learned) + [j for j in range(n_domains) if j not in learned]
    offsets, at = [0] * n_domains, 0
    for j in order:
        offsets[j], at = at, at + sizes[j]
    return offsets


def _routing_stats(route: np.ndarray, expected: np.ndarray) -> dict[str, float | None]:
    seen, ok = expected >= 0, route == expected

    def pct(mask: np.ndarray) -> float | None:
        return float(100.0 * ok[mask].mean()) if mask.any() else None

    return {"overall": pct(np.ones_like(seen)), "seen_to_task": pct(seen), "unseen_to_zero_shot": pct(~seen)}


def _with_gate(manifest: Mapping[str, Any], gate: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(manifest))
    out["method"]["settings"]["fusion"] = gate
    return out


class Scorer:
    """Scores the cached test set against one bundle version in which `learned` (domain indices,
    in task order) are the bundle's tasks."""

    def __init__(self, suite: TestSuite, decision: str = "reference", backend: str = "auto") -> None:
        if decision not in DECISIONS:
            raise UsageError(f"Unknown decision '{decision}'; expected one of {', '.join(DECISIONS)}.")
        self.suite, self.decision, self.backend = suite, decision, backend
        self.sizes = [len(d.classes) for d in suite.domains]

    def score(self, bundle: Bundle, learned: Sequence[int], protocols: Sequence[str], gates: Sequence[str],
              tensors: Mapping[str, np.ndarray] | None = None) -> StepScores:
        """`tensors` replaces the version's learned.safetensors (e.g. a head trained another way)."""
        if [t["name"] for t in bundle.tasks] != [self.suite.domains[j].name for j in learned]:
            raise UsageError("the bundle's tasks do not match the domains the run has learned")
        tensors = bundle.tensors(pipeline.LEARNED) if tensors is None else tensors
        accuracy: dict[tuple[str, str], list[float]] = {}
        routing: dict[str, dict[str, float | None]] = {}
        if "mtil" in protocols:
            accuracy[("mtil", KNOWN_TASK)] = self._mtil(bundle, tensors, learned)
        if "xtail" in protocols:
            for gate in gates:
                acc, routing[gate] = self._xtail(bundle, tensors, learned, gate)
                accuracy[("xtail", gate)] = acc
        return StepScores(accuracy, routing)

    # -- MTIL: task identity known
    def _mtil(self, bundle: Bundle, tensors: Mapping[str, np.ndarray], learned: Sequence[int]) -> list[float]:
        if bundle.tasks and bundle.method not in RAIL_METHODS:
            return self._mtil_moe(bundle, tensors, learned)
        from edgeclip.train.decision import DecisionSpec, rail_head

        spec = DecisionSpec.from_bundle(tensors, bundle.manifest)
        head = rail_head(tensors, spec) if bundle.tasks else None
        out = []
        for j, (x, y, text) in enumerate(zip(self.suite.features, self.suite.labels, self.suite.texts)):
            if j in learned:
                t = list(learned).index(j)
                lo, hi = int(spec.offsets[t]), int(spec.offsets[t] + spec.sizes[t])
                p_zs = fusion.zero_shot_probs(x, tensors["zs_text"][lo:hi], spec.logit_scale)
                s_a = head.scores(x)[:, lo:hi]
                scores = fusion.fuse_gated(p_zs, s_a, np.zeros(len(x), np.int64), np.array([0]),
                                           np.array([hi - lo]), spec.beta)
            else:
                scores = fusion.zero_shot_probs(x, text, spec.logit_scale)
            out.append(float(100.0 * (scores.argmax(axis=1) == y).mean()))
        return out

    def _mtil_moe(self, bundle: Bundle, tensors: Mapping[str, np.ndarray], learned: Sequence[int]) -> list[float]:
        """MoE with the task forced: a learned domain's images through the adapted encoder with its
        task's router, against its stored text classifier (what the gated graph computes for an image
        routed to that task, run by torch here because the graph routes by the gate); others zero-shot."""
        if self.suite.pixels is None:
            raise UsageError("MoE MTIL scoring needs a test suite built with keep_pixels=True")
        moe_task = import_torch_module("edgeclip.edgeapp.moe_task", "MoE evaluation")
        adapted_embeddings = moe_task.adapted_embeddings
        _, model = moe_task.load_moe_model(bundle)
        scale = float(bundle.manifest.get("zero_shot", {}).get("logit_scale", 100.0))
        offsets = np.cumsum([0] + [len(t["classes"]) for t in bundle.tasks])
        out = []
        for j, (x, y, text) in enumerate(zip(self.suite.features, self.suite.labels, self.suite.texts)):
            if j in learned:
                t = list(learned).index(j)
                adapted = adapted_embeddings(model, self.suite.pixels[j], t)
                scores = fusion.zero_shot_probs(adapted, tensors["task_text"][offsets[t]:offsets[t + 1]], scale)
            else:
                scores = fusion.zero_shot_probs(x, text, scale)
            out.append(float(100.0 * (scores.argmax(axis=1) == y).mean()))
        return out

    # -- X-TAIL: task-agnostic, union label space, gated decision
    def _xtail(self, bundle: Bundle, tensors: Mapping[str, np.ndarray], learned: Sequence[int],
               gate: str) -> tuple[list[float], dict[str, float | None]]:
        n = len(self.sizes)
        offsets = _label_layout(n, learned, self.sizes)
        unseen = [j for j in range(n) if j not in learned]
        label_text = np.concatenate([tensors["zs_text"]] + [self.suite.texts[j] for j in unseen]).astype(np.float32)
        outputs = self._decide(bundle, tensors, label_text, gate)
        acc, routes, expected = [], [], []
        for j, (scores, route) in enumerate(outputs):
            acc.append(float(100.0 * (scores.argmax(axis=1) == offsets[j] + self.suite.labels[j]).mean()))
            routes.append(route)
            expected.append(np.full(len(route), list(learned).index(j) if j in learned else -1, np.int64))
        return acc, _routing_stats(np.concatenate(routes), np.concatenate(expected))

    def _decide(self, bundle: Bundle, tensors: Mapping[str, np.ndarray], label_text: np.ndarray,
                gate: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(scores [N_j, L], route [N_j]) per domain."""
        if self.decision == "graph" or bundle.method not in RAIL_METHODS:
            return self._decide_graph(bundle, label_text, gate)
        from edgeclip.train.decision import gated_reference

        manifest = _with_gate(bundle.manifest, gate)
        out = gated_reference(np.concatenate(self.suite.features), label_text, tensors, manifest)
        bounds = np.cumsum([0] + [len(x) for x in self.suite.features])
        return [(out["scores"][a:b], out["route"][a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def _decide_graph(self, bundle: Bundle, label_text: np.ndarray, gate: str) -> list[tuple[np.ndarray, np.ndarray]]:
        from edgeclip.edgeapp.runtime import GatedRunner

        own = bundle.manifest["method"].get("settings", {}).get("fusion", "ddas")
        if bundle.method in RAIL_METHODS and gate != own:
            raise UsageError(f"graphs/gated.onnx of this bundle applies the '{own}' gate, not '{gate}'.")
        if self.suite.pixels is None:
            raise UsageError("decision='graph' needs a test suite built with keep_pixels=True")
        runner = GatedRunner(bundle, self.backend, max_labels=max(4096, len(label_text)))
        out = []
        for pixels in self.suite.pixels:
            parts = [runner.run(pixels[i:i + 32], label_text) for i in range(0, len(pixels), 32)]
            out.append((np.concatenate([p["scores"] for p in parts]), np.concatenate([p["route"] for p in parts])))
        return out


# --------------------------------------------------------------------------- the protocol run


@dataclass
class ProtocolResult:
    """One protocol under one gate: the accuracy matrix and what it implies."""

    protocol: str
    gate: str
    domains: list[str]
    zero_shot: list[float]  # accuracy per domain before any step (percent)
    matrix: list[list[float]]  # [steps, domains], percent
    routing: list[dict[str, float | None]] = field(default_factory=list)  # per step (X-TAIL only)

    def metrics(self) -> dict[str, Any]:
        return protocol_metrics(np.asarray(self.matrix))

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics()
        return {"protocol": self.protocol, "gate": self.gate, "domains": self.domains, "matrix": self.matrix,
                "zero_shot": self.zero_shot, "transfer": m["transfer"], "average": m["average"],
                "last": m["last"], "per_domain": m["per_domain"], "routing": self.routing}


@dataclass
class StepTiming:
    step: int
    domain: str
    learn_s: float
    score_s: float


@dataclass
class ContinualRun:
    """What `run_protocols` returns: results keyed by (protocol, gate), timings, and the working bundle."""

    results: dict[tuple[str, str], ProtocolResult]
    timing: list[StepTiming]
    suite: TestSuite
    bundle_dir: Path
    method: str
    shots: int | None
    decision: str
    random_weights: bool


def copy_bundle(source: Path, dest: Path) -> Path:
    """A working copy of a bundle: files hard-linked where possible (versions are immutable and
    every writer unlinks before writing), copied otherwise; locks and staging folders skipped."""
    Bundle.open(source)  # refuse a broken bundle before copying
    shutil.copytree(source, dest, copy_function=link_or_copy, symlinks=True,
                    ignore=shutil.ignore_patterns(".lock", ".staging-*"))
    return dest


def resolve_gates(bundle: Bundle, gates: Sequence[str] | None) -> list[str]:
    """The X-TAIL gates to score: the given ones, else the bundle's own."""
    if gates is None:
        return [bundle.manifest["method"].get("settings", {}).get("fusion", "ddas")]
    bad = [g for g in gates if g not in GATES]
    if bad:
        raise UsageError(f"Unknown gate(s) {', '.join(bad)}; expected {', '.join(GATES)}.")
    if bundle.method not in RAIL_METHODS and list(gates) != ["ddas"]:
        raise UsageError(f"'{bundle.method}' bundles route with the DDAS gate only.")
    return list(gates)


def run_protocols(
    source: Path,
    domain_dirs: Sequence[Path],
    workdir: Path,
    protocols: Sequence[str] = ("xtail",),
    gates: Sequence[str] | None = None,
    shots: int | None = None,
    test_per_class: int | Sequence[int | None] | None = None,
    decision: str = "reference",
    backend: str = "auto",
    iterations: int | None = None,
    progress: ProgressFn | None = None,
) -> ContinualRun:
    """Learn `domain_dirs` in order into a copy of the bundle at `source` (made in `workdir`,
    which must not exist yet), scoring every domain after each step. `source` is never written."""
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise UsageError(f"Unknown protocol(s) {', '.join(bad) or '(none)'}; expected {', '.join(PROTOCOLS)}.")
    source, workdir = Path(source), Path(workdir)
    start_bundle = Bundle.open(source)
    if start_bundle.tasks:
        raise UsageError(f"{source} has learned tasks already ({len(start_bundle.tasks)}); the protocols start "
                         "from a bundle with none (edgeclip init).")
    gates = resolve_gates(start_bundle, gates)
    domains = prepare_domains(domain_dirs, workdir, test_per_class, int(start_bundle.manifest["method"]
                                                                         ["settings"].get("seed", 0)))
    work = copy_bundle(source, workdir / "bundle")
    bundle = Bundle.open(work)
    keep_pixels = decision == "graph" or bundle.method not in RAIL_METHODS
    suite = build_suite(bundle, domains, backend, keep_pixels, progress)
    scorer = Scorer(suite, decision, backend)
    before = scorer.score(bundle, [], protocols, gates)
    rows: dict[tuple[str, str], list[list[float]]] = {key: [] for key in before.accuracy}
    routing: dict[str, list[dict[str, float | None]]] = {g: [] for g in before.routing}
    timing = []
    for step, domain in enumerate(domains):
        t0 = time.perf_counter()
        bundle = pipeline.add_task(work, domain.learn_dir, name=domain.name, shots=shots, iterations=iterations,
                                   backend=backend, progress=progress)
        t1 = time.perf_counter()
        scores = scorer.score(bundle, list(range(step + 1)), protocols, gates)
        timing.append(StepTiming(step + 1, domain.name, t1 - t0, time.perf_counter() - t1))
        for key, acc in scores.accuracy.items():
            rows[key].append(acc)
        for gate, stats in scores.routing.items():
            routing[gate].append(stats)
        if progress:
            progress("steps", step + 1, len(domains))
    results = {
        key: ProtocolResult(key[0], key[1], suite.names, before.accuracy[key], rows[key],
                            routing.get(key[1], []) if key[0] == "xtail" else [])
        for key in rows
    }
    return ContinualRun(results, timing, suite, work, bundle.method, shots, decision, bundle.random_weights)


def run_summary(run: ContinualRun, source: Path) -> dict[str, Any]:
    """The JSON-ready record of a run (results.json): one entry per (protocol, gate) in `results`,
    and at top level the first one's `domains`, `matrix`, `transfer`, `average`, `last`, `routing`."""
    entries = [r.to_dict() for r in run.results.values()]
    head = entries[0]
    return {
        "domains": head["domains"],
        "protocol": head["protocol"],
        "gate": head["gate"],
        "matrix": head["matrix"],
        "transfer": head["transfer"],
        "average": head["average"],
        "last": head["last"],
        "per_domain": head["per_domain"],
        "zero_shot": head["zero_shot"],
        "routing": head["routing"],
        "results": entries,
        "timing": {
            "embed_test_s": run.suite.seconds,
            "steps": [vars(t) for t in run.timing],
        },
        "test_images": [len(x) for x in run.suite.features],
        "classes": [len(d.classes) for d in run.suite.domains],
        "renamed_classes": {d.name: d.renamed for d in run.suite.domains if d.renamed},
        "unreadable": [{"path": p, "error": e} for p, e in run.suite.unreadable],
        "bundle": str(source),
        "method": run.method,
        "shots": run.shots,
        "decision": ("graphs/gated.onnx run on the test pixels" if run.decision == "graph" or
                     run.method not in RAIL_METHODS else
                     "train/decision.py on cached frozen embeddings (tested equal to graphs/gated.onnx)"),
        "random_weights": run.random_weights,
    }


# --------------------------------------------------------------------------- heatmap


# viridis at 0, 1/8, ..., 1 (matplotlib's values): readable in grey-scale and by colour-blind readers
_VIRIDIS = np.array([(68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140), (39, 173, 129),
                     (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)


def _colour(value: float) -> tuple[int, int, int]:
    """Viridis colour of an accuracy in percent (0 dark purple ... 100 yellow)."""
    t = max(0.0, min(100.0, value)) / 100.0 * (len(_VIRIDIS) - 1)
    lo = int(np.floor(t))
    hi = min(lo + 1, len(_VIRIDIS) - 1)
    rgb = _VIRIDIS[lo] + (_VIRIDIS[hi] - _VIRIDIS[lo]) * (t - lo)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def _fit(draw: Any, text: str, font: Any, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def write_heatmap(result: ProtocolResult, path: Path, title: str = "") -> Path:
    """A PNG of the accuracy matrix, Pillow only: a zero-shot row (before any step), one row per
    learning step, then Transfer / Average / Last per domain; a mean column; a value in every
    cell; viridis colours on a fixed 0-100 % scale with its colour bar; the cell of the step
    that learned each domain framed. Sized to read without zooming (about 100 px per cell)."""
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(result.matrix, dtype=np.float64)
    steps, n = matrix.shape
    metrics = result.metrics()
    per = metrics["per_domain"]
    rows: list[tuple[str, list[float | None], float | None]] = [("zero-shot (before step 1)", list(result.zero_shot),
                                                                 float(np.mean(result.zero_shot)))]
    rows += [(f"after {i + 1}: {result.domains[i]}", [float(v) for v in matrix[i]], float(matrix[i].mean()))
             for i in range(steps)]
    first_metric = len(rows)
    rows += [("Transfer", per["transfer"], metrics["transfer"]), ("Average", per["average"], metrics["average"]),
             ("Last", per["last"], metrics["last"])]

    font = ImageFont.load_default(size=17)
    small = ImageFont.load_default(size=14)
    bold = ImageFont.load_default(size=20)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    longest = max(measure.textlength(name, font=font) for name in result.domains)
    cell_w, cell_h, gap = int(min(max(104, longest + 16), 180)), 42, 14
    left = 250
    top = 110
    bar_x = left + cell_w * (n + 1) + 40
    width = max(bar_x + 110, 640)
    height = top + cell_h * len(rows) + gap + 96
    title = title or f"{result.protocol.upper()} ({result.gate}) accuracy %"
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    # the title, wrapped to the figure's width
    words, lines, line = title.split(), [], ""
    for word in words:
        if line and draw.textlength(f"{line} {word}", font=bold) > width - 30:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for k, text in enumerate(lines[:2]):
        draw.text((15, 10 + 26 * k), text, fill="black", font=bold)
    headers = list(result.domains) + ["mean"]
    for j, name in enumerate(headers):
        x = left + j * cell_w
        draw.text((x + cell_w / 2, top - 12), _fit(draw, name, font, cell_w - 6), fill="black", font=font, anchor="ms")
    for r, (label, values, mean) in enumerate(rows):
        y = top + r * cell_h + (gap if r >= first_metric else 0)
        draw.text((left - 10, y + cell_h / 2), _fit(draw, label, font, left - 20), fill="black", font=font, anchor="rm")
        for j, v in enumerate(list(values) + [mean]):
            box = [left + j * cell_w, y, left + (j + 1) * cell_w - 3, y + cell_h - 3]
            if v is None:  # Transfer of the first domain: nothing was learned before it
                draw.rectangle(box, fill=(235, 235, 235))
                draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "n/a", fill=(110, 110, 110), font=font, anchor="mm")
                continue
            draw.rectangle(box, fill=_colour(v))
            ink = "white" if v < 60 else "black"
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"{v:.1f}", fill=ink, font=font, anchor="mm")
            if 1 <= r <= steps and j == r - 1:  # the step that learned this column's domain
                draw.rectangle([box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1], outline=(220, 30, 30), width=3)
    # the colour scale
    bar_top, bar_h = top, cell_h * len(rows) + gap - 3
    for k in range(bar_h):
        draw.line([(bar_x, bar_top + k), (bar_x + 22, bar_top + k)], fill=_colour(100.0 * (1 - k / (bar_h - 1))))
    draw.rectangle([bar_x, bar_top, bar_x + 22, bar_top + bar_h], outline="black")
    for tick in (0, 25, 50, 75, 100):
        y = bar_top + (1 - tick / 100) * bar_h
        draw.line([(bar_x + 22, y), (bar_x + 28, y)], fill="black")
        draw.text((bar_x + 32, y), f"{tick}%", fill="black", font=small, anchor="lm")
    draw.text((bar_x, bar_top - 22), "accuracy", fill="black", font=small, anchor="ls")
    notes = ("Red frame: the step that learned the column's domain.",
             "Transfer: accuracy on a domain before it is learned (mean over earlier steps).",
             "Average: mean over all steps. Last: after the final step.")
    for k, note in enumerate(notes):
        draw.text((15, height - 76 + 22 * k), _fit(draw, note, small, width - 30), fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path

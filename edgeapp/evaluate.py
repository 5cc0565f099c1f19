"""The continual-learning protocols (METHODS.md section 4) run on a copy of a bundle.

Learn the domains in the given order with `pipeline.add_task`; after each step classify every
domain's test split. Each result is one accuracy matrix, labelled by its ``kind``:

- ``gated`` (the papers' protocols, the headline): the model is never told the task.
  - MTIL: each image is scored over its own domain's classes. A MoE bundle routes every image
    through the DDAS gate, as MoE-Adapters' official evaluation does: an image the gate sends to
    task t is classified by the adapters with t's router, against its own domain's class names
    encoded with t's router; one it sends to zero-shot by plain CLIP. Routing errors count.
  - X-TAIL: every image is scored over the union of all domains' class names (learned classes
    first, in task order, then the domains not yet learned) through the gated decision, whose
    route is also scored (seen images to their task, unseen ones to zero-shot).
- ``oracle`` (MTIL, "task known", an extra): a learned domain's images go to their own task; a
  domain not yet learned is scored by zero-shot CLIP. RAIL's MTIL matrix is this one.
- ``zero-shot``: plain zero-shot CLIP, the papers' zero-shot rows (every row equals step 0).

Memory does not grow with the test sets beyond one embedding per image: each test image is
embedded once by the frozen encoder (`TestSuite` keeps the embeddings and the image paths, never
the pixels); what needs pixels after a step (the MoE adapters, `decision="graph"`) streams the
images from disk again in batches; scores are computed in chunks of rows.

For RAIL bundles the decision is computed by `train/decision.py`, the numpy reference that the
tests prove equal to graphs/gated.onnx; `decision="graph"` instead runs graphs/gated.onnx itself
(the only way for MoE X-TAIL, whose adapters change the image features). MoE MTIL runs the adapted
model with torch (the train extra). RAIL scoring is numpy only, no torch.

`preset` ("moe-paper", "rail-paper", `train/presets.py`) applies a paper's per-run settings:
learning rate per dataset, iterations, warm-up, batch and freeze rule (MoE), templates, duplicate
class names kept in the prompts, the fusion rule and weight (RAIL), the gate's decision unit.
Settings fixed when the bundle was made (experts, hidden size, seed) are compared and any
difference is reported in results.json (``preset.bundle_differs``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeclip.bundle import GRAPH_STORE, Bundle, link_or_copy
from edgeclip.domain import Domain, class_key, eval_split, few_shot, read_domain
from edgeclip.edgeapp import tasks as pipeline
from edgeclip.edgeapp.eval_scoring import (
    GATES,
    KNOWN_TASK,
    PROTOCOLS,
    ZERO_SHOT,
    ProgressFn,
    Scorer,
    TestSuite,
    build_suite,
    closed_form,
)
from edgeclip.edgeapp.eval_summary import ProtocolResult
from edgeclip.errors import DomainError, UsageError
from edgeclip.manifest import Training
from edgeclip.train.presets import Preset, get_preset
from edgeclip.train.registry import get_learner


# --------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class EvalDomain:
    """A domain as the run learns and scores it: `learn_dir` is what add-task reads (the user's
    folder, or a view of it whose templates are the preset's). `shared` lists its class names that
    an earlier domain has too: each stays its own task's class (predictions carry their task; tables
    show ``airplane (cifar10)``), learned and prompted under its own name, as add-task does."""

    name: str
    source: Path
    learn_dir: Path
    test: Domain
    shared: tuple[str, ...] = ()
    split_note: str | None = None  # set when the test split is val/ or valid/ (no test/ folder)

    @property
    def classes(self) -> list[str]:
        return self.test.classes

    @property
    def prompts(self) -> list[str]:
        """The names put in the prompts: the class names as they are."""
        return self.test.classes


def _view(domain_dir: Path, dest: Path, meta: dict[str, Any], test: str = "test") -> Path:
    """A folder of symbolic links mirroring domain_dir's train/ and test/ class folders, with
    ``meta`` as its meta.json (the preset's templates)."""
    dest.mkdir(parents=True)
    (dest / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    for split in ("train", test):
        (dest / split).mkdir()
        for class_dir in sorted((domain_dir / split).iterdir()):
            if class_dir.is_dir():
                (dest / split / class_dir.name).symlink_to(class_dir.resolve())
    return dest


def prepare_domains(domain_dirs: Sequence[Path], workdir: Path,
                    test_per_class: int | Sequence[int | None] | None = None, seed: int = 0,
                    templates: Sequence[str] | None = None) -> list[EvalDomain]:
    """Read every domain's train and test splits; check they name the same classes.

    Real benchmarks share class names (Caltech101 and CIFAR-10 both have 'airplane'): each domain
    keeps its own, as add-task keeps them (a label belongs to its task), and `EvalDomain.shared`
    lists them. `templates` replaces every domain's prompt templates (through a view folder of
    symbolic links with its own meta.json). `test_per_class` (one count for all domains, or one per
    domain) subsamples the test split deterministically (few-shot's draw).
    """
    if not domain_dirs:
        raise UsageError("Give at least one domain folder.")
    per_class = (list(test_per_class) if isinstance(test_per_class, Sequence)
                 else [test_per_class] * len(domain_dirs))
    if len(per_class) != len(domain_dirs):
        raise UsageError(f"{len(per_class)} test sizes for {len(domain_dirs)} domains")
    seen: set[str] = set()
    names: set[str] = set()
    out = []
    for directory, limit in zip(map(Path, domain_dirs), per_class):
        train = read_domain(directory, split="train")
        split, note = eval_split(directory)  # test/, else val/ or valid/ (with a note)
        test = read_domain(directory, split=split)
        if train.classes != test.classes:
            raise DomainError(f"{directory}: train/ and test/ must hold the same class folders "
                              f"(train has {len(train.classes)}, test {len(test.classes)})")
        if class_key(train.name) in names:  # as add-task compares task names
            raise UsageError(f"Two domains are named '{train.name}' (names are compared ignoring case); each "
                             "domain can be learned once: give one of them another name in its meta.json.")
        names.add(class_key(train.name))
        shared = tuple(c for c in train.classes if class_key(c) in seen)
        learn_dir = directory
        if templates is not None:
            learn_dir = _view(directory, workdir / "views" / train.name,
                              {"name": train.name, "templates": list(templates)}, test=split)
            test = read_domain(learn_dir, split=split)
        seen.update(class_key(c) for c in test.classes)
        if limit:
            test = few_shot(test, limit, seed)
        out.append(EvalDomain(train.name, directory, learn_dir, test, shared, note))
    return out


# --------------------------------------------------------------------------- the protocol run


@dataclass
class StepTiming:
    step: int
    domain: str
    learn_s: float
    score_s: float


@dataclass
class ContinualRun:
    """What `run_protocols` returns: results keyed by (protocol, gate), headline first; timings,
    the working bundle, and the preset's record (None without one)."""

    results: dict[tuple[str, str], ProtocolResult]
    timing: list[StepTiming]
    suite: TestSuite
    bundle_dir: Path
    method: str
    shots: int | None
    decision: str
    random_weights: bool
    preset: dict[str, Any] | None = None
    route_batch: int | None = None


def copy_bundle(source: Path, dest: Path) -> Path:
    """A working copy of a bundle: version files hard-linked where possible (versions are immutable and
    every writer unlinks before writing), copied otherwise; graph-store files copied (a store file has a
    single link: ``Bundle.check_graph_locations``); locks and staging folders skipped."""
    Bundle.open(source).release()  # refuse a broken bundle before copying
    store = (source / GRAPH_STORE).resolve()

    def copy_file(src: str, dst: str) -> None:
        if Path(src).resolve().parent == store:
            shutil.copy2(src, dst)
        else:
            link_or_copy(src, dst)

    shutil.copytree(source, dest, copy_function=copy_file, symlinks=True,
                    ignore=shutil.ignore_patterns(".lock", ".staging-*"))
    return dest


def drop_old_versions(work: Path, keep: Sequence[str]) -> list[str]:
    """Delete the versions of the WORKING COPY `work` other than `keep` (the run needs only its
    first and current ones): RAIL primal at hidden 15000 writes 1.8 GB of statistics per version,
    which would otherwise pile up step after step. Files a kept version shares are hard links, so
    they survive. Never called on the user's bundle. Returns the deleted version names."""
    from edgeclip.bundle import list_versions

    dropped = [v for v in list_versions(work) if v not in keep]
    for version in dropped:
        shutil.rmtree(Path(work) / "versions" / version)
    return dropped


def resolve_gates(bundle: Bundle, gates: Sequence[str] | None) -> list[str]:
    """The X-TAIL gates to score: the given ones, else the bundle's own."""
    if gates is None:
        return [bundle.meta.method.settings.fusion]
    bad = [g for g in gates if g not in GATES]
    if bad:
        raise UsageError(f"Unknown gate(s) {', '.join(bad)}; expected {', '.join(GATES)}.")
    if not closed_form(bundle.method) and list(gates) != ["ddas"]:
        raise UsageError(f"'{bundle.method}' bundles route with the DDAS gate only.")
    return list(gates)


def preset_differences(preset: Preset, bundle: Bundle) -> dict[str, dict[str, Any]]:
    """Settings fixed at `edgeclip init` where the bundle differs from the preset:
    {setting: {"bundle": value, "preset": value}}. Empty for a bundle made with `--preset`."""
    settings = bundle.meta.method.settings
    want: dict[str, Any] = {"method": preset.method, "seed": preset.seed}
    have: dict[str, Any] = {"method": bundle.method, "seed": settings.seed}
    if not closed_form(preset.method):
        moe = getattr(settings, "moe", {})
        want.update({"n_experts": preset.experts, "top_k": preset.top_k, "encoders": ["image", "text"]})
        have.update({"n_experts": moe.get("n_experts"), "top_k": moe.get("top_k"), "encoders": moe.get("encoders")})
    else:
        want.update({"hidden": preset.hidden, "gamma": preset.gamma})
        have.update({"hidden": getattr(settings, "hidden", None), "gamma": getattr(settings, "gamma", None)})
    return {k: {"bundle": have[k], "preset": v} for k, v in want.items() if have[k] != v}


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
    preset: str | None = None,
    route_batch: int | None = None,
    device: str = "auto",
) -> ContinualRun:
    """Learn `domain_dirs` in order into a copy of the bundle at `source` (made in `workdir`,
    which must not exist yet), scoring every domain after each step. `source` is never written.

    `preset` applies a paper's per-run settings (module docstring); explicit `shots`,
    `iterations`, `gates` and `route_batch` win over it. Raises UsageError / DomainError on bad input."""
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise UsageError(f"Unknown protocol(s) {', '.join(bad) or '(none)'}; expected {', '.join(PROTOCOLS)}.")
    source, workdir = Path(source), Path(workdir)
    start_bundle = Bundle.open(source)
    if start_bundle.tasks:
        raise UsageError(f"{source} has learned tasks already ({len(start_bundle.tasks)}); the protocols start "
                         "from a bundle with none (edgeclip init).")
    chosen = get_preset(preset)
    record: dict[str, Any] | None = None
    beta = None
    if chosen is not None:
        if closed_form(chosen.method) != closed_form(start_bundle.method):
            raise UsageError(f"preset '{chosen.name}' is for {chosen.method} bundles; {source} is "
                             f"{start_bundle.method}.")
        shots = chosen.shots if shots is None else shots
        route_batch = chosen.route_batch if route_batch is None else route_batch
        if closed_form(start_bundle.method):
            gates = [chosen.fusion] if gates is None else gates
            beta = chosen.beta
        record = {"name": chosen.name, "source": chosen.source, "settings": chosen.to_dict(),
                  "bundle_differs": preset_differences(chosen, start_bundle), "tasks": {}}
    gates = resolve_gates(start_bundle, gates)
    domains = prepare_domains(domain_dirs, workdir, test_per_class,
                              start_bundle.meta.method.settings.seed,
                              templates=chosen.templates if chosen else None)
    work = copy_bundle(source, workdir / "bundle")
    bundle = Bundle.open(work)
    first_version = bundle.version
    suite = build_suite(bundle, domains, backend, progress)
    scorer = Scorer(suite, decision, backend, beta=beta, route_batch=route_batch, device=device)
    before = scorer.score(bundle, [], protocols, gates)
    rows: dict[tuple[str, str], list[list[float]]] = {key: [] for key in before.accuracy}
    routing: dict[tuple[str, str], list[dict[str, float | None]]] = {key: [] for key in before.accuracy}
    timing = []
    for step, domain in enumerate(domains):
        options: dict[str, Any] = {"shots": shots}
        if chosen is not None and get_learner(bundle.method).learns_from_images:
            options.update(chosen.moe_recipe(domain.name, shots))
        t0 = time.perf_counter()
        bundle = pipeline.add_task(work, domain.learn_dir, name=domain.name, shots=shots, iterations=iterations,
                                   backend=backend, progress=progress, moe_options=options)
        t1 = time.perf_counter()
        if record is not None and not closed_form(bundle.method):  # what the task was trained with, as recorded
            trained = bundle.tasks[-1].training or Training()
            record["tasks"][domain.name] = {"lr": trained.lr, "iterations": trained.iterations, "warmup": trained.warmup}
        scores = scorer.score(bundle, list(range(step + 1)), protocols, gates)
        timing.append(StepTiming(step + 1, domain.name, t1 - t0, time.perf_counter() - t1))
        drop_old_versions(work, keep=(first_version, bundle.version))
        for key, acc in scores.accuracy.items():
            rows[key].append(acc)
            if key in scores.routing:
                routing[key].append(scores.routing[key])
        if progress:
            progress("steps", step + 1, len(domains))
    results: dict[tuple[str, str], ProtocolResult] = {}
    for protocol in protocols:
        keys = [k for k in rows if k[0] == protocol]
        keys.sort(key=lambda k: k[1] == KNOWN_TASK)  # the gated matrix first, the oracle after
        for key in keys:
            results[key] = ProtocolResult(key[0], key[1], suite.names, before.accuracy[key], rows[key],
                                          routing[key], "oracle" if key[1] == KNOWN_TASK else "gated")
        zs = before.accuracy[keys[0]]  # nothing learned: every protocol's step 0 is plain zero-shot
        results[(protocol, ZERO_SHOT)] = ProtocolResult(protocol, ZERO_SHOT, suite.names, list(zs),
                                                        [list(zs) for _ in domains], [], "zero-shot")
    return ContinualRun(results, timing, suite, work, bundle.method, shots, decision, bundle.random_weights,
                        record, route_batch)

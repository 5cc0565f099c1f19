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

import copy
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeclip.bundle import GRAPH_STORE, Bundle, link_or_copy
from edgeclip.domain import Domain, eval_split, few_shot, read_domain
from edgeclip.edgeapp import tasks as pipeline
from edgeclip.errors import DomainError, UsageError
from edgeclip.extras import import_torch_module
from edgeclip.learned import read_learned
from edgeclip.train import fusion
from edgeclip.train.presets import Preset, get_preset, method_family
from edgeclip.train.registry import LEARNERS, learner_spec

PROTOCOLS = ("mtil", "xtail")
GATES = ("ddas", "paper")  # X-TAIL gates of RAIL; MoE routes by the DDAS gate
DECISIONS = ("reference", "graph")
KNOWN_TASK = "known-task"  # the gate name of the oracle MTIL matrix (task identity given)
ZERO_SHOT = "zero-shot"  # the gate name of the plain zero-shot rows
# the learners that learn in closed form from frozen embeddings (RAIL): scored from cached embeddings
RAIL_METHODS = tuple(name for name, spec in LEARNERS.items() if spec.learns_from == "embeddings")
KINDS = {
    "gated": "the model is not told the task: routed by the gate, routing errors count (the papers' protocol)",
    "oracle": "task identity given: each learned domain's images use their own task (an extra, not the paper's)",
    "zero-shot": "plain zero-shot CLIP, nothing learned (the papers' zero-shot row)",
}
SCORE_CHUNK = 1024  # rows scored at once (RAIL primal: chunk x hidden floats)
PIXEL_BATCH = 32  # images decoded at once when a step needs pixels

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
    folder, or a view of it whose clashing class folders are renamed or whose templates are the
    preset's). `prompt_classes[i]` is the name put in the prompts for `classes[i]` (the original
    name when a preset keeps duplicate names, else the class name itself)."""

    name: str
    source: Path
    learn_dir: Path
    test: Domain
    renamed: dict[str, str] = field(default_factory=dict)
    prompt_classes: tuple[str, ...] = ()
    split_note: str | None = None  # set when the test split is val/ or valid/ (no test/ folder)

    @property
    def classes(self) -> list[str]:
        return self.test.classes

    @property
    def prompts(self) -> list[str]:
        return list(self.prompt_classes) or self.test.classes


def _view(domain_dir: Path, dest: Path, renames: Mapping[str, str], meta: dict[str, Any] | None = None,
          test: str = "test") -> Path:
    """A folder of symbolic links mirroring domain_dir's train/ and test/ with some class folders
    renamed; its meta.json is `meta` when given, else a link to the original."""
    dest.mkdir(parents=True)
    if meta is not None:
        (dest / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    elif (domain_dir / "meta.json").is_file():
        (dest / "meta.json").symlink_to((domain_dir / "meta.json").resolve())
    for split in ("train", test):
        (dest / split).mkdir()
        for class_dir in sorted((domain_dir / split).iterdir()):
            if class_dir.is_dir():
                (dest / split / renames.get(class_dir.name, class_dir.name)).symlink_to(class_dir.resolve())
    return dest


def prepare_domains(domain_dirs: Sequence[Path], workdir: Path,
                    test_per_class: int | Sequence[int | None] | None = None, seed: int = 0,
                    templates: Sequence[str] | None = None, keep_duplicate_names: bool = False) -> list[EvalDomain]:
    """Read every domain's train and test splits; check they name the same classes.

    A bundle refuses a class name that an earlier task already learned (a prediction must name
    its task), but real benchmarks share names (Caltech101 and CIFAR-10 both have 'airplane').
    Such a class of a later domain is learned as '<class> (<domain>)', through a view folder of
    symbolic links; the renames are reported. With `keep_duplicate_names` (RAIL's protocol) the
    prompts still say '<class>' (`EvalDomain.prompt_classes`). `templates` replaces every domain's
    prompt templates (through the view's meta.json). `test_per_class` (one count for all domains,
    or one per domain) subsamples the test split deterministically (few-shot's draw).
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
        split, note = eval_split(directory)  # test/, else val/ or valid/ (with a note)
        test = read_domain(directory, split=split)
        if train.classes != test.classes:
            raise DomainError(f"{directory}: train/ and test/ must hold the same class folders "
                              f"(train has {len(train.classes)}, test {len(test.classes)})")
        if train.name in names:
            raise UsageError(f"Two domains are named '{train.name}'; each domain can be learned once.")
        names.add(train.name)
        renames = {c: f"{c} ({train.name})" for c in train.classes if c.lower() in seen}
        learn_dir = directory
        meta = None if templates is None else {"name": train.name, "templates": list(templates)}
        if renames or meta is not None:
            learn_dir = _view(directory, workdir / "views" / train.name, renames, meta, test=split)
            test = read_domain(learn_dir, split=split)
        seen.update({c.lower(): train.name for c in test.classes})
        original = {new: old for old, new in renames.items()}
        prompts = tuple(original.get(c, c) for c in test.classes) if keep_duplicate_names else ()
        if limit:
            test = few_shot(test, limit, seed)
        out.append(EvalDomain(train.name, directory, learn_dir, test, renames, prompts, note))
    return out


# --------------------------------------------------------------------------- frozen test features


@dataclass
class TestSuite:
    """Every domain's test images, embedded once by the frozen encoder, with the text embeddings
    of each domain's class names (frozen too). Holds embeddings and paths, never pixels: what
    needs the pixels again streams them (`pixel_batches`)."""

    domains: list[EvalDomain]
    features: list[np.ndarray]  # per domain [N_j, D] float32
    labels: list[np.ndarray]  # per domain [N_j] int64, index into the domain's classes
    texts: list[np.ndarray]  # per domain [C_j, D] float32
    unreadable: list[tuple[str, str]]
    seconds: float
    paths: list[list[Path]] = field(default_factory=list)  # per domain, the N_j readable images in order
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def pixel_batches(self, j: int, batch_size: int = PIXEL_BATCH) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, pixels [B,3,S,S] float32) of domain j's test images, decoded again, in order."""
        from edgeclip.images import PreprocessConfig, iter_batches

        cfg = PreprocessConfig.from_dict(self.preprocess)
        at = 0
        for batch in iter_batches(self.paths[j], cfg, batch_size=batch_size):
            if batch.errors:
                raise DomainError(f"{batch.errors[0][0]} could be read before and not now: {batch.errors[0][1]}")
            if len(batch.paths):
                yield at, batch.pixels
                at += len(batch.paths)


def build_suite(bundle: Bundle, domains: list[EvalDomain], backend: str = "auto",
                progress: ProgressFn | None = None, batch_size: int = PIXEL_BATCH) -> TestSuite:
    """Embed every domain's test images once (frozen encoder, torch-free), streaming them in
    batches; keep the embeddings, labels and readable paths, and each domain's text embeddings."""
    from edgeclip.edgeapp.runtime import ImageEncoderRunner, TextEncoderRunner
    from edgeclip.images import PreprocessConfig, iter_batches

    start = time.perf_counter()
    cfg = PreprocessConfig.from_dict(bundle.manifest["preprocess"])
    runner = ImageEncoderRunner(bundle, backend, optimized_cache=False)  # a batch job: start-up does not matter
    text_runner = TextEncoderRunner(bundle, backend)
    feats, labels, texts, paths, unreadable = [], [], [], [], []
    for d in domains:
        label_of = {path: label for path, label in d.test.samples}
        x, y, kept, done = [], [], [], 0
        for batch in iter_batches([p for p, _ in d.test.samples], cfg, batch_size=batch_size):
            unreadable += [(str(p), msg) for p, msg in batch.errors]
            if batch.paths:
                x.append(runner.embed(batch.pixels).astype(np.float32))
                y += [label_of[p] for p in batch.paths]
                kept += list(batch.paths)
            done += len(batch.paths) + len(batch.errors)
            if progress:
                progress("embedding test images", done, len(d.test.samples))
        if not x:
            raise DomainError(f"No test image of {d.source} could be read.")
        feats.append(np.concatenate(x))
        labels.append(np.asarray(y, np.int64))
        paths.append(kept)
        texts.append(np.asarray(text_runner.class_embeddings(d.prompts, d.test.templates), np.float32))
    return TestSuite(domains, feats, labels, texts, unreadable, time.perf_counter() - start, paths,
                     dict(bundle.manifest["preprocess"]))


# --------------------------------------------------------------------------- one step's scores


@dataclass
class StepScores:
    """Accuracy (percent) per domain for each (protocol, gate), and routing per (protocol, gate)."""

    accuracy: dict[tuple[str, str], list[float]]
    routing: dict[tuple[str, str], dict[str, float | None]]


def _label_layout(n_domains: int, learned: Sequence[int], sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """(column offset of each domain in the X-TAIL label space, the domains in column order):
    learned domains first (task order), then the others."""
    order = list(learned) + [j for j in range(n_domains) if j not in learned]
    offsets, at = [0] * n_domains, 0
    for j in order:
        offsets[j], at = at, at + sizes[j]
    return offsets, order


def _routing_stats(route: np.ndarray, expected: np.ndarray) -> dict[str, float | None]:
    seen, ok = expected >= 0, route == expected

    def pct(mask: np.ndarray) -> float | None:
        return float(100.0 * ok[mask].mean()) if mask.any() else None

    return {"overall": pct(np.ones_like(seen)), "seen_to_task": pct(seen), "unseen_to_zero_shot": pct(~seen)}


def _with_settings(manifest: Mapping[str, Any], gate: str | None = None, beta: float | None = None) -> dict[str, Any]:
    out = copy.deepcopy(dict(manifest))
    if gate is not None:
        out["method"]["settings"]["fusion"] = gate
    if beta is not None:
        out["method"]["settings"]["beta"] = float(beta)
    return out


def _chunks(n: int, size: int = SCORE_CHUNK) -> Iterator[slice]:
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))


def batch_routes(errors: np.ndarray, thresholds: np.ndarray, rule: str, route_batch: int | None) -> np.ndarray:
    """The gate's route per image [N] from errors [N,T]: per image (route_batch None, edgeclip), or
    once per run of `route_batch` consecutive images on their mean errors (MoE-Adapters' official
    evaluation decides per test batch of 128)."""
    from edgeclip.train import ddas

    if not route_batch or len(errors) == 0:
        return ddas.route(errors, thresholds, rule)[0]
    out = np.empty(len(errors), np.int64)
    for part in _chunks(len(errors), route_batch):
        out[part] = ddas.route(errors[part].mean(axis=0, keepdims=True), thresholds, rule)[0][0]
    return out


class Scorer:
    """Scores the cached test set against one bundle version in which `learned` (domain indices,
    in task order) are the bundle's tasks. `beta` replaces the bundle's fusion weight (RAIL, the
    reference decision); `route_batch` makes MoE MTIL decide once per batch of that many images."""

    def __init__(self, suite: TestSuite, decision: str = "reference", backend: str = "auto",
                 beta: float | None = None, route_batch: int | None = None, device: str = "auto") -> None:
        if decision not in DECISIONS:
            raise UsageError(f"Unknown decision '{decision}'; expected one of {', '.join(DECISIONS)}.")
        if route_batch is not None and route_batch < 1:
            raise UsageError(f"route_batch must be at least 1, got {route_batch}")
        self.suite, self.decision, self.backend = suite, decision, backend
        self.beta, self.route_batch, self.device = beta, route_batch, device
        self.sizes = [len(d.classes) for d in suite.domains]

    def score(self, bundle: Bundle, learned: Sequence[int], protocols: Sequence[str], gates: Sequence[str],
              tensors: Mapping[str, np.ndarray] | None = None) -> StepScores:
        """`tensors` replaces the version's learned.safetensors (e.g. a head trained another way)."""
        if [t["name"] for t in bundle.tasks] != [self.suite.domains[j].name for j in learned]:
            raise UsageError("the bundle's tasks do not match the domains the run has learned")
        tensors = read_learned(bundle) if tensors is None else tensors
        accuracy: dict[tuple[str, str], list[float]] = {}
        routing: dict[tuple[str, str], dict[str, float | None]] = {}
        if "mtil" in protocols:
            if bundle.method in RAIL_METHODS:
                accuracy[("mtil", KNOWN_TASK)] = self._mtil_rail(bundle, tensors, learned)
            else:
                gated, oracle, stats = self._mtil_moe(bundle, tensors, learned)
                accuracy[("mtil", "ddas")], accuracy[("mtil", KNOWN_TASK)] = gated, oracle
                routing[("mtil", "ddas")] = stats
        if "xtail" in protocols:
            for gate in gates:
                acc, routing[("xtail", gate)] = self._xtail(bundle, tensors, learned, gate)
                accuracy[("xtail", gate)] = acc
        return StepScores(accuracy, routing)

    # -- MTIL, RAIL: task identity known (the oracle matrix)
    def _mtil_rail(self, bundle: Bundle, tensors: Mapping[str, np.ndarray], learned: Sequence[int]) -> list[float]:
        from edgeclip.train.decision import DecisionSpec, rail_head

        spec = DecisionSpec.from_bundle(tensors, _with_settings(bundle.manifest, beta=self.beta))
        head = rail_head(tensors, spec) if bundle.tasks else None
        out = []
        for j, (x, y, text) in enumerate(zip(self.suite.features, self.suite.labels, self.suite.texts)):
            correct = 0
            for part in _chunks(len(x)):
                p_zs = fusion.zero_shot_probs(x[part], text, spec.logit_scale)
                if j in learned:
                    t = list(learned).index(j)
                    lo, hi = int(spec.offsets[t]), int(spec.offsets[t] + spec.sizes[t])
                    s_a = head.scores(x[part])[:, lo:hi]
                    p_zs = fusion.fuse_gated(p_zs, s_a, np.zeros(len(s_a), np.int64), np.array([0]),
                                             np.array([hi - lo]), spec.beta)
                correct += int((p_zs.argmax(axis=1) == y[part]).sum())
            out.append(100.0 * correct / len(x))
        return out

    # -- MTIL, MoE: through the DDAS gate (headline) and with the task given (oracle)
    def _mtil_moe(self, bundle: Bundle, tensors: Mapping[str, np.ndarray],
                  learned: Sequence[int]) -> tuple[list[float], list[float], dict[str, float | None]]:
        """Each domain's images, scored over its own classes. Gated: the DDAS gate routes each image
        (or each batch, `route_batch`) on its frozen embedding; routed to task t, the image goes
        through the adapters with t's router and is compared with its domain's class names encoded
        with t's router (the stored classifier when t is its own task); routed to -1, plain CLIP.
        Oracle: a learned domain's images through their own task. Needs torch (the train extra)."""
        # predictions are argmaxes of cosine similarities: the logit scale changes none of them
        zs_pred = [np.concatenate([(x[p] @ text.T).argmax(axis=1) for p in _chunks(len(x))])
                   for x, text in zip(self.suite.features, self.suite.texts)]
        zs_acc = [float(100.0 * (p == y).mean()) for p, y in zip(zs_pred, self.suite.labels)]
        if not bundle.tasks:
            return zs_acc, list(zs_acc), {}
        torch = import_torch_module("torch", "MoE evaluation")
        load_moe_model = import_torch_module("edgeclip.edgeapp.moe_task", "MoE evaluation").load_moe_model
        text_classifier = import_torch_module("edgeclip.train.moe", "MoE evaluation").text_classifier
        from edgeclip.train import ddas
        from edgeclip.train.decision import DecisionSpec, gate_states

        spec = DecisionSpec.from_bundle(tensors, bundle.manifest)
        gates = [ddas.autoencoder_from_state(s, {"kind": spec.gate_kind}) for s in gate_states(tensors, spec.gate_kind)]
        backbone, model = load_moe_model(bundle)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        model.to(device).eval()
        task_text = np.asarray(tensors["task_text"], np.float32)
        texts: dict[tuple[int, int], np.ndarray] = {}

        def text_for(t: int, j: int, own: int) -> np.ndarray:
            if t == own:
                return task_text[int(spec.offsets[t]):int(spec.offsets[t] + spec.sizes[t])]
            if (t, j) not in texts:
                d = self.suite.domains[j]
                texts[(t, j)] = np.asarray(text_classifier(model, t, d.prompts, d.test.templates, backbone.tokenize),
                                           np.float32)
            return texts[(t, j)]

        gated_acc, oracle_acc, routes, expected = [], [], [], []
        for j, (x, y) in enumerate(zip(self.suite.features, self.suite.labels)):
            own = list(learned).index(j) if j in learned else -1
            errors = np.stack([g.errors(x) for g in gates], axis=1)
            route = batch_routes(errors, spec.thresholds, spec.route_rule, self.route_batch)
            gated, oracle = zs_pred[j].copy(), zs_pred[j].copy()
            if own >= 0 or (route >= 0).any():
                with torch.inference_mode():
                    for at, pixels in self.suite.pixel_batches(j):
                        rows = slice(at, at + len(pixels))
                        r = route[rows]
                        px = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
                        if own >= 0:
                            emb = model.encode_image(px, own, normalize=True).float().cpu().numpy()
                            oracle[rows] = (emb @ text_for(own, j, own).T).argmax(axis=1)
                        for t in np.unique(r[r >= 0]):
                            pick = np.flatnonzero(r == t)
                            if t == own:
                                gated[at + pick] = oracle[at + pick]
                                continue
                            emb = model.encode_image(px[torch.from_numpy(pick).to(device)], int(t),
                                                     normalize=True).float().cpu().numpy()
                            gated[at + pick] = (emb @ text_for(int(t), j, own).T).argmax(axis=1)
            gated_acc.append(float(100.0 * (gated == y).mean()))
            oracle_acc.append(float(100.0 * (oracle == y).mean()))
            routes.append(route)
            expected.append(np.full(len(route), own, np.int64))
        model.cpu()
        return gated_acc, oracle_acc, _routing_stats(np.concatenate(routes), np.concatenate(expected))

    # -- X-TAIL: task-agnostic, union label space, gated decision
    def _xtail(self, bundle: Bundle, tensors: Mapping[str, np.ndarray], learned: Sequence[int],
               gate: str) -> tuple[list[float], dict[str, float | None]]:
        n = len(self.sizes)
        offsets, order = _label_layout(n, learned, self.sizes)
        # The frozen text embeddings of every label, in column order (for learned domains the same
        # vectors as the bundle's zs_text unless a preset keeps duplicate names in the prompts).
        label_text = np.concatenate([self.suite.texts[j] for j in order]).astype(np.float32)
        acc, routes, expected = [], [], []
        for j, (correct, route) in enumerate(self._decide(bundle, tensors, label_text, gate, offsets)):
            acc.append(float(100.0 * correct / len(route)))
            routes.append(route)
            expected.append(np.full(len(route), list(learned).index(j) if j in learned else -1, np.int64))
        return acc, _routing_stats(np.concatenate(routes), np.concatenate(expected))

    def _decide(self, bundle: Bundle, tensors: Mapping[str, np.ndarray], label_text: np.ndarray,
                gate: str, offsets: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(correct count, route [N_j]) per domain."""
        if self.decision == "graph" or bundle.method not in RAIL_METHODS:
            yield from self._decide_graph(bundle, label_text, gate, offsets)
            return
        from edgeclip.train.decision import gated_reference

        manifest = _with_settings(bundle.manifest, gate, self.beta)
        for j, (x, y) in enumerate(zip(self.suite.features, self.suite.labels)):
            correct, route = 0, np.empty(len(x), np.int64)
            for part in _chunks(len(x)):
                out = gated_reference(x[part], label_text, tensors, manifest)
                correct += int((out["scores"].argmax(axis=1) == offsets[j] + y[part]).sum())
                route[part] = out["route"]
            yield correct, route

    def _decide_graph(self, bundle: Bundle, label_text: np.ndarray, gate: str,
                      offsets: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        from edgeclip.edgeapp.runtime import GatedRunner

        settings = bundle.manifest["method"].get("settings", {})
        own = settings.get("fusion", "ddas")
        if bundle.method in RAIL_METHODS and gate != own:
            raise UsageError(f"graphs/gated.onnx of this bundle applies the '{own}' gate, not '{gate}'.")
        if self.beta is not None and bundle.method in RAIL_METHODS and float(settings.get("beta", -1)) != self.beta:
            raise UsageError(f"graphs/gated.onnx of this bundle fuses with beta {settings.get('beta')}, not {self.beta}.")
        # each step's gated graph is used once: no optimised-graph cache entry (and no second session to check it)
        runner = GatedRunner(bundle, self.backend, max_labels=max(4096, len(label_text)), optimized_cache=False)
        for j, y in enumerate(self.suite.labels):
            correct, route = 0, np.empty(len(y), np.int64)
            for at, pixels in self.suite.pixel_batches(j):
                out = runner.run(pixels, label_text)
                rows = slice(at, at + len(pixels))
                correct += int((out["scores"].argmax(axis=1) == offsets[j] + y[rows]).sum())
                route[rows] = out["route"]
            yield correct, route


# --------------------------------------------------------------------------- the protocol run


@dataclass
class ProtocolResult:
    """One protocol under one gate: the accuracy matrix and what it implies. `kind` (KINDS):
    'gated' (the papers' protocol), 'oracle' (task given) or 'zero-shot'."""

    protocol: str
    gate: str
    domains: list[str]
    zero_shot: list[float]  # accuracy per domain before any step (percent)
    matrix: list[list[float]]  # [steps, domains], percent
    routing: list[dict[str, float | None]] = field(default_factory=list)  # per step (routed matrices)
    kind: str = "gated"

    def metrics(self) -> dict[str, Any]:
        return protocol_metrics(np.asarray(self.matrix))

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics()
        return {"protocol": self.protocol, "gate": self.gate, "kind": self.kind, "meaning": KINDS[self.kind],
                "domains": self.domains, "matrix": self.matrix,
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
        return [bundle.manifest["method"].get("settings", {}).get("fusion", "ddas")]
    bad = [g for g in gates if g not in GATES]
    if bad:
        raise UsageError(f"Unknown gate(s) {', '.join(bad)}; expected {', '.join(GATES)}.")
    if bundle.method not in RAIL_METHODS and list(gates) != ["ddas"]:
        raise UsageError(f"'{bundle.method}' bundles route with the DDAS gate only.")
    return list(gates)


def preset_differences(preset: Preset, bundle: Bundle) -> dict[str, dict[str, Any]]:
    """Settings fixed at `edgeclip init` where the bundle differs from the preset:
    {setting: {"bundle": value, "preset": value}}. Empty for a bundle made with `--preset`."""
    settings = bundle.manifest["method"].get("settings", {})
    want: dict[str, Any] = {"method": preset.method, "seed": preset.seed}
    have: dict[str, Any] = {"method": bundle.method, "seed": settings.get("seed")}
    if preset.method == "moe":
        moe = settings.get("moe", {})
        want.update({"n_experts": preset.experts, "top_k": preset.top_k, "encoders": ["image", "text"]})
        have.update({"n_experts": moe.get("n_experts"), "top_k": moe.get("top_k"), "encoders": moe.get("encoders")})
    else:
        want.update({"hidden": preset.hidden, "gamma": preset.gamma})
        have.update({"hidden": settings.get("hidden"), "gamma": settings.get("gamma")})
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
        if method_family(chosen.method) != method_family(start_bundle.method):
            raise UsageError(f"preset '{chosen.name}' is for {chosen.method} bundles; {source} is "
                             f"{start_bundle.method}.")
        shots = chosen.shots if shots is None else shots
        route_batch = chosen.route_batch if route_batch is None else route_batch
        if start_bundle.method in RAIL_METHODS:
            gates = [chosen.fusion] if gates is None else gates
            beta = chosen.beta
        record = {"name": chosen.name, "source": chosen.source, "settings": chosen.to_dict(),
                  "bundle_differs": preset_differences(chosen, start_bundle), "tasks": {}}
    gates = resolve_gates(start_bundle, gates)
    domains = prepare_domains(domain_dirs, workdir, test_per_class,
                              int(start_bundle.manifest["method"]["settings"].get("seed", 0)),
                              templates=chosen.templates if chosen else None,
                              keep_duplicate_names=bool(chosen and chosen.keep_duplicate_names))
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
        if chosen is not None and learner_spec(bundle.method).learns_from == "images":
            options.update(chosen.moe_recipe(domain.name, shots))
        t0 = time.perf_counter()
        bundle = pipeline.add_task(work, domain.learn_dir, name=domain.name, shots=shots, iterations=iterations,
                                   backend=backend, progress=progress, moe_options=options)
        t1 = time.perf_counter()
        if record is not None and bundle.method == "moe":  # what the task was trained with, as recorded
            trained = bundle.tasks[-1].get("training", {})
            record["tasks"][domain.name] = {k: trained.get(k) for k in ("lr", "iterations", "warmup")}
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


def run_summary(run: ContinualRun, source: Path) -> dict[str, Any]:
    """The JSON-ready record of a run (results.json): one entry per (protocol, gate) in `results`,
    each with its `kind` ('gated', 'oracle', 'zero-shot') and meaning, and at top level the
    headline's (the first, gated) `domains`, `matrix`, `transfer`, `average`, `last`, `routing`."""
    entries = [r.to_dict() for r in run.results.values()]
    head = entries[0]
    graph = run.decision == "graph" or run.method not in RAIL_METHODS
    return {
        "domains": head["domains"],
        "protocol": head["protocol"],
        "gate": head["gate"],
        "kind": head["kind"],
        "matrix": head["matrix"],
        "transfer": head["transfer"],
        "average": head["average"],
        "last": head["last"],
        "per_domain": head["per_domain"],
        "zero_shot": head["zero_shot"],
        "routing": head["routing"],
        "results": entries,
        "matrices": [{"protocol": e["protocol"], "gate": e["gate"], "kind": e["kind"], "meaning": e["meaning"]}
                     for e in entries],
        "timing": {
            "embed_test_s": run.suite.seconds,
            "steps": [vars(t) for t in run.timing],
        },
        "test_images": [len(x) for x in run.suite.features],
        "classes": [len(d.classes) for d in run.suite.domains],
        "renamed_classes": {d.name: d.renamed for d in run.suite.domains if d.renamed},
        "prompts_keep_duplicate_names": any(d.prompt_classes for d in run.suite.domains),
        "unreadable": [{"path": p, "error": e} for p, e in run.suite.unreadable],
        "bundle": str(source),
        "method": run.method,
        "shots": run.shots,
        "preset": run.preset,
        "gate_decides_per": f"batch of {run.route_batch} test images" if run.route_batch else "image",
        "decision": ("X-TAIL: graphs/gated.onnx run on the test pixels (streamed)" if graph else
                     "train/decision.py on cached frozen embeddings (tested equal to graphs/gated.onnx)")
                    + ("; MTIL: the adapted model (torch), routed by the DDAS gate on the frozen embeddings"
                       if run.method not in RAIL_METHODS else ""),
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

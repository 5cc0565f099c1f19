"""The gated decision (METHODS.md sections 2 and 3), from image embeddings to scores: its settings
(``DecisionSpec``), the packing of the learned tensors it reads, and its numpy reference.

The decision for an embedding x [B,D] and the label space's text embeddings [L,D]:

    p_zs  = softmax(logit_scale * norm(x) norm(label_text)^T)                     [B,L]
    err   = per-task DDAS autoencoder errors (``ddas``)                            [B,T]
    route = ``ddas.route(err, thresholds)``: a task index or -1 (zero-shot)        [B]
    s_A   = the learner's head scores (``rail``: RAIL primal/dual; MoE: adapted)   [B,C]
    fusion "ddas":  routed -> (1-beta) p_zs + beta s_A on the route's columns, -1 -> p_zs
    fusion "paper": RAIL's rule, route by the zero-shot top-1 class (``fusion.fuse_paper``)

``edgeclip.export.compose`` writes the same decision as ONNX and is tested against
``gated_reference``: each formula exists once in numpy and once as the exported graph.
numpy only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeclip.errors import BundleError, UsageError
from edgeclip.layout import (
    GATE_K,
    GATE_KEYS,
    TASK_OFFSET,
    TASK_SIZE,
    TASK_TEXT,
    ZS_TEXT,
    gate_key,
)
from edgeclip.manifest import LearnerSettings, Manifest
from edgeclip.train import ddas, fusion
from edgeclip.train.ddas import ROUTE_RULE, ROUTE_RULES
from edgeclip.train.registry import METHOD_NAMES, Learner, get_learner

FUSIONS = ("ddas", "paper")



# -- learned tensors layout -------------------------------------------------------------------
def learned_tensors(
    zs_text: np.ndarray,
    task_sizes: Sequence[int],
    gate_kind: str,
    gate_states: Sequence[Mapping[str, np.ndarray]],
    method: str,
    head_state: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Pack what the gated graph needs into learned.safetensors' tensors.

    zs_text: [C,D] float32; task_sizes: [T] class counts; gate_states: each task's autoencoder
    `.state()` (edgeclip.train.ddas); head_state: at least the learner's head keys
    (``registry.get_learner(method).head_keys``; other keys, the learning state, are left out): the RAIL
    learner's `.state()`, or for MoE {"task_text": [C,D]} (the tasks' adapted text classifiers in global
    class order, rows L2-normalised as `moe.text_classifier` gives). Names of the keys: ``edgeclip.layout``.
    Returns name -> array (float32; ``task.size``, ``task.offset``, ``gate.k`` int64). Raises UsageError on
    an unknown gate kind or method, a gate count other than the task count, or a shape mismatch; KeyError
    when head_state lacks a head key.
    """
    if gate_kind not in GATE_KEYS:
        raise UsageError(f"unknown gate kind {gate_kind!r}; known: {sorted(GATE_KEYS)}")
    learner = get_learner(method)
    if len(gate_states) != len(task_sizes):
        raise UsageError(f"{len(gate_states)} gates for {len(task_sizes)} tasks")
    sizes = np.asarray(task_sizes, dtype=np.int64)
    out = {ZS_TEXT: np.asarray(zs_text, np.float32), TASK_SIZE: sizes,
           TASK_OFFSET: (np.cumsum(sizes) - sizes).astype(np.int64)}
    if len(gate_states):
        out.update(_stack_gates(gate_kind, gate_states))
    for key in learner.head_keys:
        out[learner.tensor_name(key)] = np.asarray(head_state[key], np.float32)
    learner.check_head(out, int(sizes.sum()), out[ZS_TEXT].shape[1])
    return out


def _stack_gates(kind: str, states: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if kind == "mlp":
        return {gate_key(key): np.stack([np.asarray(s[key], np.float32).reshape(
            () if key == "scale" else np.shape(s[key])) for s in states]) for key in GATE_KEYS["mlp"]}
    ks = [int(np.shape(s["components"])[0]) for s in states]
    dim = int(np.shape(states[0]["mu"])[0])
    comps = np.zeros((len(states), max(ks), dim), np.float32)  # zero rows project nothing
    for t, s in enumerate(states):
        comps[t, : ks[t]] = s["components"]
    return {gate_key("mu"): np.stack([np.asarray(s["mu"], np.float32) for s in states]),
            gate_key("components"): comps, GATE_K: np.asarray(ks, np.int64)}


def gate_states(learned: Mapping[str, np.ndarray], kind: str) -> list[dict[str, np.ndarray]]:
    """The inverse of the packing: each task's autoencoder state (for `ddas.autoencoder_from_state`).

    learned: ``learned_tensors`` output (as read from learned.safetensors); kind: "linear" or "mlp".
    The linear gate's zero-padded components are cut back to each task's rank. Raises KeyError when a
    gate tensor is missing.
    """
    n_tasks = len(learned[TASK_SIZE])
    states = []
    for t in range(n_tasks):
        state = {key: np.asarray(learned[gate_key(key)][t]) for key in GATE_KEYS[kind]}
        if kind == "linear":
            state["components"] = state["components"][: int(learned[GATE_K][t])]
        else:
            state["scale"] = state["scale"].reshape(1)
        states.append(state)
    return states


# -- what the graph is built from -------------------------------------------------------------
@dataclass(frozen=True)
class DecisionSpec:
    """The settings of the decision, read from the manifest and checked against the tensors.

    method: a registry name; fusion: "ddas" or "paper" (``FUSIONS``); beta: weight of the learned scores;
    logit_scale: CLIP's temperature (100); gate_kind: "linear" or "mlp"; thresholds: each task's DDAS
    threshold; offsets / sizes: each task's columns; settings: the learner's own typed settings
    (``meta.method.settings``, the struct its registry class declares: RAIL dual reads ``gamma_kernel``).
    Build it with ``from_bundle``.
    """

    method: str
    fusion: str
    beta: float
    logit_scale: float
    gate_kind: str
    route_rule: str  # ddas.ROUTE_RULES
    thresholds: np.ndarray  # [T] float32
    offsets: np.ndarray  # [T] int64
    sizes: np.ndarray  # [T] int64
    settings: LearnerSettings  # the learner's settings struct (edgeclip.manifest)

    @property
    def learner(self) -> type[Learner]:
        """The method's learner class (``edgeclip.train.registry``)."""
        return get_learner(self.method)

    @property
    def n_tasks(self) -> int:
        """T, the learned tasks."""
        return len(self.sizes)

    @property
    def n_learned(self) -> int:
        """C_learned, the learned classes over all tasks."""
        return int(self.sizes.sum())

    @classmethod
    def from_bundle(cls, learned: Mapping[str, np.ndarray], meta: Manifest) -> DecisionSpec:
        """The spec of a bundle version: ``learned`` (learned.safetensors' tensors) and its typed manifest.

        Raises BundleError on an unknown fusion, method or routing rule, task sizes or offsets that
        disagree with the manifest's tasks, or a non-positive threshold.
        """
        gate, tasks = meta.gate, meta.tasks
        method, settings = meta.method.name, meta.method.settings
        fusion = settings.fusion
        if fusion not in FUSIONS:
            raise BundleError(f"unknown fusion rule {fusion!r}; known: {FUSIONS}")
        if method not in METHOD_NAMES:
            raise BundleError(f"unknown method {method!r}; known: {', '.join(METHOD_NAMES)}")
        sizes = np.asarray(learned.get(TASK_SIZE, np.zeros(0, np.int64)), np.int64)
        offsets = np.asarray(learned.get(TASK_OFFSET, np.zeros(0, np.int64)), np.int64)
        if len(sizes) != len(tasks) or [len(t.classes) for t in tasks] != sizes.tolist():
            raise BundleError(f"learned tensors describe tasks of sizes {sizes.tolist()}, "
                              f"the manifest {[len(t.classes) for t in tasks]}")
        if not np.array_equal(offsets, np.cumsum(sizes) - sizes):
            raise BundleError(f"task offsets {offsets.tolist()} do not follow the task sizes {sizes.tolist()}")
        route_rule = (gate.settings.route_rule if gate.settings else None) or ROUTE_RULE
        if route_rule not in ROUTE_RULES:
            raise BundleError(f"unknown gate routing rule {route_rule!r}; known: {ROUTE_RULES}")
        thresholds = np.asarray([float(t.threshold) for t in tasks], np.float32)
        if np.any(~(thresholds > 0)):
            raise BundleError(f"gate thresholds must be positive, got {thresholds.tolist()}")
        return cls(
            method=method, fusion=fusion, beta=float(settings.beta), logit_scale=float(meta.zero_shot.logit_scale),
            gate_kind=gate.kind, route_rule=route_rule, thresholds=thresholds,
            offsets=offsets, sizes=sizes, settings=settings,
        )



def paper_route(p_zs: np.ndarray, spec: DecisionSpec) -> np.ndarray:
    """The paper's gate as a route: the task owning the zero-shot top-1 class, -1 if it is unseen.

    p_zs: [B, L] zero-shot probabilities -> [B] int64 (RAIL-Fusion's rule, METHODS.md section 3).
    """
    top = p_zs.argmax(axis=1)
    task_of_column = np.repeat(np.arange(spec.n_tasks, dtype=np.int64), spec.sizes)
    if spec.n_learned == 0:
        return np.full(len(top), -1, np.int64)
    return np.where(top < spec.n_learned, task_of_column[np.minimum(top, spec.n_learned - 1)], -1).astype(np.int64)


def moe_scores(adapted: np.ndarray, route: np.ndarray, task_text: np.ndarray, spec: DecisionSpec) -> np.ndarray:
    """[B,C] float32: row b routed to t gets softmax(logit_scale * adapted_b task_text_t^T) on task t's
    columns, zero elsewhere; rows routed to -1 are zero.

    adapted: [B,D] unit rows (the image through task t's router); route: [B] int64; task_text: [C,D]
    unit rows (each task's adapted text classifier). MoE-Adapters' head (METHODS.md section 1).
    """
    route = np.asarray(route, np.int64)
    logits = spec.logit_scale * np.asarray(adapted, np.float32) @ np.asarray(task_text, np.float32).T
    own = fusion.task_masks(spec.offsets, spec.sizes, spec.n_learned)[np.maximum(route, 0)] > 0  # [B,C]
    probs = fusion.softmax(np.where(own, logits, -np.inf))
    return np.where(own & (route >= 0)[:, None], probs, 0.0).astype(np.float32)


Adapt = Callable[[np.ndarray], np.ndarray]  # route [B] -> adapted embeddings [B,D] (rows of -1 ignored)


def gated_reference(embedding: np.ndarray, label_text: np.ndarray, learned: Mapping[str, np.ndarray],
                    meta: Manifest, adapt: Adapt | None = None) -> dict[str, np.ndarray]:
    """{"scores" [B,L], "route" [B], "gate_ratio" [B,T]} for image embeddings [B,D].

    MoE bundles need `adapt`: given the gate's routes, the images' adapted embeddings (e.g.
    `MoECLIP.encode_image(pixels, route, normalize=True)`).

    embedding: [B,D] float32 frozen CLIP image embeddings; label_text: [L,D] float32, rows 0..C-1 the
    learned classes in global order. Outputs: scores float32, route int64 (-1 = zero-shot), gate_ratio
    float32 (err_t / thr_t). The numpy reference of the exported gated graph (METHODS.md sections 2
    and 3). Raises BundleError as ``DecisionSpec.from_bundle`` does, UsageError for an MoE bundle
    without ``adapt`` or on mismatched shapes.
    """
    spec = DecisionSpec.from_bundle(learned, meta)
    x = np.asarray(embedding, np.float32)
    p_zs = fusion.zero_shot_probs(x, label_text, spec.logit_scale)
    if spec.n_tasks == 0:
        return {"scores": p_zs, "route": np.full(len(x), -1, np.int64),
                "gate_ratio": np.zeros((len(x), 0), np.float32)}
    gates = [ddas.autoencoder_from_state(state, {"kind": spec.gate_kind})
             for state in gate_states(learned, spec.gate_kind)]
    errors = np.stack([gate.errors(x) for gate in gates], axis=1)  # [B,T]
    route, ratios = ddas.route(errors, spec.thresholds, spec.route_rule)
    if spec.learner.learns_from_images:
        if adapt is None:
            raise UsageError("the MoE reference needs the adapted embeddings (adapt)")
        s_moe = moe_scores(adapt(route), route, learned[TASK_TEXT], spec)
        scores = fusion.fuse_gated(p_zs, s_moe, route, spec.offsets, spec.sizes, beta=1.0)
        return {"scores": scores, "route": route, "gate_ratio": ratios.astype(np.float32)}
    s_a = spec.learner.scoring_head(learned, spec).scores(x)
    if spec.fusion == "ddas":
        scores = fusion.fuse_gated(p_zs, s_a, route, spec.offsets, spec.sizes, spec.beta)
    else:
        route = paper_route(p_zs, spec)
        scores = fusion.fuse_paper(p_zs, s_a, spec.beta)
    return {"scores": scores, "route": route, "gate_ratio": ratios.astype(np.float32)}

"""The numpy reference of the gated decision (graphs/gated.onnx), from embeddings onwards.

Built only from the learners' own code: `ddas` (autoencoder errors, routing), `rail` (head
scores) and `fusion` (zero-shot probabilities, fusion rules). For MoE bundles the adapted
embeddings come from the caller (the torch MoECLIP), everything after them from here. The ONNX graph that
`edgeclip.export.compose` writes is tested against this, so each formula exists once in
numpy and once as the exported graph. numpy only (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgeclip.edgeapp.errors import UsageError
from edgeclip.export.compose import MOE, TASK_TEXT, DecisionSpec, gate_states
from edgeclip.train import ddas, fusion
from edgeclip.train.rail import RailDual, RailPrimal


def rail_head(learned: Mapping[str, np.ndarray], spec: DecisionSpec) -> RailPrimal | RailDual:
    """The RAIL learner rebuilt from its inference tensors (enough to call `.scores`)."""
    if spec.method == "rail-primal":
        w_r, w = np.asarray(learned["rail.w_r"]), np.asarray(learned["rail.w"])
        settings = {"dim": w_r.shape[0], "hidden": w_r.shape[1], "gamma": 1.0, "seed": 0,
                    "n_classes": w.shape[1], "n_seen": 0}
        # The statistics A, C are only needed to keep learning; scoring reads w_r and w.
        return RailPrimal.from_state({"w_r": w_r, "w": w, "a": np.zeros((0, 0)), "c": np.zeros((0, 0))}, settings)
    head = RailDual(gamma_kernel=spec.kernel_gamma)
    head.memory = np.asarray(learned["rail.memory"], np.float32)
    head.alpha = np.asarray(learned["rail.alpha"], np.float32)
    head.n_classes = head.alpha.shape[1]
    return head


def paper_route(p_zs: np.ndarray, spec: DecisionSpec) -> np.ndarray:
    """The paper's gate as a route: the task owning the zero-shot top-1 class, -1 if it is unseen."""
    top = p_zs.argmax(axis=1)
    task_of_column = np.repeat(np.arange(spec.n_tasks, dtype=np.int64), spec.sizes)
    if spec.n_learned == 0:
        return np.full(len(top), -1, np.int64)
    return np.where(top < spec.n_learned, task_of_column[np.minimum(top, spec.n_learned - 1)], -1).astype(np.int64)


def moe_scores(adapted: np.ndarray, route: np.ndarray, task_text: np.ndarray, spec: DecisionSpec) -> np.ndarray:
    """[B,C]: row b routed to t gets softmax(logit_scale * adapted_b task_text_t^T) on task t's
    columns, zero elsewhere; rows routed to -1 are zero."""
    route = np.asarray(route, np.int64)
    logits = spec.logit_scale * np.asarray(adapted, np.float32) @ np.asarray(task_text, np.float32).T
    own = fusion.task_masks(spec.offsets, spec.sizes, spec.n_learned)[np.maximum(route, 0)] > 0  # [B,C]
    probs = fusion.softmax(np.where(own, logits, -np.inf))
    return np.where(own & (route >= 0)[:, None], probs, 0.0).astype(np.float32)


Adapt = Callable[[np.ndarray], np.ndarray]  # route [B] -> adapted embeddings [B,D] (rows of -1 ignored)


def gated_reference(embedding: np.ndarray, label_text: np.ndarray, learned: Mapping[str, np.ndarray],
                    manifest: Mapping[str, Any], adapt: Adapt | None = None) -> dict[str, np.ndarray]:
    """{"scores" [B,L], "route" [B], "gate_ratio" [B,T]} for image embeddings [B,D].

    MoE bundles need `adapt`: given the gate's routes, the images' adapted embeddings (e.g.
    `MoECLIP.encode_image(pixels, route, normalize=True)`).
    """
    spec = DecisionSpec.from_bundle(learned, manifest)
    x = np.asarray(embedding, np.float32)
    p_zs = fusion.zero_shot_probs(x, label_text, spec.logit_scale)
    if spec.n_tasks == 0:
        return {"scores": p_zs, "route": np.full(len(x), -1, np.int64),
                "gate_ratio": np.zeros((len(x), 0), np.float32)}
    gates = [ddas.autoencoder_from_state(state, {"kind": spec.gate_kind})
             for state in gate_states(learned, spec.gate_kind)]
    errors = np.stack([gate.errors(x) for gate in gates], axis=1)  # [B,T]
    route, ratios = ddas.route(errors, spec.thresholds, spec.route_rule)
    if spec.method == MOE:
        if adapt is None:
            raise UsageError("the MoE reference needs the adapted embeddings (adapt)")
        s_moe = moe_scores(adapt(route), route, learned[TASK_TEXT], spec)
        scores = fusion.fuse_gated(p_zs, s_moe, route, spec.offsets, spec.sizes, beta=1.0)
        return {"scores": scores, "route": route, "gate_ratio": ratios.astype(np.float32)}
    s_a = rail_head(learned, spec).scores(x)
    if spec.fusion == "ddas":
        scores = fusion.fuse_gated(p_zs, s_a, route, spec.offsets, spec.sizes, spec.beta)
    else:
        route = paper_route(p_zs, spec)
        scores = fusion.fuse_paper(p_zs, s_a, spec.beta)
    return {"scores": scores, "route": route, "gate_ratio": ratios.astype(np.float32)}

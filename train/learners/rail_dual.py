"""RAIL dual (RAIL, Xu et al., NeurIPS 2024, arXiv 2406.18868, section 3): kernel ridge regression
with an RBF kernel over the stored frozen embeddings, learned in closed form (numpy, torch-free).

Head: ``rail.memory`` [N,D] (the training embeddings) and ``rail.alpha`` [N,C] (the coefficients);
scores s_A = exp(-gamma ||x - m||^2) alpha."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeclip.layout import rail_key
from edgeclip.manifest import RailDualSettings
from edgeclip.train.registry import GraphBuilder, Learner, register_learner


@register_learner
class RailDualLearner(Learner):
    """RAIL dual: RBF width ``gamma_kernel``, ridge ``lam`` (``RailDualSettings``)."""

    name = "rail-dual"
    paper = "RAIL, Xu et al., NeurIPS 2024 (arXiv 2406.18868), section 3 (dual)"
    settings_type = RailDualSettings
    model = "edgeclip.train.rail:RailDual"
    head_keys = ("memory", "alpha")

    @classmethod
    def init_settings(cls, options: Mapping[str, Any], dim: int) -> RailDualSettings:
        """The settings with the embedding size ``dim`` recorded."""
        return super().init_settings({**options, "dim": dim}, dim)

    @classmethod
    def initial_head(cls, settings: Any, dim: int) -> dict[str, np.ndarray]:
        """An empty memory [0,D] and coefficients [0,0]."""
        return {"memory": np.zeros((0, dim), np.float32), "alpha": np.zeros((0, 0), np.float32)}

    @classmethod
    def untrained(cls, settings: Any, learned: Mapping[str, np.ndarray], dim: int) -> Any:
        """``RailDual`` with an empty memory."""
        from edgeclip.train.rail import RailDual

        return RailDual(settings.gamma_kernel, settings.lam)

    @classmethod
    def scoring_head(cls, learned: Mapping[str, np.ndarray], spec: Any) -> Any:
        """``RailDual`` from ``rail.memory`` and ``rail.alpha`` with the RBF width ``gamma_kernel`` of
        ``spec.settings`` (``RailDualSettings``)."""
        from edgeclip.train.rail import RailDual

        head = RailDual(gamma_kernel=spec.settings.gamma_kernel)
        head.memory = np.asarray(learned[rail_key("memory")], np.float32)
        head.alpha = np.asarray(learned[rail_key("alpha")], np.float32)
        head.n_classes = head.alpha.shape[1]
        return head

    @classmethod
    def graph_scores(cls, g: GraphBuilder, x: str, learned: Mapping[str, np.ndarray], spec: Any) -> str:
        """s_A [B,C] = exp(-gamma max(||x||^2 + ||m||^2 - 2 x m^T, 0)) alpha."""
        memory = np.asarray(learned[rail_key("memory")], np.float32)  # [N,D]
        x_sq = g.op("ReduceSumSquare", x, g.ints(1), keepdims=1)  # [B,1]
        cross = g.op("MatMul", x, g.const(memory.T, "rail_memory_t"))  # [B,N]
        sq = g.op("Sub", g.op("Add", x_sq, g.const((memory * memory).sum(1)[None, :], "rail_memory_sq")),
                  g.op("Mul", g.const(2.0, "two"), cross))
        kernel = g.op("Exp", g.op("Mul", g.const(-spec.settings.gamma_kernel, "neg_gamma"),
                                  g.op("Max", sq, g.const(0.0, "zero"))))
        return g.op("MatMul", kernel, g.const(learned[rail_key("alpha")], "rail_alpha"))

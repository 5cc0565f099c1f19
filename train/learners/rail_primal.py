"""RAIL primal (RAIL, Xu et al., NeurIPS 2024, arXiv 2406.18868, section 3): ridge regression on a
seeded random projection of the frozen CLIP embedding, learned in closed form (numpy, torch-free).

Head: ``rail.w_r`` [D,H] (the projection, fixed at init) and ``rail.w`` [H,C] (the ridge weights);
scores s_A = ReLU(x W_r) W."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeclip.layout import rail_key
from edgeclip.manifest import RailPrimalSettings
from edgeclip.train.registry import GraphBuilder, Learner, register_learner


@register_learner
class RailPrimalLearner(Learner):
    """RAIL primal: ``hidden`` random ReLU features, ridge ``gamma`` (``RailPrimalSettings``)."""

    name = "rail-primal"
    paper = "RAIL, Xu et al., NeurIPS 2024 (arXiv 2406.18868), section 3 (primal)"
    settings_type = RailPrimalSettings
    model = "edgeclip.train.rail:RailPrimal"
    head_keys = ("w_r", "w")

    @classmethod
    def init_settings(cls, options: Mapping[str, Any], dim: int) -> RailPrimalSettings:
        """The settings with the embedding size ``dim`` recorded (``RailPrimal(dim, ...)``)."""
        return super().init_settings({**options, "dim": dim}, dim)

    @classmethod
    def initial_head(cls, settings: Any, dim: int) -> dict[str, np.ndarray]:
        """The seeded projection W_r [D,H] and an empty W [H,0]."""
        from edgeclip.train.rail import RailPrimal

        return RailPrimal(dim, settings.hidden, settings.gamma, settings.seed).state()

    @classmethod
    def untrained(cls, settings: Any, learned: Mapping[str, np.ndarray], dim: int) -> Any:
        """``RailPrimal`` with the bundle's projection and no class yet."""
        from edgeclip.train.rail import RailPrimal

        return RailPrimal(settings.dim or dim, settings.hidden, settings.gamma, settings.seed,
                          w_r=learned[rail_key("w_r")])

    @classmethod
    def scoring_head(cls, learned: Mapping[str, np.ndarray], spec: Any) -> Any:
        """``RailPrimal`` from ``rail.w_r`` and ``rail.w`` (enough to score, not to learn)."""
        from edgeclip.train.rail import RailPrimal

        w_r, w = np.asarray(learned[rail_key("w_r")]), np.asarray(learned[rail_key("w")])
        settings = {"dim": w_r.shape[0], "hidden": w_r.shape[1], "gamma": 1.0, "seed": 0,
                    "n_classes": w.shape[1], "n_seen": 0}
        # The statistics A, C are only needed to keep learning; scoring reads w_r and w.
        return RailPrimal.from_state({"w_r": w_r, "w": w, "a": np.zeros((0, 0)), "c": np.zeros((0, 0))}, settings)

    @classmethod
    def graph_scores(cls, g: GraphBuilder, x: str, learned: Mapping[str, np.ndarray], spec: Any) -> str:
        """s_A [B,C] = ReLU(x W_r) W."""
        hidden = g.op("Relu", g.op("MatMul", x, g.const(learned[rail_key("w_r")], "rail_w_r")))
        return g.op("MatMul", hidden, g.const(learned[rail_key("w")], "rail_w"))

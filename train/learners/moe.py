"""MoE-Adapters (Yu et al., CVPR 2024, arXiv 2403.11549; METHODS.md section 1): mixture-of-experts
adapters in the transformer blocks, one router per task, activate-freeze; trained with torch.

Head: ``task_text`` [C,D], each task's classes through the adapted text encoder with its router
(global class order); an image routed to task t is scored against task t's rows with the image
through the adapters and task t's router, so its gated graph is built by
``edgeclip.export.compose_moe`` from the adapted image encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from edgeclip.errors import UsageError
from edgeclip.extras import import_torch_module
from edgeclip.layout import MOE_STATE, TASK_TEXT
from edgeclip.manifest import FREEZE_RULES, WARMUP_RULES, MoEAdapters, MoERecipe, MoESettings
from edgeclip.train.registry import Learner, register_learner


@register_learner
class MoELearner(Learner):
    """MoE-Adapters: ``moe`` (the adapters, ``MoEConfig``) and ``train`` (the recipe) settings."""

    name = "moe"
    paper = "MoE-Adapters, Yu et al., CVPR 2024 (arXiv 2403.11549)"
    settings_type = MoESettings
    model = "edgeclip.train.moe:MoECLIP"
    needs_torch = True
    learns_from_images = True
    head_keys = (TASK_TEXT,)

    @classmethod
    def tensor_name(cls, key: str) -> str:
        """MoE's head tensors keep their names (``task_text``)."""
        return key

    @classmethod
    def init_settings(cls, options: Mapping[str, Any], dim: int) -> MoESettings:
        """The adapters' configuration (``options["moe"]``: ``MoEAdapters`` fields that differ from the
        paper's) and the training recipe (``options["moe_train"]``: ``MoERecipe`` fields), the schema's
        defaults (``DEFAULT_MOE_*``) for the rest. Raises UsageError for an unknown field, a value of
        the wrong type, adapters ``MoEConfig`` refuses (torch) or an unknown freeze or warm-up rule."""
        try:
            adapters = msgspec.convert(options.get("moe") or {}, MoEAdapters)
            recipe = msgspec.convert(options.get("moe_train") or {}, MoERecipe)
        except msgspec.ValidationError as exc:
            raise UsageError(f"Invalid MoE setting: {exc}.") from None
        import_torch_module("edgeclip.train.moe", f"the '{cls.name}' learner").MoEConfig.of(adapters)  # checks
        for rule, value, allowed in (("freeze_rule", recipe.freeze_rule, FREEZE_RULES),
                                     ("warmup_rule", recipe.warmup_rule, WARMUP_RULES)):
            if value not in allowed:
                raise UsageError(f"{rule} must be one of {', '.join(allowed)}, got {value!r}")
        return super().init_settings({**options, "moe": adapters, "train": recipe}, dim)

    @classmethod
    def initial_files(cls, settings: Any, clip: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
        """``moe.safetensors``: the adapters of a bundle with no task (``train.moe.initial_moe_state``), torch."""
        moe = import_torch_module("edgeclip.train.moe", f"the '{cls.name}' learner")
        return {MOE_STATE: moe.initial_moe_state(clip, moe.MoEConfig.of(settings.moe), seed)}

    @classmethod
    def initial_head(cls, settings: Any, dim: int) -> dict[str, np.ndarray]:
        """No task yet: no class rows, ``task_text`` [0,D]."""
        return {TASK_TEXT: np.zeros((0, dim), np.float32)}

    @classmethod
    def check_head(cls, learned: Mapping[str, np.ndarray], n_learned: int, dim: int) -> None:
        """``task_text`` must have one row per learned class."""
        if np.shape(learned[TASK_TEXT]) != (n_learned, dim):
            raise UsageError(f"task_text must be [{n_learned}, {dim}] (one row per learned class), got "
                             f"{list(np.shape(learned[TASK_TEXT]))}")

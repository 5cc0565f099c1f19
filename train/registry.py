"""The learner registry: method name -> what the rest of edgeclip needs to know about that learner.

Code elsewhere asks the registry (``learner_spec(name)``) instead of comparing method names: whether
add-task needs torch, whether the learner learns from frozen embeddings (closed form, on the device)
or from images (gradients through the backbone), which tensors its head stores in
``learned.safetensors``, and how that head scores (``head``: the numpy reference in
``edgeclip.train.decision`` and the ONNX builder in ``edgeclip.export.compose`` are keyed by it).
The learner class itself is imported only when asked for (``load_learner``); torch learners go
through ``edgeclip.extras.import_torch_module``, so the torch-free paths never import torch.

Adding a learner: one module with its class, and one ``LearnerSpec`` below. A learner whose head is
a new computation also adds that head to ``decision`` (numpy) and ``compose`` (ONNX).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from edgeclip.errors import UsageError
from edgeclip.extras import import_torch_module
from edgeclip.layout import TASK_TEXT, rail_key

Head = Literal["ridge", "kernel", "adapted-text"]


@dataclass(frozen=True)
class LearnerSpec:
    """One registered learner.

    name: the method name stored in the manifest (``method.name``) and given to ``--method``.
    module, attr: where the learner class lives (imported lazily).
    needs_torch: add-task trains with torch (the ``train`` extra).
    learns_from: "embeddings" (frozen CLIP embeddings [N,D], closed form, torch-free) or "images"
      (preprocessed pixels through an adapted backbone).
    head: how the learned head scores an image (see module docstring).
    head_keys: the head's state keys; ``tensor_name(key)`` is its name in learned.safetensors.
    paper: where the method is published.
    """

    name: str
    module: str
    attr: str
    needs_torch: bool
    learns_from: Literal["embeddings", "images"]
    head: Head
    head_keys: tuple[str, ...]
    paper: str

    def tensor_name(self, key: str) -> str:
        """The learned-tensor name of head state ``key`` (``rail.w`` for RAIL's ``w``; MoE's as is)."""
        return key if self.head == "adapted-text" else rail_key(key)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The learned-tensor names of every head key, in ``head_keys`` order."""
        return tuple(self.tensor_name(k) for k in self.head_keys)


_RAIL_PAPER = "RAIL, Xu et al., NeurIPS 2024 (arXiv 2406.18868), section 3"
LEARNERS: dict[str, LearnerSpec] = {
    spec.name: spec
    for spec in (
        # [D,H] random projection, [H,C] ridge weights
        LearnerSpec("rail-primal", "edgeclip.train.rail", "RailPrimal", False, "embeddings", "ridge",
                    ("w_r", "w"), _RAIL_PAPER + " (primal)"),
        # [N,D] memory of training embeddings, [N,C] kernel ridge coefficients
        LearnerSpec("rail-dual", "edgeclip.train.rail", "RailDual", False, "embeddings", "kernel",
                    ("memory", "alpha"), _RAIL_PAPER + " (dual)"),
        # [C,D] each task's classes through the adapted text encoder with its router
        LearnerSpec("moe", "edgeclip.train.moe", "MoECLIP", True, "images", "adapted-text",
                    (TASK_TEXT,), "MoE-Adapters, Yu et al., CVPR 2024 (arXiv 2403.11549)"),
    )
}
METHOD_NAMES = tuple(LEARNERS)


def learner_spec(name: str) -> LearnerSpec:
    """The registered learner ``name``; raises UsageError naming the known ones."""
    try:
        return LEARNERS[name]
    except KeyError:
        raise UsageError(f"Unknown method '{name}'; expected one of {', '.join(METHOD_NAMES)}.") from None


def load_learner(name: str) -> Any:
    """The learner class of ``name``, imported now (``RailPrimal``, ``RailDual`` or ``MoECLIP``).

    Raises UsageError for an unknown name, MissingExtraError for a torch learner without torch.
    """
    spec = learner_spec(name)
    if spec.needs_torch:
        module = import_torch_module(spec.module, f"the '{name}' learner")
    else:
        module = importlib.import_module(spec.module)
    return getattr(module, spec.attr)

"""The learner registry (the shape of timm's ``register_model``): method name -> learner class.

A learner is one module under ``edgeclip.train.learners`` holding a ``Learner`` subclass decorated
with ``@register_learner``; the module's name is listed once in ``LEARNER_MODULES`` below. The class
owns what the rest of edgeclip needs to know about its learner, and code elsewhere calls it instead
of comparing method names or kinds:

- ``name`` (``method.name`` in the manifest, ``--method``), ``paper``;
- ``settings_type``: its settings struct in the manifest schema (``edgeclip.manifest``, where every
  default lives), ``init_settings(options, dim)`` picks its fields from ``edgeclip init``'s options;
- its head: ``head_keys`` and ``tensor_name`` (names in ``learned.safetensors``), ``initial_head``
  (the head of a bundle with no task), ``check_head``, ``scoring_head`` (the numpy reference of the
  head's scores, ``edgeclip.train.decision``) and ``graph_scores`` (the same scores as ONNX nodes,
  added through the builder that ``edgeclip.export.compose`` passes in);
- how it learns: ``needs_torch`` (add-task trains with torch, the ``train`` extra) and
  ``learns_from_images`` (gradients through an adapted image encoder, whose gated graph
  ``edgeclip.export.compose_moe`` builds) or not (frozen embeddings, closed form, torch-free);
- ``model_class()``: the learning model itself (``RailPrimal``, ``RailDual``, ``MoECLIP``), imported
  only when asked for; torch models go through ``edgeclip.extras.import_torch_module``, so the
  torch-free paths never import torch.

Adding a learner: its module (a ``Learner`` subclass, its settings struct in the schema) and its
name in ``LEARNER_MODULES``; ``tests/test_learners.py`` runs every registered learner through
init -> add-task -> classify.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from edgeclip.errors import UsageError
from edgeclip.extras import import_torch_module
from edgeclip.layout import rail_key

# the learner modules, each registering one learner (imported on the first look-up)
LEARNER_MODULES = (
    "edgeclip.train.learners.rail_primal",
    "edgeclip.train.learners.rail_dual",
    "edgeclip.train.learners.moe",
)
METHOD_NAMES = ("rail-primal", "rail-dual", "moe")  # LEARNER_MODULES' learners, in that order (a test checks)


class GraphBuilder(Protocol):
    """What ``graph_scores`` adds nodes through (``edgeclip.export.compose``'s builder): ``op`` adds
    an ONNX node and returns its output's name, ``const`` an initialiser, ``ints`` an int64 vector."""

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str: ...
    def const(self, value: Any, hint: str = "c", dtype: Any = np.float32) -> str: ...
    def ints(self, *values: int) -> str: ...


class Learner:
    """Base of a registered learner; subclasses set the class attributes and override the methods
    their head needs. Every method is a classmethod: a learner class is a description, not state."""

    name: ClassVar[str]
    paper: ClassVar[str]
    settings_type: ClassVar[type]  # its settings struct in edgeclip.manifest
    model: ClassVar[str]  # "module:Class" of the learning model
    needs_torch: ClassVar[bool] = False
    learns_from_images: ClassVar[bool] = False
    head_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def tensor_name(cls, key: str) -> str:
        """The learned-tensor name of head state ``key`` (RAIL's ``w`` is ``rail.w``)."""
        return rail_key(key)

    @classmethod
    def model_class(cls) -> Any:
        """The learning model's class, imported now. Raises MissingExtraError for a torch learner
        without torch."""
        module, attr = cls.model.split(":")
        if cls.needs_torch:
            return getattr(import_torch_module(module, f"the '{cls.name}' learner"), attr)
        return getattr(importlib.import_module(module), attr)

    @classmethod
    def init_settings(cls, options: Mapping[str, Any], dim: int) -> Any:
        """The settings struct of a new bundle from ``edgeclip init``'s options (the fields this
        learner has; the schema's defaults for the rest). ``dim``: the embedding size D."""
        fields = set(cls.settings_type.__struct_fields__)
        return cls.settings_type(**{k: v for k, v in options.items() if k in fields and v is not None})

    @classmethod
    def initial_head(cls, settings: Any, dim: int) -> dict[str, np.ndarray]:
        """The head state (``head_keys``) of a bundle with no task, for embeddings of width ``dim``."""
        raise NotImplementedError

    @classmethod
    def untrained(cls, settings: Any, learned: Mapping[str, np.ndarray], dim: int) -> Any:
        """The learning model of a bundle with no task, from its settings and initial head tensors
        (``learned``); closed-form learners only (``learns_from_images`` False)."""
        raise UsageError(f"the '{cls.name}' learner learns from images, not embeddings")

    @classmethod
    def initial_files(cls, settings: Any, clip: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
        """The tensor files (name -> tensors) of a bundle with no task besides its learned tensors, from
        its settings, the frozen open_clip model ``clip`` and the seed (init); none by default."""
        return {}

    @classmethod
    def check_head(cls, learned: Mapping[str, np.ndarray], n_learned: int, dim: int) -> None:
        """Refuse (UsageError) head tensors that do not fit ``n_learned`` classes of width ``dim``."""

    @classmethod
    def scoring_head(cls, learned: Mapping[str, np.ndarray], spec: Any) -> Any:
        """The head rebuilt from its inference tensors, with ``.scores(x [B,D]) -> [B,C]`` (numpy).
        ``spec``: the ``decision.DecisionSpec``. Learners whose head needs the adapted image raise."""
        raise UsageError(f"the '{cls.name}' head scores adapted embeddings, not frozen ones")

    @classmethod
    def graph_scores(cls, g: GraphBuilder, x: str, learned: Mapping[str, np.ndarray], spec: Any) -> str:
        """ONNX nodes computing ``scoring_head(...).scores(x)`` [B,C] from the frozen embedding ``x``;
        returns the output's name."""
        raise UsageError(f"the '{cls.name}' head scores adapted embeddings: build its graph with compose_moe")


LEARNERS: dict[str, type[Learner]] = {}


def register_learner(cls: type[Learner]) -> type[Learner]:
    """Class decorator: register ``cls`` under ``cls.name`` (a name may be registered once)."""
    if cls.name in LEARNERS and LEARNERS[cls.name] is not cls:
        raise ValueError(f"a learner named '{cls.name}' is registered already")
    LEARNERS[cls.name] = cls
    return cls


def _load_all() -> None:
    if len(LEARNERS) < len(LEARNER_MODULES):
        for module in LEARNER_MODULES:
            importlib.import_module(module)


def get_learner(name: str) -> type[Learner]:
    """The registered learner ``name``; raises UsageError naming the known ones."""
    _load_all()
    try:
        return LEARNERS[name]
    except KeyError:
        raise UsageError(f"Unknown method '{name}'; expected one of {', '.join(METHOD_NAMES)}.") from None


def all_learners() -> dict[str, type[Learner]]:
    """Every registered learner by name, in ``LEARNER_MODULES`` order."""
    _load_all()
    return {name: LEARNERS[name] for name in METHOD_NAMES}

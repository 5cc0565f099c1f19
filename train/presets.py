"""The two papers' settings as data: ``--preset moe-paper`` and ``--preset rail-paper``.

A preset sets, in one word, every default the authors ran with: the learner's settings fixed at
``edgeclip init`` (method, experts, freeze rule, RAIL hidden size, ridge, fusion weight, seed) and
the ones that apply per learning run (``edgeclip eval`` / ``add-task``: learning rate per dataset,
iterations, warm-up, batch, prompt templates, duplicate class names, the gate's decision unit).

Sources (read 2026-11; the values below are data, no code was copied):

- MoE-Adapters (Yu et al., CVPR 2024), repository JiazuoYu/MoE-Adapters4CL:
  ``mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh`` (full-shot: lr per dataset,
  1000 iterations, DDAS threshold 0.0655), ``mtil/scripts/train/train_few_shot_router11_experts22_1000iters.sh``
  (5-shot: lr per dataset, ``--iterations 1000 --few_shot=5``, threshold 0.060; the released 5-shot
  checkpoint is ``few_shot_order1_1000iters.pth``), ``mtil/src/args.py`` (batch 64, eval batch 128,
  warm-up 100 steps, weight decay 0, seed 42, top-k 2), ``--ls 0.2`` label smoothing, ``--experts_num 22``,
  ``--frozen`` (activate-freeze of the most selected experts). METHODS.md section 1 quotes 500
  iterations for 5-shot (the paper's text); the official script and checkpoint use 1000, which this
  preset follows (``--iterations 500`` gives the paper's text).
- RAIL (Xu et al., NeurIPS 2024), repository linghan1997/Regression-based-Analytic-Incremental-Learning:
  ``configs/analytic_clip.yaml`` (hidden 15000, ridge 0.1, fusion_weight 0.9, 16 shots, seed 42) and
  ``primal_RAIL.py`` (one template "a photo of a {}.", the union of all class names kept with
  duplicates, the fusion routes by the zero-shot top-1 class). METHODS.md section 3 gives beta = 0.8;
  the official configuration runs 0.9, which this preset follows.

Torch-free: read by the CLI, ``edgeapp.evaluate`` and ``edgeapp.moe_task``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeclip.errors import UsageError
from edgeclip.train.registry import get_learner

# The MTIL order (METHODS.md section 4); X-TAIL is the same without CIFAR100.
MTIL_ORDER = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist",
              "oxford_pet", "stanford_cars", "sun397")
XTAIL_ORDER = tuple(d for d in MTIL_ORDER if d != "cifar100")

# Other spellings of the dataset names (torchvision, CoOp, the official scripts), normalised.
_ALIASES = {
    "fgvcaircraft": "aircraft", "fgvc": "aircraft", "caltech": "caltech101", "caltech101": "caltech101",
    "cifar100": "cifar100", "dtd": "dtd", "describabletextures": "dtd", "eurosat": "eurosat",
    "flowers": "flowers", "flowers102": "flowers", "oxfordflowers": "flowers", "food": "food",
    "food101": "food", "mnist": "mnist", "oxfordpet": "oxford_pet", "oxfordpets": "oxford_pet",
    "oxfordiiitpet": "oxford_pet", "pets": "oxford_pet", "stanfordcars": "stanford_cars",
    "cars": "stanford_cars", "sun397": "sun397", "sun": "sun397", "aircraft": "aircraft",
}


def dataset_key(name: str) -> str | None:
    """The MTIL dataset a domain name means ('FGVC-Aircraft', 'oxford_pets', 'Food101' ...), or None."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    # a subset named after its size ('dtd10': ten DTD classes) means its dataset
    return _ALIASES.get(key) or _ALIASES.get(re.sub(r"\d+$", "", key)) if key else None


def _per_dataset(values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(MTIL_ORDER, values, strict=True))


@dataclass(frozen=True)
class Preset:
    """One paper's settings. ``init`` fields are fixed when the bundle is created; ``run`` fields
    apply to each learning run (see `init_settings`, `run_settings`)."""

    name: str
    method: str  # moe | rail-primal
    protocol: str  # the paper's headline protocol: mtil | xtail
    source: str
    seed: int
    fusion: str  # RAIL fusion: 'paper' = route by the zero-shot top-1 class; MoE routes by the DDAS gate
    beta: float | None  # RAIL: weight of the learned scores in the fusion
    hidden: int | None  # RAIL primal random features
    gamma: float | None  # RAIL ridge
    shots: int | None  # training images per class of the headline row (None = all)
    templates: tuple[str, ...] | None  # None: each dataset's own templates (meta.json, ZSCL's for MTIL)
    # MoE training recipe
    experts: int | None = None
    top_k: int | None = None
    freeze_rule: str | None = None
    batch_size: int | None = None
    warmup: int | None = None
    warmup_rule: str | None = None  # 'fixed': the warm-up steps as given (edgeclip: min(warmup, iterations/10))
    label_smoothing: float | None = None
    lr_full: Mapping[str, float] = field(default_factory=dict)
    lr_few: Mapping[str, float] = field(default_factory=dict)
    iterations_full: int | None = None
    iterations_few: int | None = None
    # the DDAS gate
    route_batch: int | None = None  # decide per test batch of this many images (None: per image)
    official_threshold: Mapping[str, float] = field(default_factory=dict)  # hand-set, on AlexNet features

    def lr_for(self, domain: str, shots: int | None) -> float:
        """The learning rate of one domain (by its dataset name) for a full-shot or few-shot run."""
        key = dataset_key(domain)
        table = self.lr_few if shots else self.lr_full
        if key is None or key not in table:
            raise UsageError(f"preset '{self.name}' has no learning rate for domain '{domain}'; it knows "
                             f"{', '.join(MTIL_ORDER)} (name the domain so in meta.json, or pass --lr).")
        return float(table[key])

    def iterations_for(self, shots: int | None) -> int | None:
        return self.iterations_few if shots else self.iterations_full

    def init_settings(self) -> dict[str, Any]:
        """What ``edgeclip init --preset`` sets (CLI option names)."""
        if get_learner(self.method).learns_from_images:
            return {"method": self.method, "seed": self.seed, "experts": self.experts, "freeze_rule": self.freeze_rule,
                    "batch_size": self.batch_size, "encoders": "image,text"}
        return {"method": self.method, "seed": self.seed, "hidden": self.hidden, "beta": self.beta,
                "fusion": self.fusion}

    def moe_recipe(self, domain: str, shots: int | None) -> dict[str, Any]:
        """The MoE training recipe of one task (the keys of the manifest's method.settings.train)."""
        return {"lr": self.lr_for(domain, shots), "iterations": self.iterations_for(shots),
                "batch_size": self.batch_size, "warmup": self.warmup, "warmup_rule": self.warmup_rule,
                "freeze_rule": self.freeze_rule}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lr_full"], out["lr_few"] = dict(self.lr_full), dict(self.lr_few)
        out["official_threshold"] = dict(self.official_threshold)
        return out


MOE_PAPER = Preset(
    name="moe-paper", method="moe", protocol="mtil",
    source="JiazuoYu/MoE-Adapters4CL mtil/scripts/train/train_{full,few}_shot_router11_experts22_1000iters.sh, "
           "mtil/src/args.py",
    seed=42, fusion="ddas", beta=None, hidden=None, gamma=None, shots=None,
    templates=None,  # ZSCL's per-dataset templates (benchmarks/prepare_data.py writes them to meta.json)
    experts=22, top_k=2, freeze_rule="paper", batch_size=64, warmup=100, warmup_rule="fixed",
    label_smoothing=0.2,
    lr_full=_per_dataset((5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3)),
    lr_few=_per_dataset((5e-3, 1e-4, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3)),
    iterations_full=1000, iterations_few=1000,
    route_batch=128,  # --batch-size-eval 128: the auto-selector decides once per test batch
    official_threshold={"full": 0.0655, "few": 0.060},
)

RAIL_PAPER = Preset(
    name="rail-paper", method="rail-primal", protocol="xtail",
    source="linghan1997/Regression-based-Analytic-Incremental-Learning configs/analytic_clip.yaml, primal_RAIL.py",
    seed=42, fusion="paper", beta=0.9, hidden=15000, gamma=0.1, shots=16,
    templates=("a photo of a {}.",),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (MOE_PAPER, RAIL_PAPER)}


def get_preset(name: str | None) -> Preset | None:
    """The preset called `name` (None passes through); UsageError for an unknown name."""
    if name is None:
        return None
    if name not in PRESETS:
        raise UsageError(f"Unknown preset '{name}'; expected one of {', '.join(PRESETS)}.")
    return PRESETS[name]

"""Every learner of the registry, end to end: init -> add-task -> classify on a tiny model with seeded
random weights (the numbers mean nothing about CLIP; the path is what is tested)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeclip.train.registry import METHOD_NAMES, all_learners, get_learner

pytest.importorskip("torch")


def test_the_registry_lists_each_learner_once_in_module_order() -> None:
    learners = all_learners()
    assert tuple(learners) == METHOD_NAMES
    for name, cls in learners.items():
        assert get_learner(name) is cls and cls.head_keys and cls.paper
        assert set(cls.settings_type.__struct_fields__) >= {"beta", "fusion", "seed"}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_learner_inits_learns_a_task_and_classifies(method: str, tmp_path: Path) -> None:
    import edgeclip
    from edgeclip.edgeapp.demo_data import write_demo

    demo = write_demo(tmp_path / "demo", train_per_class=4, query_per_class=1, unseen=1)
    options = {"moe": {"n_experts": 2}} if get_learner(method).learns_from_images else {"hidden": 64}
    clf = edgeclip.create(tmp_path / "bundle", "edgeclip-tiny", method=method, random_weights=True, **options)
    assert clf.bundle.method == method and not clf.tasks
    learned = clf.add_task(None, demo.domains[0], iterations=2)
    assert [t.name for t in learned.tasks] == ["shapes"] and learned.version == "v0002"
    assert learned.bundle.meta.tasks[0].classes == ["circle", "square", "triangle"]
    files = sorted(demo.query.iterdir())
    preds = learned.classify(files, top_k=2)
    assert len(preds) == len(files) and all(p.error is None for p in preds)
    scores = np.array([[t["score"] for t in p.topk] for p in preds])
    assert scores.shape == (len(files), 2) and np.all(np.isfinite(scores)) and np.all(scores[:, 0] >= scores[:, 1])
    assert {p.label for p in preds} <= {"circle", "square", "triangle"}  # the label space: the learned classes
    assert {p.route for p in preds} <= {"shapes", "zero-shot"}

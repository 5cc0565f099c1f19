"""``edgeclip search`` / ``Classifier.search``: a learned class name ranks that class's photos first (the demo's
generated domains, random weights), free text ranks by CLIP similarity from the cache, output formats as classify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeclip
from edgeclip.errors import UsageError

CLI = Path(sys.executable).with_name("edgeclip")


@pytest.mark.slow
def test_search_ranks_a_learned_class_first_and_free_text_by_similarity(make_tiny_bundle, tmp_path: Path) -> None:
    from edgeclip.edgeapp.demo_data import write_demo

    bundle = make_tiny_bundle(tmp_path / "bundle")
    demo = write_demo(tmp_path / "images", train_per_class=8, query_per_class=3, unseen=2)
    clf = edgeclip.load(bundle).add_task("shapes", demo.domains[0])
    known = [demo.query / f for f, (label, _) in demo.expected.items() if label]  # the two domains' photos
    for name in ("circle", "triangle"):
        result = clf.search(name.upper(), known, top=3)  # class names match as classify's labels do
        assert "learned class" in result.how and result.scored == len(known)
        assert [Path(h.path).name.split("-")[0] for h in result.hits] == [name] * 3, result.hits
        assert [h.rank for h in result.hits] == [1, 2, 3]
        assert result.hits[0].score >= result.hits[1].score >= result.hits[2].score
    # free text: cosine of the cached frozen embedding and the text embedding
    files = sorted(demo.query.glob("*.png"))
    result = clf.search("a red car", files, top=len(files))
    assert result.how.startswith("CLIP similarity")
    want = clf.embed_images(files) @ clf.embed_texts(["a red car"])[0]
    got = {h.path: h.score for h in result.hits}
    assert np.allclose([got[os.fspath(f)] for f in files], want, atol=1e-6)
    with pytest.raises(UsageError):
        clf.search("  ", files)
    # the CLI: JSON Lines, exit 0, the same ranking
    proc = subprocess.run([str(CLI), "search", "square", *map(str, known), "--top", "2", "--bundle", str(bundle),
                           "--format", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2] and all(Path(r["path"]).name.startswith("square") for r in rows)
    assert "photos ranked by the score of learned class 'square'" in proc.stderr
    proc = subprocess.run([str(CLI), "search", "square", str(demo.query), "--bundle", str(bundle), "--format", "csv"],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.splitlines()[0] == "rank,path,score" and len(proc.stdout.splitlines()) == 11

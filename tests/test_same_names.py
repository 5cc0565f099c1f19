"""Same-named classes in different tasks (issue 23): a second digits domain whose class names are
the first one's learns, classifies, and is told apart in every output format and in the API."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from cli_helpers import invoke
from PIL import Image, ImageOps

import pytest

import edgeclip
from edgeclip.edgeapp.tasks import add_task
from edgeclip.errors import DomainError, UsageError

DIGITS = ["0", "1", "2"]


def _inverted(src: Path, dest: Path) -> Path:
    """A second digits domain: the same MNIST classes drawn black on white (inverted pixels)."""
    for image in sorted(src.rglob("*.png")) + sorted(src.rglob("*.jpg")):
        out = dest / image.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(image).convert("L")).save(out.with_suffix(".png"))
    return dest


def test_second_digits_domain_with_the_same_class_names(extract_subset, tmp_path: Path, make_tiny_bundle) -> None:
    root = make_tiny_bundle(tmp_path / "b", hidden=256)
    train = extract_subset("mnist", "train", DIGITS, per_class=8)
    test = extract_subset("mnist", "test", DIGITS, per_class=2)
    assert invoke("add-task", train, "--bundle", root, "--quiet").exit_code == 0
    inverted = _inverted(train / "train", tmp_path / "digits-inv" / "train")
    result = invoke("add-task", inverted.parent, "--bundle", root, "--quiet")  # a new name, the same classes
    assert result.exit_code == 0, result.output
    with pytest.raises(DomainError, match="pass --name"):  # the name is taken: --name leads on
        add_task(root, inverted.parent)
    assert invoke("add-task", inverted.parent, "--bundle", root, "--name", "digits-inv2", "--quiet").exit_code == 0
    tasks = ["mnist", "digits-inv", "digits-inv2"]
    assert [t.name for t in edgeclip.load(root).tasks] == tasks

    inputs = [test / "test", _inverted(test / "test", tmp_path / "query-inv")]
    rows = [json.loads(line) for line in invoke("classify", *inputs, "--bundle", root, "--format", "json",
                                                "--top-k", "20", "--quiet").stdout.splitlines()]
    assert len(rows) == 12 and all(r["error"] is None for r in rows)
    for r in rows:
        learned = {(t["label"], t["task"]) for t in r["topk"] if t["task"] != "zero-shot"}
        assert learned == {(c, t) for c in DIGITS for t in tasks}  # nine labels, three per name
        assert r["task"] in tasks and r["label"] in DIGITS

    table = invoke("classify", *inputs, "--bundle", root, "--quiet").stdout
    lines = [ln for ln in table.splitlines() if ln.endswith(tuple("0123456789")) and "(" in ln]
    assert len(lines) == 12, table
    assert all(re.search(r"\.png +[012] \((mnist|digits-inv2?)\) +0\.\d+ ", ln) for ln in lines), table

    out = invoke("classify", *inputs, "--bundle", root, "--format", "csv", "--top-k", "9", "--quiet").stdout
    records = list(csv.DictReader(io.StringIO(out)))
    assert len(records) == 12
    assert all({(rec[f"label_{k}"], rec[f"task_{k}"]) for k in range(1, 10)} ==
               {(c, t) for c in DIGITS for t in tasks} for rec in records)

    # --labels and the API take a task-qualified name (or the plain one) as the learned class, not a new label
    named = invoke("classify", inputs[0], "--bundle", root, "--format", "json", "--top-k", "20", "--quiet",
                   "--labels", "1 (digits-inv), 2, a seven").stdout.splitlines()
    labels = [t["label"] for t in json.loads(named[0])["topk"]]
    assert "1 (digits-inv)" not in labels and labels.count("2") == 3 and "a seven" in labels
    clf = edgeclip.load(root)
    space = clf.label_space(["0 (mnist)"])
    assert space.names.count("0") == 3 and "0 (mnist)" not in space.names and space.ambiguous == {"0", "1", "2"}
    assert "0 (digits-inv)" in space.shown_names()
    with pytest.raises(UsageError, match="task 'mnist' learned no class '7'"):  # names a task, not its class
        clf.label_space(["7 (mnist)"])
    assert "jaguar (car)" in clf.label_space(["jaguar (car)"]).names  # no task 'car': a zero-shot label
    preds = clf.classify(sorted((test / "test" / "1").iterdir()), labels=["0 (mnist)"], top_k=9)
    assert all({(t["label"], t["task"]) for t in p.topk} == {(c, t) for c in DIGITS for t in tasks} for p in preds)

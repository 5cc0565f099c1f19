"""Progress where people look: with stderr a file (a log, a pipe), classify and add-task write one line per
stage and lines with done/total, rate and ETA at least every EDGECLIP_PROGRESS_EVERY seconds (10 by default)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeclip.edgeapp.cli.console import LineProgress

CLI = Path(sys.executable).with_name("edgeclip")


def test_line_progress_reports_stages_counts_eta_and_a_heartbeat(capsys) -> None:
    bar = LineProgress(every=0.2)
    task = bar.add_task("classifying", total=10)
    bar.advance(task, 2)
    assert capsys.readouterr().err == ""  # nothing before a stage has run `every` seconds
    time.sleep(0.25)
    bar.advance(task, 3)  # due: a line with done/total and ETA
    silent = bar.add_task("training", total=None)
    time.sleep(1.5)  # no report from the work: the heartbeat speaks
    bar.update(silent, completed=1, total=1)
    bar.advance(task, 5)
    quick = bar.add_task("writing", total=None)  # open at the end of a successful command: said done
    bar.close()
    err = capsys.readouterr().err
    assert re.search(r"classifying: 5/10 \(50%\), [\d.]+/s, ETA \d+s", err)
    assert re.search(r"training: 0 \(running for \d+s\)", err)
    assert "training: 1/1 done in" in err and "classifying: 10/10 done in" in err and "writing: done in" in err
    failing = LineProgress(every=5)
    failing.add_task("exporting", total=None)
    failing.close(failed=True)  # a command that fails at once: its error stays the only line
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_progress_lines_appear_when_stderr_is_a_file(make_tiny_bundle, tmp_path: Path) -> None:
    from edgeclip.edgeapp.demo_data import write_demo_images

    bundle = make_tiny_bundle(tmp_path / "bundle")
    domains, query = write_demo_images(tmp_path / "images", train_per_class=6, query_per_class=2)
    env = {**os.environ, "EDGECLIP_PROGRESS_EVERY": "0"}  # a line on every report (10 s by default)
    log = tmp_path / "add-task.log"
    with open(log, "w") as err:
        subprocess.run([str(CLI), "add-task", str(domains[0]), "--bundle", str(bundle)], stderr=err,
                       stdout=subprocess.DEVNULL, env=env, check=True, timeout=300)
    text = log.read_text()
    assert "embedding: 18/18 done in" in text, text
    assert "RAIL head: folding 18 new images" in text and "fitting the DDAS gate" in text
    log = tmp_path / "classify.log"
    with open(log, "w") as err:
        subprocess.run([str(CLI), "classify", str(query), "--bundle", str(bundle), "--batch-size", "2"], stderr=err,
                       stdout=subprocess.DEVNULL, env=env, check=True, timeout=300)
    text = log.read_text()
    assert re.search(r"classifying: \d+/14 \(\d+%\), [\d.]+/s, ETA \d+s", text) and "classifying: 14/14 done in" in text, text

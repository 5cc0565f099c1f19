"""MoE training under torchrun (DistributedDataParallel, gloo on CPU, 2 processes) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from safetensors.torch import load_file  # noqa: E402
from moe_helpers import TEMPLATE, frozen_clip, make_domain  # noqa: E402

from edgeclip.train.moe import ZERO_SHOT, MoECLIP, MoEConfig, load_moe_state, moe_state  # noqa: E402
from edgeclip.train.moe_trainer import TrainSettings, train_task  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
# Dropout and routing noise off: they draw different random numbers per rank, so with them on the
# two runs are equally valid but not comparable number for number.
CONFIG = dict(dropout=0.0, noisy_gating=False, n_experts=4)
SETTINGS = dict(iterations=3, batch_size=8, lr=1e-2, warmup=1, freeze_rule="strict")

WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    from edgeclip.train.moe import MoECLIP, MoEConfig, moe_state
    from edgeclip.train.moe_trainer import TrainSettings, train_task
    from moe_helpers import frozen_clip
    job = json.load(open(sys.argv[1]))
    model = MoECLIP(frozen_clip(), MoEConfig(**job["config"]))
    result = train_task(model, [tuple(s) for s in job["samples"]], job["classes"], job["template"],
                        TrainSettings(**job["settings"]))
    rank = os.environ["RANK"]
    save_file(moe_state(model), os.path.join(job["out"], f"rank{{rank}}.safetensors"))
    json.dump(result.losses, open(os.path.join(job["out"], f"losses{{rank}}.json"), "w"))
    """
)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    samples = make_domain(tmp_path / "d", n_classes=3, per_class=4)
    classes = ["a", "b", "c"]
    job = dict(config=CONFIG, settings=SETTINGS, samples=samples, classes=classes, template=TEMPLATE)
    job["out"] = str(tmp_path)
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "worker.py").write_text(WORKER.format(tests=str(TESTS_DIR)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "worker.py"), str(tmp_path / "job.json")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    model = MoECLIP(frozen_clip(), MoEConfig(**CONFIG))
    initial = moe_state(model)
    single = train_task(model, samples, classes, TEMPLATE, TrainSettings(**SETTINGS))
    one = moe_state(model)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]

    assert one.keys() == ranks[0].keys() == ranks[1].keys()
    moved = [k for k in one if k.endswith("up_w") and not torch.equal(one[k], initial[k])]
    assert moved, "training did not change the experts: the comparison would prove nothing"
    for key, value in one.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"
        if not value.is_floating_point():  # expert counts, frozen masks, router masks
            assert torch.equal(ranks[0][key], value), key
    # Parameters agree to float rounding, except where Adam divides a rounding-sized gradient by its own
    # root mean square (an update of about +-lr either way): compare what the model computes instead.
    losses = json.loads((tmp_path / "losses0.json").read_text())
    assert losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    ddp_model = MoECLIP(frozen_clip(), MoEConfig(**CONFIG))
    load_moe_state(ddp_model, ranks[0])
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tokens = open_clip.tokenize([TEMPLATE.format(c) for c in classes])
    with torch.no_grad():
        for task in (0, ZERO_SHOT):
            for encode, x in (("encode_image", images), ("encode_text", tokens)):
                ours, theirs = getattr(ddp_model, encode)(x, task), getattr(model, encode)(x, task)
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

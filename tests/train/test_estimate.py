"""The --dry-run estimate: its sharding arithmetic and compute, and the command's output. (Its memory against
measured CPU steps is benchmarks/training_memory.py: the measured peak depends on the environment, see the
README, so it is not a unit test.)"""

from __future__ import annotations

import json

import pytest

from slimsd.train.config import DistillConfig
from slimsd.train.estimate import estimate

from helpers import run_cli


@pytest.mark.slow  # ~10-30 s: meta-device forwards of the student and the teacher's configs
def test_sharding_divides_what_each_engine_shards():
    est = estimate(DistillConfig(teacher="micro-sd", student="bk-small", resolution=64, ema=True), 4)
    m, params = est["memory_per_process"], est["student_params"]
    assert m["ddp"]["gradients"] == 4 * params and m["ddp"]["optimizer"] == 8 * params
    assert m["zero2"]["optimizer"] == 8 * params // 4 and m["zero2"]["student_weights"] == 4 * params
    assert m["zero3"]["student_weights"] == 4 * params // 4 and m["zero3"]["gathered_weights"] == 4 * params
    assert m["fsdp"] == m["zero3"] and m["fsdp-shard-grad-op"] == m["zero2"]
    assert m["ddp"]["averages"] == 4 * params  # the EMA copy, whole on every process
    assert est["macs_per_sample"]["student_backward"] == 2 * est["macs_per_sample"]["student_forward"]
    # gradient checkpointing runs the forward again in the backward; the teacher's forward is inspect's count
    from slimsd.models.counting import summarize

    keys = dict(
        teacher="micro-sd", student="bk-small", resolution=64, batch_size=2, gradient_checkpointing=True
    )
    ckpt = estimate(DistillConfig(**keys), 4)
    forward = ckpt["macs_per_sample"]["student_forward"]
    assert ckpt["macs_per_step"] == 2 * 4 * (4 * forward + summarize("micro-sd", 64)["unet_macs"])


@pytest.mark.slow  # ~10-30 s: meta-device forwards of the student and the teacher's configs
def test_dry_run_prints_the_estimate_and_json(capsys):
    code, out, _ = run_cli(
        ["distill", "teacher=micro-sd", "resolution=64", "--dry-run", "--num-processes", "2"], capsys
    )
    assert code == 0 and "# estimate: 2 processes" in out and "zero3" in out
    code, out, _ = run_cli(["distill", "teacher=micro-sd", "resolution=64", "--dry-run", "--json"], capsys)
    data = json.loads(out)
    assert data["config"]["teacher"] == "micro-sd" and data["estimate"]["num_processes"] == 1


def test_dry_run_without_an_estimate_still_prints_the_config(capsys):
    code, out, _ = run_cli(["distill", "teacher=someone/not-here", "--dry-run"], capsys)
    assert code == 0 and "teacher: someone/not-here" in out and "# estimate: not available (" in out

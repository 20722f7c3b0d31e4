"""The --dry-run estimate against what a CPU training step measures (peak resident memory in a fresh process),
and its sharding arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimsd.train.config import DistillConfig
from slimsd.train.estimate import estimate

from helpers import run_cli


@pytest.mark.slow
@pytest.mark.parametrize(("teacher", "student"), [("micro-sd", "bk-small"), ("micro-sdxl", "ssd-1b")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_step_memory_is_within_25_percent_of_the_measured_peak(teacher, student, checkpointing):
    """What one step adds (gradients, AdamW states, activations), measured: VmHWM reset before the step."""
    batch = 16
    script = Path(__file__).with_name("measure_step.py")
    args = [teacher, student, "64", str(batch), "1" if checkpointing else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["added"]
    cfg = DistillConfig(
        teacher=teacher,
        student=student,
        resolution=64,
        batch_size=batch,
        gradient_checkpointing=checkpointing,
    )
    p = estimate(cfg, 1)["memory_per_process"]["ddp"]
    added = max(p["activations"], p["gradients"] + p["optimizer"])  # the first step creates AdamW's states
    assert added == pytest.approx(measured, rel=0.25), (added, measured)


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

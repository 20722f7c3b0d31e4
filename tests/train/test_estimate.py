"""The --dry-run estimate: its memory against real CPU training steps of the micro models (live tensor bytes,
a meter checked by hand on one linear layer), its sharding arithmetic and compute, and the command's output."""

from __future__ import annotations

import json

import pytest
import torch

from slimsd.train.config import DistillConfig
from slimsd.train.estimate import LiveBytes, backward_peak, estimate

from helpers import benchmark_module, run_cli


def test_the_meter_counts_a_linear_layers_step_by_hand():
    """nn.Linear(256, 512) on 8 inputs: the forward holds its output; one AdamW step holds the gradients,
    the two moments and, for the weight matrix, sqrt(second moment) and that over the bias correction
    (PyTorch's per-tensor AdamW on CPU)."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(256, 512), torch.randn(8, 256)
    weight, params = 512 * 256 * 4, (512 * 256 + 512) * 4
    with LiveBytes() as meter:
        y = layer(x)
        assert meter.peak == meter.live == 8 * 512 * 4
        del y
        assert meter.live == 0
    optimizer = torch.optim.AdamW(layer.parameters())
    with LiveBytes() as meter:
        layer(x).sum().backward()
        optimizer.step()
    assert meter.peak == params + 2 * params + 2 * weight
    assert meter.live == 3 * params  # gradients and moments stay; the temporaries are gone


@pytest.mark.slow  # ~5-15 s each: a real CPU step and its meta-device estimate
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("batch", [16, 64])
@pytest.mark.parametrize(("teacher", "student"), [("micro-sd", "bk-small"), ("micro-sdxl", "ssd-1b")])
def test_the_memory_estimate_is_within_25_percent_of_a_cpu_training_step(
    teacher, student, batch, checkpointing
):
    """What two real training steps (forward, backward, AdamW) of the student add over its weights, in live
    tensor bytes, against what the estimate adds over the weights, frozen parts and averages."""
    measure = benchmark_module("measure_step")
    measured = measure.live_peak(*measure.student_step(teacher, student, 64, batch, checkpointing))
    keys = dict(teacher=teacher, student=student, resolution=64, batch_size=batch)
    p = estimate(DistillConfig(**keys, gradient_checkpointing=checkpointing), 1)["memory_per_process"]["ddp"]
    fixed = p["student_weights"] + p["frozen"] + p["averages"] + p["gathered_weights"]
    assert p["total"] - fixed == pytest.approx(measured, rel=0.25)


def test_a_sharded_backward_keeps_a_share_of_each_parameter_gradient():
    """An activation of 100 B, a gradient of 40, the activation freed, a gradient of 60: whole, the peak is
    100 + 40 = 140 (later 40 + 60 = 100); each gradient kept 1/2: 100 + 20 = 120; the activations alone: 100."""
    timeline = [(100, False), (40, True), (-100, False), (60, True)]
    assert backward_peak(timeline) == (140, 100)
    assert backward_peak(timeline, 2) == (120, 100)


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

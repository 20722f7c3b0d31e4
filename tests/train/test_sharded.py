"""Sharded training on CPUs (gloo), started the way users start it: `accelerate launch --config_file
configs/accelerate/<engine>.yaml --num_processes 2`. Two sharded processes with batch B equal one process with
batch 2B, and a run stopped after a checkpoint resumes to the same weights. FSDP2 (FULL_SHARD, SHARD_GRAD_OP)
always; DeepSpeed ZeRO-2/3 where the deepspeed package is installed (its CPU accelerator, DS_ACCELERATOR=cpu)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from slimsd.train.distill import train

from helpers import FAST_DISTILL as FAST
from helpers import cfg, launch_distill, max_diff, unet_weights

CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = [
    ("fsdp.yaml", "fsdp"),
    ("fsdp-shard-grad-op.yaml", "fsdp"),
    *[
        pytest.param(name, "deepspeed", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed"))
        for name in ("deepspeed-zero2.yaml", "deepspeed-zero3.yaml")
    ],
]
# adam_epsilon=1e-3: Adam would amplify float-rounding differences of near-zero gradients (m/sqrt(v) ~ ±1)
COMMON = {"max_steps": 3, "data": "shapes:8", "adam_epsilon": 1e-3, "checkpoint_every": 1, "keep_last": 3}
COMMON |= {"lr_scheduler": "linear", "lr_warmup_steps": 1, "ema": True, "ema_decay": 0.9}


def launch(config: str, out: Path, cwd: Path, **kw) -> dict:
    overrides = {**FAST, **COMMON, **kw, "batch_size": 2, "output_dir": out}
    return launch_distill(overrides, cwd, config_file=CONFIGS / config)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict]:
    """The one-process run (batch 4) every engine's two processes are compared with: run once."""
    out = tmp_path_factory.mktemp("one")
    return out, train(cfg(out, "one", **COMMON))


def student_at(out: Path, step: int) -> dict:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "student.safetensors"))


@pytest.mark.slow(seconds=80)  # ZeRO ~110 s, FSDP ~45 s
@pytest.mark.xdist_group("processes")  # one multi-process test at a time (tests/conftest.py)
@pytest.mark.parametrize(("config", "engine"), ENGINES)
def test_two_sharded_processes_equal_one_and_a_stopped_run_resumes_exactly(
    tmp_path, one_process, config, engine
):
    root, one = one_process
    two = tmp_path / "two"
    first = launch(config, two, tmp_path, stop_at_step=2)  # as if killed after step 2
    assert first["engine"] == engine and first["num_processes"] == 2 and first["steps"] == 2
    assert json.loads((two / "checkpoints" / "step-00000002" / "state.json").read_text())["engine"] == engine
    assert max_diff(student_at(root / "one", 2), student_at(two, 2)) <= 1e-5
    resumed = launch(config, two, tmp_path, resume="latest")
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["steps"] == 3
    assert resumed["last"]["loss"] == pytest.approx(one["losses"][-1]["loss"], rel=1e-5)
    assert max_diff(student_at(root / "one", 3), student_at(two, 3)) <= 1e-5
    assert max_diff(unet_weights(one["final_dir"]), unet_weights(two / "final")) <= 1e-5  # the EMA weights


@pytest.mark.slow
def test_a_checkpoint_of_the_layout_before_sharding_still_resumes(tmp_path):
    """Checkpoints written before sharding.py keyed the optimizer state by parameter position
    (``optimizer.state_dict()``); such a run still resumes exactly."""
    import torch

    kw = {**COMMON, "ema": False}
    whole = train(cfg(tmp_path, "whole", **kw))
    train(cfg(tmp_path, "old", stop_at_step=2, **kw))
    trainer_pt = tmp_path / "old" / "checkpoints" / "step-00000002" / "trainer.pt"
    trainer = torch.load(trainer_pt, weights_only=True)
    by_name = trainer["optimizer"]
    names = [g["params"] for g in by_name["param_groups"]]
    position = {name: i for i, name in enumerate(n for group in names for n in group)}
    trainer["optimizer"] = {  # the old layout: what optimizer.state_dict() gives
        "state": {position[k]: v for k, v in by_name["state"].items()},
        "param_groups": [g | {"params": [position[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }
    torch.save(trainer, trainer_pt)
    resumed = train(cfg(tmp_path, "old", resume="latest", **kw))
    assert resumed["resumed_from"].endswith("step-00000002")
    assert max_diff(unet_weights(whole["final_dir"]), unet_weights(resumed["final_dir"])) <= 1e-6

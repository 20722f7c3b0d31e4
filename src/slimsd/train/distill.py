"""`slimsd distill` and `slimsd finetune`: ``train(cfg)``, the one entry point of training.

A config with ``stages`` runs as a staged plan (stages.py: each stage one run); any other runs once through the
training loop (loop.py) with its objective (objectives/: kd, lcm, lcm-lora, progressive, finetune).
"""

from __future__ import annotations

from slimsd.train.config import DistillConfig, validate
from slimsd.train.loop import train_run
from slimsd.train.stages import train_plan


def train(cfg: DistillConfig, step_offset: int = 0, keep_process_group: bool = False) -> dict:
    """Train as ``cfg`` says. Returns {"final_dir", "losses", ...}.
    ``step_offset``: the steps of a staged plan's earlier stages (checkpoint_every counts the plan's steps).
    ``keep_process_group``: a staged plan's stage; the plan's next stages and folder work use the launched
    processes' group (torch cannot reliably start a second one in the same processes), the plan ends it."""
    cfg = validate(cfg)
    if cfg.stages:  # a staged plan runs the loop once per stage
        return train_plan(cfg)
    return train_run(cfg, step_offset, keep_process_group)

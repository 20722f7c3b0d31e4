"""The objective interface: what the training loop (loop.py) asks of an objective, and nothing else.

An objective is a class with a ``name``, registered in objectives/__init__.py. The loop makes one per run,
``Objective(cfg)``, and calls, in this order:

    check(cfg)                        its own config keys (static: config.validate calls it; no model is read)
    load(device, weight_dtype)        -> Models: the trainable student, the frozen parts, what final/ records
    resolution(models)                the training resolution (default: the pipeline's native one)
    prepare(run)                      before the optimizer: taps, target networks, schedules, class images
    averages(student)                 -> {name: state dict | None}: weight averages, checkpointed by name
    architecture(student, models)     names the student when a checkpoint does not fit
    loss(run, batch, step)            -> {"loss": tensor, term: tensor ...} of one micro-batch on this process
    after_step(run, step, online)     after each optimizer step: update the averages from the whole weights
    record(step)                      extra fields of the step's loss record (e.g. progressive's round)
    validation(run, step, log_with)   the validation images (validation_every)
    final_average()                   the average final/ holds (None: the trained weights themselves)
    save_final(run, weights, state)   -> final/: what a finished run leaves
    close()                           undo what prepare hooked on the models

The base class keeps the EMA (``ema: true``) for every objective; objectives/unet.py holds what the U-Net
objectives share (loading a teacher and a student, a micro-batch's noisy latents, final/ as a pipeline folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from slimsd.train.settings import DistillConfig
from slimsd.version import __version__


@dataclass
class Models:
    """What an objective trains and trains with."""

    pipe: object  # the frozen pipeline whose parts serve the run (teacher's; finetune: the model's own)
    student: torch.nn.Module  # the trainable module (fp32), with its requires_grad flags set
    frozen: list[torch.nn.Module] = field(default_factory=list)  # frozen parts, in the compute dtype
    recipe: dict | None = None  # provenance that final/ records
    weight_map: dict | None = None
    taps: list[tuple[str, str]] = field(default_factory=list)
    student_source: str | None = None  # a folder whose non-trained parts final/ reuses


@dataclass
class Run:
    """The run as the loop set it up, as objectives see it."""

    cfg: DistillConfig
    accelerator: object
    engine: str  # single, ddp, fsdp or deepspeed (sharding.py)
    device: torch.device
    weight_dtype: torch.dtype  # the compute dtype of the frozen parts
    models: Models
    resolution: int
    output_dir: Path
    cached: bool  # the data is a latent cache (latents and embeddings instead of pixels and captions)
    gen: torch.Generator  # every random draw of a step (noise, timesteps, VAE samples, dropout)
    student: torch.nn.Module | None = None  # as prepared by accelerate (wrapped under DDP/FSDP/ZeRO)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.accelerator.num_processes


@torch.no_grad()
def update_average(average: dict[str, torch.Tensor], online: dict[str, torch.Tensor], decay: float) -> None:
    """θ_avg ← decay·θ_avg + (1 − decay)·θ, in place, in fp32: the EMA weights and LCM's target network."""
    for k, v in average.items():
        v.mul_(decay).add_(online[k].detach().float(), alpha=1 - decay)


def write_provenance(folder: Path, state: dict, fields: dict, extra: dict | None = None) -> None:
    """final/slimsd.json, one layout for every objective: slimsd's version, FIELDS (what this result is), the
    run's step, skipped rows and allowed config changes (with their steps), then EXTRA."""
    info = {
        "slimsd_version": __version__,
        **fields,
        "step": state["step"],
        "skipped": state["skipped"],
        "config_changes": state["config_changes"],
        **(extra or {}),
    }
    (folder / "slimsd.json").write_text(json.dumps(info, indent=1) + "\n")


class Objective:
    """Defaults every objective shares; a subclass overrides what it does differently."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = "distill"  # the progress bar's label

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.ema: dict[str, torch.Tensor] | None = None

    @staticmethod
    def check(cfg: DistillConfig) -> None:
        """This objective's own config rules (types and ranges are config.py's); one line per problem."""

    def load(self, device, weight_dtype: torch.dtype) -> Models:
        raise NotImplementedError

    def resolution(self, models: Models) -> int:
        from slimsd.models.loading import native_resolution

        return self.cfg.resolution or native_resolution(models.pipe)

    def prepare(self, run: Run) -> None:
        """Before the optimizer is made, on the unwrapped student."""

    def averages(self, student: torch.nn.Module) -> dict[str, dict | None]:
        """The weight averages this objective keeps, by checkpoint name (None: not kept in this run)."""
        if self.cfg.ema:
            self.ema = {k: v.detach().clone().float() for k, v in student.state_dict().items()}
        return {"ema": self.ema, "target": None}

    def loss(self, run: Run, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, run: Run, step: int, online: dict | None) -> None:
        """After optimizer step STEP (counted from 1); ONLINE: the whole weights when an average is kept."""
        if self.ema is not None:
            update_average(self.ema, online, self.cfg.ema_decay)

    def record(self, step: int) -> dict:
        return {}

    def architecture(self, student: torch.nn.Module, models: Models) -> str:
        """A short description of the student, to name it when a checkpoint does not fit."""
        return f"{type(student).__name__} ({sum(p.numel() for p in student.parameters()):,} parameters)"

    def validation(self, run: Run, step: int, log_with) -> None:
        """The validation images of STEP (``validation_every``; called on every process); none by default."""

    def final_average(self) -> dict | None:
        return self.ema

    def save_final(self, run: Run, weights: dict, state: dict) -> Path:
        raise NotImplementedError

    def sampling(self) -> dict | None:
        """How the result samples by default (slimsd.json ``sampling``); None: as its base model does."""
        return None

    def close(self) -> None:
        pass

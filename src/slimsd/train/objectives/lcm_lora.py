"""objective lcm-lora: latent consistency distillation as LoRA adapters on the frozen student (LCM-LoRA, Luo et
al. 2023): the same loss as lcm (lcm.py), no guidance input (the guidance is baked in), and the student itself,
adapters included, as the target network.

final/: the student's own weights as a pipeline with LCMScheduler, and beside them the adapters in diffusers'
LoRA format (pytorch_lora_weights.safetensors, merged by ``slimsd.load``)."""

from __future__ import annotations

from pathlib import Path

from slimsd.models.lora import LORA_FILE
from slimsd.train.adapters import add_lora, write_adapters
from slimsd.train.objectives.lcm import LCM


class LCMLoRA(LCM):
    name = "lcm-lora"
    embedded = False

    @staticmethod
    def check(cfg) -> None:
        """Any sample_guidance: the adapters are trained without a guidance input."""

    def adapt(self, student):
        self.lora_base = {k: v.detach().clone() for k, v in student.state_dict().items()}
        return add_lora(student, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_targets)

    def final_unet_state(self, weights: dict) -> dict:
        return self.lora_base  # the student's own weights; the adapters are written beside them

    def write_extra(self, run, folder: Path, pipe_cls, weights: dict) -> None:
        # diffusers' LoRA format: pipe.load_lora_weights(final/) finds it
        write_adapters(folder, pipe_cls, run.models.student, weights)

    def sampling(self) -> dict:
        return super().sampling() | {"lora": LORA_FILE}

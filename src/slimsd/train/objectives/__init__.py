"""The training objectives, by name. Adding one: a module with a subclass of ``base.Objective`` (or of
``unet.UNetObjective`` for a U-Net student), and its class in OBJECTIVES below; the loop (loop.py) is unchanged."""

from __future__ import annotations

from slimsd.train.objectives.base import Objective
from slimsd.train.objectives.finetune import Finetune
from slimsd.train.objectives.kd import KD
from slimsd.train.objectives.lcm import LCM
from slimsd.train.objectives.lcm_lora import LCMLoRA
from slimsd.train.objectives.progressive import Progressive
from slimsd.train.objectives.vae_decoder import VAEDecoder

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (KD, LCM, LCMLoRA, Progressive, Finetune, VAEDecoder)
}

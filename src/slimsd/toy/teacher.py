"""The toy teacher: micro-sd trained on the shapes world (slimsd.toy.shapes), committed under ``assets/toy-sd``.

It is the offline world's "teacher that knows something": its samples follow captions such as
"a red circle" or "a small blue square on the left", which :func:`slimsd.toy.shapes.caption_fidelity` measures
from pixels. ``slimsd demo`` compresses and distills it; tests use it where a random model would prove
nothing. The weights (safetensors) were made by ``scripts/train_toy_teacher.py``; ``training.json`` beside
them records the settings and the teacher's measured caption fidelity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimsd.errors import SlimsdError

TOY_DIR = Path(__file__).parent / "assets" / "toy-sd"
# How the toy teacher samples well (measured by scripts/train_toy_teacher.py; see training.json's
# guidance_sweep and sampler_sweep). Guidance 2 with its own PLMS scheduler: 0.93 of its captions. At guidance 5
# PLMS (4th-order multistep, unstable under large guidance: Lu et al. 2022) drops to 0.29, where Euler or
# DPM-Solver++ 2M keep 0.89 (the cause of "longer training lost the colours").
TOY_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 2.0, "height": 64, "width": 64}


def load_toy_teacher(torch_dtype: torch.dtype = torch.float32):
    """A fresh ``StableDiffusionPipeline`` of the toy teacher, from the package's assets (safetensors only)."""
    from diffusers import StableDiffusionPipeline

    if not (TOY_DIR / "model_index.json").is_file():
        raise SlimsdError(
            f"the toy teacher's weights are missing from {str(TOY_DIR)!r}; run scripts/train_toy_teacher.py"
        )
    # fp32 is what diffusers loads; asking for it only makes it cast (and warn).
    dtype = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    pipe = StableDiffusionPipeline.from_pretrained(
        str(TOY_DIR),
        use_safetensors=True,
        **dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_training_record() -> dict:
    """The settings and measured fidelity the training script wrote beside the weights."""
    path = TOY_DIR / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}

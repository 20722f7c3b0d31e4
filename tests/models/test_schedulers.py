"""slimsd.models.schedulers: a loaded model builds each named scheduler once and samples with a fresh copy per
call, so that no call's scheduler state (step index, multistep history, timesteps) reaches the next one. The
reference: the same sampling with a scheduler built by plain diffusers (from_config) for that call alone."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from slimsd.models import schedulers
from slimsd.models.loading import load


@pytest.fixture(scope="module")
def micro():
    return load("micro-sd", dtype="fp32", optimize=False)


def latents(pipe, steps: int) -> np.ndarray:
    out = pipe(
        "a red circle",
        num_inference_steps=steps,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    )
    return out.images.numpy()


@pytest.mark.parametrize("name", ["pndm", "dpm++2m", "unipc", "lcm"])
def test_a_kept_scheduler_samples_as_one_built_for_the_call(micro, name):
    own = micro.scheduler
    try:
        schedulers.set_scheduler(micro, name)
        first = micro.scheduler
        latents(micro, 3)
        latents(micro, 2)  # another schedule in between, on the same kept scheduler
        schedulers.set_scheduler(micro, name)
        assert micro.scheduler is not first  # a copy per call
        kept = latents(micro, 3)
        cls_name, overrides, _ = schedulers.SCHEDULERS[name]
        base = {k: v for k, v in micro._slimsd["base_scheduler"].items() if k != "use_karras_sigmas"}
        micro.scheduler = getattr(diffusers, cls_name).from_config(
            {"clip_sample": False, **base}, **overrides
        )
        np.testing.assert_array_equal(kept, latents(micro, 3))
    finally:
        micro.scheduler = own

"""What only a GPU shows (`pytest -m gpu`, benchmarks/gpu_check.sh): half-precision inference per family, the
SDXL VAE decoding in fp32 under fp16. Skipped on machines without CUDA (the one allowed skip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimsd.models.loading import load
from slimsd.run.generate import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = ["a red circle", "a small blue square on the left"]
STEPS = 4
# Mean |pixel difference| between a half-precision and an fp32 generation, in grey levels. From data other
# than this test: the same generations (these prompts, steps and seed) on the CPU, bf16 against fp32: micro-sd
# 0.60, toy-sd 0.69, micro-sdxl 0.92 (2026-12-06, AMD EPYC with AVX512-BF16/AMX), doubled for other kernels;
# fp16 keeps 3 more mantissa bits than bf16, so it is held to the same bound.
MEAN_GREY_LEVELS = 2.0


def pixels(results) -> np.ndarray:
    return np.stack([np.asarray(r.image, dtype=np.float64) for r in results])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("model", ["micro-sd", "toy-sd", "micro-sdxl"])
def test_half_precision_on_the_gpu_draws_the_fp32_images(model, dtype):
    """Initial noise comes from CPU generators (slimsd.run.generate), so fp32 and half start alike."""
    reference = pixels(generate(load(model, device="cuda", dtype="fp32"), PROMPTS, steps=STEPS, seed=1))
    pipe = load(model, device="cuda", dtype=dtype)
    assert pipe.unet.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    got = pixels(generate(pipe, PROMPTS, steps=STEPS, seed=1))
    assert reference.std() > 10  # images, not a flat field (a NaN decode is black)
    assert np.abs(got - reference).mean() <= MEAN_GREY_LEVELS


def test_the_sdxl_vae_decodes_in_fp32_under_fp16():
    """An SDXL VAE overflows to NaN in fp16 (black images): slimsd.load marks it force_upcast, and diffusers'
    SDXL pipeline then decodes in fp32. The decoder's input dtype is recorded, not the flag."""
    pipe = load("micro-sdxl", device="cuda", dtype="fp16")
    seen = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        images = pixels(generate(pipe, PROMPTS[:1], steps=STEPS, seed=1))
    finally:
        hook.remove()
    assert seen == [torch.float32]
    assert np.isfinite(images).all() and images.std() > 10
    assert pipe.unet.dtype == torch.float16  # only the decode is upcast

    bf16 = load("micro-sdxl", device="cuda", dtype="bf16")  # bf16 has fp32's range: no upcast needed
    seen.clear()
    hook = bf16.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        generate(bf16, PROMPTS[:1], steps=STEPS, seed=1)
    finally:
        hook.remove()
    assert seen == [torch.bfloat16]

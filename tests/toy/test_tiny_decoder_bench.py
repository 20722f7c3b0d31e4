"""benchmarks/toy_tiny_decoder.py's image metrics against closed forms: PSNR of a uniform one-level error, SSIM
of two flat images (only its luminance term is left: (2ab + C1) / (a^2 + b^2 + C1)), the colour shift per channel."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import benchmark_module


def test_psnr_ssim_and_colour_shift_against_closed_forms():
    bench = benchmark_module("toy_tiny_decoder")
    full = np.full((2, 32, 32, 3), 100, dtype=np.uint8)
    tiny = full.copy()
    tiny[..., 0] += 1  # red one level up everywhere: MSE 1/3
    r = bench.compare(full, tiny)
    assert r["psnr_db"] == pytest.approx(10 * np.log10(255**2 / (1 / 3)), abs=1e-9)
    assert r["colour_shift_rgb"] == pytest.approx([1.0, 0.0, 0.0]) and r["colour_shift_max_abs"] == 1.0
    tiny[1, ..., 0] -= (
        2  # the second image's red one level down: the mean shift cancels, per image it does not
    )
    r = bench.compare(full, tiny)
    assert r["colour_shift_rgb"] == pytest.approx([0.0, 0.0, 0.0])
    assert r["colour_shift_per_image_abs_rgb"] == pytest.approx([1.0, 0.0, 0.0])
    a, b = 100 / 255, 110 / 255
    flat = bench.ssim(np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 110, np.uint8))
    assert flat[0] == pytest.approx((2 * a * b + 0.01**2) / (a * a + b * b + 0.01**2), rel=1e-9)
    noise = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    assert bench.ssim(noise, noise)[0] == pytest.approx(1.0)

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


def test_evaluation_captions_are_the_demos_and_validation_shares_none_of_them():
    """The evaluation's captions start with the demo's own (its eval_captions, 24 per seed, sample seeds as the demo
    draws them), held-out ones name only held-out combinations, and the validation's (to choose the recipe on) are
    of seen combinations and share no caption text with the evaluation's."""
    from slimsd.toy.demo import DemoConfig, eval_captions
    from slimsd.toy.shapes import HELD_OUT, parse_caption

    bench = benchmark_module("toy_tiny_decoder")
    cfg = DemoConfig()
    for split in ("seen", "held_out"):
        captions, seeds = bench.evaluation_captions(30, split)
        assert len(captions) == len(seeds) == 90
        for k, s in enumerate(cfg.eval_seeds):
            assert captions[30 * k : 30 * k + 24] == eval_captions(cfg, s, split)
            assert seeds[30 * k : 30 * k + 24] == [10_000 * (s + 1) + i for i in range(24)]
        held = [(parse_caption(c).colour, parse_caption(c).shape) in HELD_OUT for c in captions]
        assert all(held) if split == "held_out" else not any(held)
    taken = {c for split in ("seen", "held_out") for c in bench.evaluation_captions(30, split)[0]}
    validation, vseeds = bench.validation_captions(50, taken)
    assert len(validation) == 50 and not set(validation) & taken
    assert not any((parse_caption(c).colour, parse_caption(c).shape) in HELD_OUT for c in validation)
    assert min(vseeds) > max(bench.evaluation_captions(30, "seen")[1])


def test_fresh_images_skip_training_pixels():
    """fresh_images keeps the stream's order and skips exactly the images whose pixels are excluded."""
    import hashlib

    from slimsd.toy.shapes import make_dataset

    bench = benchmark_module("toy_tiny_decoder")
    stream = [im for im, _ in make_dataset(12, seed=99, size=64, split="all")]
    excluded = {hashlib.sha256(stream[i].tobytes()).hexdigest() for i in (0, 2)}
    kept, skipped = bench.fresh_images(5, 99, "all", excluded)
    assert skipped == 2
    assert [im.tobytes() for im in kept] == [stream[i].tobytes() for i in (1, 3, 4, 5, 6)]

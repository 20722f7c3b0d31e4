"""Generation: sample with per-image seeds, from a pipeline that :func:`slimsd.load` made.

Reproducibility rules (the point of this module):

- Image *i* of a prompt uses seed ``S + i`` whatever the batch size: every image gets its own
  ``torch.Generator`` (on the CPU, so a seed means the same noise on any device), and diffusers draws each
  image's initial latents and ancestral noise from its own generator. A caller with its own seed per prompt
  (``slimsd eval``, ``slimsd demo``) passes ``seeds``.
- Seed -1 draws a fresh seed; the seed actually used is reported and stored.
- Each result carries its :class:`~slimsd.run.pnginfo.Settings`, which :mod:`slimsd.run.outputs` writes into
  the PNG (A1111 ``parameters`` and the ``slimsd`` JSON chunk).

A batch runs the U-Net on several images at once, which changes floating-point summation order: image *i*
of a batch matches a batch-of-one run with seed ``S + i`` to within float rounding (about 1e-6), and exactly
when both runs use the same batch size. The ``slimsd`` chunk records the batch size for that reason.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from slimsd.devices import dtype_name
from slimsd.errors import SlimsdError
from slimsd.models.loading import model_info, native_resolution
from slimsd.run import deepcache
from slimsd.run.pnginfo import Settings
from slimsd.run.schedulers import check_scheduler, set_scheduler

# Limits: wide enough for every real model, narrow enough to catch typos before minutes of work.
SIZE_RANGE = (64, 2048)
STEPS_RANGE = (1, 200)
GUIDANCE_RANGE = (0.0, 50.0)
MAX_SEED = 2**32 - 1  # A1111's seed range; also what a PNG's "Seed:" field round-trips
MAX_IMAGES = 100
MAX_BATCH = 64
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5  # for a model that does not say otherwise


def sampling_defaults(sampling: dict | None) -> dict:
    """Steps and guidance a model samples with unless told otherwise: a step-distilled student's own (its
    slimsd.json ``sampling``, e.g. LCM: 4 steps, guidance through its embedding), else 25 and 7.5."""
    own = sampling or {}
    return {
        "steps": int(own.get("steps", DEFAULT_STEPS)),
        "guidance": float(own.get("guidance", DEFAULT_GUIDANCE)),
    }


def validate(
    *,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    seed: int,
    num_images: int = 1,
    batch_size: int = 1,
    scheduler: str | None = None,
    deep_cache: int = 1,
) -> None:
    """Refuse bad generation settings with one line naming the value and what is allowed."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v % 8 or not SIZE_RANGE[0] <= v <= SIZE_RANGE[1]:
            raise SlimsdError(
                f"{name} {v!r} is not allowed: a multiple of 8 from {SIZE_RANGE[0]} to "
                f"{SIZE_RANGE[1]} is (the VAE works on 8x8-pixel cells)"
            )
    if not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
        raise SlimsdError(f"steps {steps!r} is out of range; allowed: {STEPS_RANGE[0]} to {STEPS_RANGE[1]}")
    if not (
        isinstance(guidance, int | float)
        and math.isfinite(guidance)
        and GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]
    ):
        raise SlimsdError(
            f"guidance {guidance!r} is out of range; allowed: {GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g}"
        )
    if seed != -1 and not 0 <= seed <= MAX_SEED:
        raise SlimsdError(f"seed {seed!r} is out of range; allowed: -1 (random) or 0 to {MAX_SEED}")
    if not 1 <= num_images <= MAX_IMAGES:
        raise SlimsdError(f"num-images {num_images!r} is out of range; allowed: 1 to {MAX_IMAGES}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise SlimsdError(f"batch-size {batch_size!r} is out of range; allowed: 1 to {MAX_BATCH}")
    check_scheduler(scheduler)
    deepcache.check_interval(deep_cache)


def draw_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def prompt_warnings(pipe, prompts: Sequence[str], negative: str = "") -> list[str]:
    """One warning per prompt longer than the text encoder takes (CLIP: 77 tokens); diffusers cuts it."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        return []
    limit = tokenizer.model_max_length
    out = []
    for label, text in [*(("prompt", p) for p in dict.fromkeys(prompts)), ("negative prompt", negative)]:
        if not text:
            continue
        n = len(tokenizer(text, truncation=False).input_ids)
        if n > limit:
            kept = tokenizer.decode(
                tokenizer(text, truncation=True, max_length=limit).input_ids, skip_special_tokens=True
            )
            out.append(
                f"{label} is {n} tokens but the text encoder takes {limit}: it was truncated after "
                f"{kept[-40:]!r}"
            )
    return out


@dataclass
class GeneratedImage:
    image: Image.Image
    settings: Settings
    index: int  # position in the whole run (prompt-major)
    path: Path | None = None

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def time_s(self) -> float:
        return self.settings.time_s


def generate(
    pipe,
    prompts: str | Sequence[str],
    negative: str = "",
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int = -1,
    num_images: int = 1,
    batch_size: int = 1,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    seeds: Sequence[int] | None = None,
    deep_cache: int = 1,
) -> list[GeneratedImage]:
    """Generate ``num_images`` images for each prompt; image *i* of a prompt uses seed ``seed + i``
    (``seeds[k] + i`` for prompt *k* when ``seeds`` gives one seed per prompt). ``steps`` and ``guidance``
    default to the model's own (:func:`sampling_defaults`).

    Returns one :class:`GeneratedImage` per image, prompt-major, with its seed and its share of the wall time.
    ``progress(done_steps, total_steps)`` is called after every denoising step; ``on_warning`` receives
    warnings (default: :func:`warnings.warn`). ``deep_cache`` N > 1 runs the whole U-Net on every N-th step
    only, reusing its deep features in between (:mod:`slimsd.run.deepcache`; an approximation, faster).
    """
    from slimsd import __version__

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SlimsdError("no prompt given; pass a PROMPT or --prompts FILE with one prompt per line")
    info = model_info(pipe)
    defaults = sampling_defaults(info.get("sampling"))
    steps = defaults["steps"] if steps is None else steps
    guidance = defaults["guidance"] if guidance is None else guidance
    width = width or native_resolution(pipe)
    height = height or native_resolution(pipe)
    if seeds is not None:
        seeds = list(seeds)
        if len(seeds) != len(prompts):
            raise SlimsdError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise SlimsdError(f"seed {s!r} is out of range; allowed: 0 to {MAX_SEED}")
    validate(
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        seed=seed,
        num_images=num_images,
        batch_size=batch_size,
        scheduler=scheduler,
        deep_cache=deep_cache,
    )
    scheduler = scheduler or info["default_scheduler"]
    for w in prompt_warnings(pipe, prompts, negative):
        (on_warning or (lambda m: warnings.warn(m, stacklevel=3)))(w)
    if seeds is None:
        seeds = [draw_seed() if seed == -1 else seed] * len(prompts)
    seed_cap = MAX_SEED + 1
    jobs = [(p, (s + i) % seed_cap) for p, s in zip(prompts, seeds, strict=True) for i in range(num_images)]
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    total_steps = len(batches) * steps
    device = str(pipe.device)
    dtype = dtype_name(pipe.unet.dtype)
    # The pipeline's own scheduler comes back afterwards: a call's choice must not leak into the next one.
    original_scheduler = pipe.scheduler
    try:
        if scheduler is not None:
            set_scheduler(pipe, scheduler)
        results: list[GeneratedImage] = []
        for b, batch in enumerate(batches):
            generators = [torch.Generator("cpu").manual_seed(s) for _, s in batch]

            def on_step(_pipe, step, _t, kwargs, _b=b):
                if progress is not None:
                    progress(_b * steps + step + 1, total_steps)
                return kwargs

            kwargs = {}
            # Only when given: SDXL uses zero embeddings for "no negative prompt", not the embedding of "".
            if negative:
                kwargs["negative_prompt"] = [negative] * len(batch)
            start = time.perf_counter()
            with deepcache.deep_cache(pipe.unet, deep_cache):  # counts from 0 for each batch's steps
                images = pipe(
                    prompt=[p for p, _ in batch],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    generator=generators,
                    callback_on_step_end=on_step,
                    output_type="pil",
                    **kwargs,
                ).images
            elapsed = time.perf_counter() - start
            for (prompt, s), image in zip(batch, images, strict=True):
                settings = Settings(
                    prompt=prompt,
                    negative_prompt=negative,
                    steps=steps,
                    guidance=float(guidance),
                    width=width,
                    height=height,
                    seed=s,
                    scheduler=scheduler or "default",
                    model=info["model"],
                    model_source=info["source"],
                    batch_size=batch_size,
                    deep_cache=deep_cache,
                    dtype=dtype,
                    device=device,
                    slimsd_version=__version__,
                    time_s=round(elapsed / len(batch), 4),
                    loras=list(info.get("loras", [])),
                )
                results.append(GeneratedImage(image=image, settings=settings, index=len(results)))
    finally:
        pipe.scheduler = original_scheduler
    return results

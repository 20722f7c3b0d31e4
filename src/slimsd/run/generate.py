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

from slimsd.devices import dtype_name, weights_place
from slimsd.errors import SlimsdError
from slimsd.images import InputImage, as_input_image, fit
from slimsd.models.loading import is_sdxl, model_info, native_resolution, quiet_libraries
from slimsd.models.schedulers import check_scheduler, set_scheduler
from slimsd.run import deepcache
from slimsd.run.pnginfo import Settings

# Limits: wide enough for every real model, narrow enough to catch typos before minutes of work.
SIZE_RANGE = (64, 2048)
STEPS_RANGE = (1, 200)
GUIDANCE_RANGE = (0.0, 50.0)
MAX_SEED = 2**32 - 1  # A1111's seed range; also what a PNG's "Seed:" field round-trips
MAX_IMAGES = 100
MAX_BATCH = 64
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5  # for a model that does not say otherwise
DEFAULT_STRENGTH = 0.75  # A1111's img2img default
CONTROL_SCALE_RANGE = (0.0, 2.0)


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
    strength: float | None = None,
) -> None:
    """Refuse bad generation settings with one line naming the value and what is allowed (``strength``: only
    for img2img and inpainting)."""
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
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise SlimsdError(f"strength {strength!r} is out of range; allowed: above 0, up to 1")
        if int(steps * strength) < 1:  # diffusers runs int(steps * strength) of the steps
            raise SlimsdError(
                f"strength {strength:g} with {steps} steps runs no denoising step (steps x strength < 1); "
                "raise --strength or --steps"
            )


def input_size(init: InputImage) -> tuple[int, int]:
    """The output size an init image asks for when none is given: its own, rounded down to multiples of 8."""
    return init.image.width // 8 * 8, init.image.height // 8 * 8


def check_mask(init: InputImage | None, mask: InputImage | None) -> None:
    if mask is None:
        return
    if init is None:
        raise SlimsdError("a mask needs an init image: give --init-image FILE with --mask FILE")
    if mask.image.size != init.image.size:
        raise SlimsdError(
            f"mask {mask.name!r} is {mask.image.width}x{mask.image.height} but init image {init.name!r} is "
            f"{init.image.width}x{init.image.height}; they must be the same size"
        )


def check_control_scale(scale: float) -> None:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, int | float)
        or not (CONTROL_SCALE_RANGE[0] <= scale <= CONTROL_SCALE_RANGE[1])
    ):
        raise SlimsdError(
            f"control-scale {scale!r} is out of range; allowed: {CONTROL_SCALE_RANGE[0]:g} to "
            f"{CONTROL_SCALE_RANGE[1]:g}"
        )


def task_pipeline(pipe, init: InputImage | None, mask: InputImage | None, controlnet=None):
    """The diffusers pipeline for the task, built from PIPE's own components (``from_pipe``: no copy, the same
    U-Net, runtime and scheduler): text-to-image (PIPE itself), img2img, or inpainting (a mask given, or a
    9-channel inpainting U-Net: diffusers feeds it the mask; a 4-channel U-Net takes diffusers' masked img2img
    path, which puts the unmasked part of the noised init image back after every step); with ControlNet."""
    import diffusers

    xl = "XL" if is_sdxl(pipe) else ""
    if controlnet is not None:
        if init is not None:
            raise SlimsdError("--controlnet with --init-image is not supported yet; use one or the other")
        name, extra = f"StableDiffusion{xl}ControlNetPipeline", {"controlnet": controlnet}
        device, dtype = weights_place(pipe.unet)
        if weights_place(controlnet) != (device, dtype):
            with quiet_libraries():  # diffusers warns on every cast
                controlnet.to(device=device, dtype=dtype)
    elif init is None:
        return pipe
    else:
        inpaint = mask is not None or pipe.unet.config.in_channels == 9
        name, extra = f"StableDiffusion{xl}{'Inpaint' if inpaint else 'Img2Img'}Pipeline", {}
    with quiet_libraries():  # diffusers' chatter on building a pipeline: errors only
        task = getattr(diffusers, name).from_pipe(pipe, **extra)
    task.set_progress_bar_config(disable=True)
    return task


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
    init_image=None,
    strength: float | None = None,
    mask=None,
    controlnet=None,
    control_image=None,
    control_scale: float = 1.0,
) -> list[GeneratedImage]:
    """Generate ``num_images`` images for each prompt; image *i* of a prompt uses seed ``seed + i``
    (``seeds[k] + i`` for prompt *k* when ``seeds`` gives one seed per prompt). ``steps`` and ``guidance``
    default to the model's own (:func:`sampling_defaults`).

    Returns one :class:`GeneratedImage` per image, prompt-major, with its seed and its share of the wall time.
    ``progress(done_steps, total_steps)`` is called after every denoising step; ``on_warning`` receives
    warnings (default: :func:`warnings.warn`). ``deep_cache`` N > 1 runs the whole U-Net on every N-th step
    only, reusing its deep features in between (:mod:`slimsd.run.deepcache`; an approximation, faster).

    img2img: ``init_image`` (a file path, a PIL image or an :class:`~slimsd.images.InputImage`) noised by
    ``strength`` (0 < S <= 1, default 0.75: the last ``int(steps * S)`` steps run); with ``mask`` (white:
    repainted, black: kept; the init image's size), inpainting. The output size defaults to the init image's,
    rounded down to multiples of 8, and the init image and mask are stretched to the output size with Lanczos
    (:func:`slimsd.images.fit`). ``controlnet`` (a diffusers ``ControlNetModel``, e.g. from
    :func:`slimsd.run.controlnet.load_controlnet`) steers a text-to-image run with ``control_image`` at
    ``control_scale``.
    """
    from slimsd.version import __version__

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SlimsdError("no prompt given; pass a PROMPT or --prompts FILE with one prompt per line")
    info = model_info(pipe)
    defaults = sampling_defaults(info.get("sampling"))
    steps = defaults["steps"] if steps is None else steps
    guidance = defaults["guidance"] if guidance is None else guidance
    init = as_input_image(init_image, "init image")
    mask = as_input_image(mask, "mask")
    control = as_input_image(control_image, "control image")
    strength = check_task(init, mask, strength, controlnet, control, control_scale, deep_cache)
    if init is not None and info.get("vae"):
        raise SlimsdError(
            "a tiny decoder (--vae) only decodes; img2img and inpainting encode the init image with the model's "
            "own VAE: leave out --vae"
        )
    own_w, own_h = input_size(init) if init is not None else (native_resolution(pipe),) * 2
    width = width or own_w
    height = height or own_h
    seeds = None if seeds is None else check_seeds(seeds, prompts)
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
        strength=strength,
    )
    scheduler = scheduler or info["default_scheduler"]
    for w in prompt_warnings(pipe, prompts, negative):
        (on_warning or (lambda m: warnings.warn(m, stacklevel=3)))(w)
    if seeds is None:
        seeds = [draw_seed() if seed == -1 else seed] * len(prompts)
    seed_cap = MAX_SEED + 1
    jobs = [(p, (s + i) % seed_cap) for p, s in zip(prompts, seeds, strict=True) for i in range(num_images)]
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    run_steps = steps if init is None else min(int(steps * strength), steps)  # img2img skips the first ones
    total_steps = len(batches) * run_steps
    task_kwargs = task_inputs(pipe, init, mask, control, width, height)
    if init is not None:
        task_kwargs["strength"] = strength
    if controlnet is not None:
        task_kwargs["controlnet_conditioning_scale"] = float(control_scale)
    unet_device, unet_dtype = weights_place(pipe.unet)
    # what every image's PNG records beside its prompt, seed and time
    recorded = {
        "negative_prompt": negative,
        "steps": steps,
        "guidance": float(guidance),
        "width": width,
        "height": height,
        "scheduler": scheduler or "default",
        "model": info["model"],
        "model_source": info["source"],
        "batch_size": batch_size,
        "deep_cache": deep_cache,
        # an exported model's float kernels (its networks take and give float32)
        "dtype": getattr(pipe.unet, "kernels", None) or dtype_name(unet_dtype),
        "device": str(unet_device),
        "slimsd_version": __version__,
        "loras": list(info.get("loras", [])),
        "vae": info.get("vae"),
        "strength": None if strength is None else float(strength),
        "init_image": None if init is None else init.record(),
        "mask": None if mask is None else mask.record(),
        "controlnet": controlnet_record(controlnet, control, control_scale),
    }
    # The pipeline's own scheduler comes back afterwards: a call's choice must not leak into the next one.
    original_scheduler = pipe.scheduler
    try:
        if scheduler is not None:
            set_scheduler(pipe, scheduler)
        task = task_pipeline(pipe, init, mask, controlnet)  # after the scheduler: it shares pipe's
        results: list[GeneratedImage] = []
        for b, batch in enumerate(batches):
            generators = [torch.Generator("cpu").manual_seed(s) for _, s in batch]

            def on_step(_pipe, step, _t, kwargs, _b=b):
                if progress is not None:
                    progress(_b * run_steps + step + 1, total_steps)
                return kwargs

            kwargs = {
                k: [v] * len(batch) if isinstance(v, Image.Image) else v for k, v in task_kwargs.items()
            }
            # Only when given: SDXL uses zero embeddings for "no negative prompt", not the embedding of "".
            if negative:
                kwargs["negative_prompt"] = [negative] * len(batch)
            start = time.perf_counter()
            # deep_cache counts from 0 for each batch's steps; quiet_libraries: SDXL img2img casts its VAE to fp32 on
            # every call, and diffusers warns about every cast
            with deepcache.deep_cache(pipe.unet, deep_cache), quiet_libraries():
                images = task(
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
                time_s = round(elapsed / len(batch), 4)
                settings = Settings(prompt=prompt, seed=s, time_s=time_s, **recorded)
                results.append(GeneratedImage(image=image, settings=settings, index=len(results)))
    finally:
        pipe.scheduler = original_scheduler
    return results


def check_task(
    init, mask, strength, controlnet, control, control_scale: float, deep_cache: int
) -> float | None:
    """The img2img / inpainting / ControlNet inputs fit together; returns the strength (img2img's default when
    an init image comes without one)."""
    check_mask(init, mask)
    if init is None and strength is not None:
        raise SlimsdError("strength applies to img2img: give an init image with it")
    if init is not None and strength is None:
        strength = DEFAULT_STRENGTH
    if (controlnet is None) != (control is None):
        raise SlimsdError("a ControlNet needs a control image and a control image a ControlNet: give both")
    if controlnet is not None:
        check_control_scale(control_scale)
        if deep_cache > 1:  # DeepCache reuses deep features that the ControlNet's residuals would change
            raise SlimsdError("deep cache with a ControlNet is not supported; use --deep-cache 1")
    return strength


def check_seeds(seeds: Sequence[int], prompts: list[str]) -> list[int]:
    """One seed per prompt, each in range."""
    seeds = list(seeds)
    if len(seeds) != len(prompts):
        raise SlimsdError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise SlimsdError(f"seed {s!r} is out of range; allowed: 0 to {MAX_SEED}")
    return seeds


def controlnet_record(controlnet, control, control_scale: float) -> dict | None:
    """What a PNG records of the ControlNet that steered it (None: none did)."""
    if controlnet is None:
        return None
    return {
        "name": Path(getattr(controlnet, "_slimsd_path", "") or "controlnet").name,
        "path": getattr(controlnet, "_slimsd_path", None),
        "scale": float(control_scale),
        "image": control.record(),
    }


def task_inputs(pipe, init, mask, control, width: int, height: int) -> dict:
    """The images the task pipeline takes, stretched to the output size (:func:`slimsd.images.fit`)."""
    if control is not None:
        return {"image": fit(control.image, width, height)}
    if init is None:
        return {}
    out = {"image": fit(init.image, width, height)}
    if mask is not None:
        out["mask_image"] = fit(mask.image, width, height, "L")
    elif pipe.unet.config.in_channels == 9:  # an inpainting U-Net without a mask: repaint everything
        out["mask_image"] = Image.new("L", (width, height), 255)
    return out

"""`slimsd eval`: FID, IS and CLIP score of text-to-image models over a prompt set, with an HTML report.

The MS-COCO 30K protocol of BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of
Stable Diffusion") is a named preset (slimsd.measure.protocols): 30K val2014 captions, 512 px, PNDM 25 steps,
guidance 7.5, seed 1234, images scored after a PIL bicubic resize to 256 px.

The run in order: the prompts (slimsd.measure.prompts), each model's images, made where missing, resumable and
shardable (slimsd.measure.eval_images), the scores (slimsd.measure.scores) and the report
(slimsd.measure.report).
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from slimsd.atomic import atomic_write_text
from slimsd.errors import SlimsdError, unknown
from slimsd.measure.eval_images import (
    GenSettings,
    differing_setting,
    generate_missing,
    image_path,
    model_slug,
    own_settings,
    parse_shard,
    plan_images,
    wanted_settings,
)
from slimsd.measure.prompts import Prompt, read_prompts
from slimsd.measure.protocols import DEFAULT_CLIP, PROTOCOLS
from slimsd.measure.report import render_report
from slimsd.measure.scores import (
    load_clip,
    load_fid_extractor,
    reference_statistics,
    save_stats,
    score_images,
)


@dataclass
class EvalConfig:
    models: list[str]
    prompts: str
    out: str
    reference: str | None = None
    protocol: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    resolution: int | None = None
    score_resolution: int | None = None
    scheduler: str | None = None
    deep_cache: int | None = None  # None: 1 (off)
    num_prompts: int | None = None
    caption_column: str | None = None
    id_column: str | None = None
    batch_size: int = 1
    score_batch_size: int = 32
    shard: str | None = None
    score_only: bool = False
    fid_extractor: str = "inception-v3"
    inception_weights: str | None = None
    clip_model: str | None = DEFAULT_CLIP  # None: no CLIP score
    is_splits: int = 10
    save_stats: bool = False
    save_reference_stats: str | None = None
    grid: int = 8
    device: str | None = None
    dtype: str | None = None
    optimize: bool = True  # the fast runtime (slimsd.models.runtime)
    random_weights: bool = False
    allow_pickle: bool = False
    prediction_type: str | None = None  # None: each model's own
    loras: Sequence = ()  # LoRA files ("FILE[:SCALE]") merged into every model (slimsd.models.lora)
    vae: str | None = None  # a tiny decoder (folder or file) every model decodes with (models.decoders)


def resolve(config: EvalConfig) -> EvalConfig:
    """Fill unset settings from the protocol, then from the defaults; explicit options win."""
    if config.protocol is not None and config.protocol not in PROTOCOLS:
        raise unknown("protocol", config.protocol, PROTOCOLS)
    preset = PROTOCOLS.get(config.protocol, {})
    defaults = {"seed": 0}  # steps and guidance: each model's own (run_eval), unless a protocol fixes them
    for key in ("steps", "guidance", "seed", "resolution", "score_resolution", "scheduler", "num_prompts"):
        if getattr(config, key) is None:
            setattr(config, key, preset.get(key, defaults.get(key)))
    config.deep_cache = 1 if config.deep_cache is None else config.deep_cache  # no protocol sets it
    from slimsd.devices import dtype_name, resolve_device, resolve_dtype
    from slimsd.models.schedulers import check_scheduler

    check_scheduler(config.scheduler)
    config.device = resolve_device(config.device)
    config.dtype = dtype_name(resolve_dtype(config.dtype, config.device))
    if not config.models:
        raise SlimsdError("no models to evaluate: pass --models MODEL (repeat it to compare models)")
    return config


@dataclass
class _Plan:
    """What an evaluation works through, all checked before any model is loaded."""

    prompts: list[Prompt]
    shard: tuple[int, int]
    settings: GenSettings  # as asked; each model's own steps and guidance fill what is left open
    sources: list[str]  # each model's identity (slimsd.models.loading.model_source)
    slugs: list[str]  # each model's image folder under OUT/images
    loras: list  # the LoRA specs merged into every model
    vae: dict | None  # the tiny decoder every model decodes with: {"path", "sha256"} (None: each model's VAE)


def run_eval(config: EvalConfig, log: Callable[[str], None] = print) -> dict:
    """Generate what is missing, score every model, write ``scores.json`` and ``report.html`` into ``out``.

    With a shard (k/n with n > 1), only that shard's images are generated; scoring is left to a final run
    without ``--shard`` (or with ``--score-only``) once all shards are done.
    """
    config = resolve(config)
    plan = _plan(config)
    out = Path(config.out)
    extractor = clip = reference = None
    if (
        plan.shard[1] == 1
    ):  # the scorers and the reference first: a bad file should not wait for the generation
        extractor, clip, reference = _scorers(config, log)
    generation = _generate(config, plan, log)
    if plan.shard[1] > 1:
        return {"shard": f"{plan.shard[0]}/{plan.shard[1]}", "generation": generation}

    rows = []
    for model, source, slug in zip(config.models, plan.sources, plan.slugs, strict=True):
        folder = out / "images" / slug
        log(f"{model}: scoring {len(plan.prompts)} images")
        scores = score_images(
            [image_path(folder, p) for p in plan.prompts],
            [p.caption for p in plan.prompts],
            extractor,
            clip,
            reference,
            config.score_resolution,
            config.is_splits,
            config.score_batch_size,
            config.device,
        )
        mu, sigma = scores.pop("_stats")
        if config.save_stats:
            save_stats(out / "stats" / f"{slug}.npz", mu, sigma, model=model, extractor=config.fid_extractor)
        own = {k: generation[model][k] for k in ("steps", "guidance")}  # each model's, when left open
        row = {"model": model, "model_source": source, "images": f"images/{slug}", "vae": plan.vae}
        rows.append(row | own | scores)

    result = {
        "protocol": config.protocol,
        "settings": {
            **_settings(config, plan.prompts, reference, extractor),
            "loras": [
                {"path": str(Path(spec.path).resolve()), "scale": spec.scale, "sha256": sha}
                for spec, (sha, _) in zip(plan.loras, plan.settings.loras, strict=True)
            ],
            "vae": plan.vae,
        },
        "models": rows,
        "generation": generation,
        "environment": _environment(config),
    }
    atomic_write_text(out / "scores.json", json.dumps(result, indent=1))
    atomic_write_text(out / "report.html", render_report(result, out, plan.prompts[: config.grid]))
    return result


def _plan(config: EvalConfig) -> _Plan:
    """The prompts, settings, models and LoRAs of a resolved config. Everything that can be checked before hours
    of work is checked here, each with one line."""
    from slimsd.models.decoders import decoder_record
    from slimsd.models.loading import model_source
    from slimsd.models.lora import as_spec, file_sha256
    from slimsd.run import generate as gen

    shard = parse_shard(config.shard)
    prompts = read_prompts(config.prompts, config.caption_column, config.id_column, config.num_prompts)
    out = Path(config.out)
    settings = GenSettings(
        config.steps,
        config.guidance,
        config.seed,
        config.resolution,
        config.scheduler,
        config.batch_size,
        config.dtype,
        config.deep_cache,
    )
    gen.validate(
        steps=gen.DEFAULT_STEPS if settings.steps is None else settings.steps,
        guidance=gen.DEFAULT_GUIDANCE if settings.guidance is None else settings.guidance,
        width=settings.resolution or 64,
        height=settings.resolution or 64,
        seed=settings.seed,
        batch_size=settings.batch_size,
        scheduler=settings.scheduler,
        deep_cache=settings.deep_cache,
    )
    if settings.seed + prompts[-1].index > gen.MAX_SEED:
        raise SlimsdError(
            f"seed {settings.seed} + {prompts[-1].index} prompts passes {gen.MAX_SEED}; use a smaller --seed"
        )
    if len(prompts) < 2:
        raise SlimsdError(
            f"prompt file {config.prompts!r} gives 1 prompt; FID and IS need at least 2 images per model"
        )
    for folder in (out, Path(config.save_reference_stats or out).parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlimsdError(f"cannot create folder {str(folder)!r}: {e.strerror or e}") from None
    sources = [model_source(m, config.random_weights) for m in config.models]  # an unknown model: now
    loras = [as_spec(spec, config.allow_pickle) for spec in config.loras]  # a bad LoRA file: now
    settings.loras = [[file_sha256(spec.path), spec.scale] for spec in loras]
    vae = decoder_record(config.vae) if config.vae is not None else None  # a bad folder: now
    settings.vae = vae["sha256"] if vae else None
    # A model with LoRAs, or decoding with a tiny decoder, is another model: its images get their own folder.
    with_loras = "".join(f"+lora:{sha[:10]}x{scale:g}" for sha, scale in settings.loras)
    with_loras += f"+vae:{settings.vae[:10]}" if settings.vae else ""
    slugs = [model_slug(source + with_loras) for source in sources]
    if config.reference is not None and not Path(config.reference).exists():
        raise SlimsdError(f"reference {config.reference!r} does not exist (a folder of images or an .npz)")
    return _Plan(prompts, shard, settings, sources, slugs, loras, vae)


def _scorers(config: EvalConfig, log: Callable[[str], None]) -> tuple:
    """The FID extractor, the CLIP model (None without one) and the reference's statistics (None without one),
    the reference's statistics written out when asked."""
    extractor = load_fid_extractor(config.fid_extractor, config.inception_weights, config.allow_pickle)
    clip = load_clip(config.clip_model, config.device) if config.clip_model else None
    reference = None
    if config.reference is not None:
        log(f"reference statistics from {config.reference}")
        reference = reference_statistics(
            config.reference, extractor, config.score_resolution, config.score_batch_size, config.device
        )
        if config.save_reference_stats:
            save_stats(
                config.save_reference_stats,
                reference["mu"],
                reference["sigma"],
                extractor=config.fid_extractor,
                score_resolution=config.score_resolution,
            )
    return extractor, clip, reference


def _generate(config: EvalConfig, plan: _Plan, log: Callable[[str], None]) -> dict:
    """Make each model's missing images of this shard (a model with none missing is not loaded); returns the
    counts and the steps and guidance used, by model."""
    generation = {}
    for model, source, slug in zip(config.models, plan.sources, plan.slugs, strict=True):
        folder = Path(config.out) / "images" / slug
        settings = own_settings(plan.settings, model)
        todo, counts = plan_images(plan.prompts, folder, settings, source, plan.shard)
        generation[model] = {**counts, "steps": settings.steps, "guidance": settings.guidance}
        if todo and config.score_only:
            first = differing_setting(image_path(folder, todo[0]), wanted_settings(todo[0], settings, source))
            raise SlimsdError(
                f"{len(todo)} images of {model!r} in {str(folder)!r} are missing or were made with other "
                f"settings (first: {todo[0].id}.png, {first}); run without --score-only, or finish every shard"
            )
        if not todo:
            continue
        if counts["regenerated"]:
            log(
                f"{model}: {counts['regenerated']} images in {folder} were made with other settings "
                f"({', '.join(f'{k}: {n}' for k, n in counts['differing'].items())}); making them again"
            )
        pipe = _load(model, config, log)
        log(f"{model}: generating {len(todo)} images into {folder}")
        generate_missing(pipe, todo, folder, settings)
        del pipe
    return generation


def _load(model: str, config: EvalConfig, log: Callable[[str], None]):
    from slimsd.models.loading import load

    return load(
        model,
        device=config.device,
        dtype=config.dtype,
        scheduler=config.scheduler,
        optimize=config.optimize,
        allow_pickle=config.allow_pickle,
        random_weights=config.random_weights,
        loras=config.loras,
        on_warning=lambda message: log(f"{model}: warning: {message}"),
        prediction_type=config.prediction_type,
        vae=config.vae,
    )


def _settings(config: EvalConfig, prompts, reference, extractor) -> dict:
    return {
        "prompts": str(config.prompts),
        "num_prompts": len(prompts),
        "steps": config.steps,
        "guidance": config.guidance,
        "seed": config.seed,
        "seeds": "seed + prompt index",
        "resolution": config.resolution,
        "score_resolution": config.score_resolution,
        "scheduler": config.scheduler,
        "deep_cache": config.deep_cache,
        "fid_extractor": config.fid_extractor,
        "fid_input_size": extractor.input_size,
        "fid_resize": "clean (PIL bicubic per channel, float)",
        "inception_weights": config.inception_weights,
        "clip_model": config.clip_model,
        "is_splits": config.is_splits,
        "reference": None if reference is None else reference["source"],
        "reference_images": None if reference is None else reference["num_images"],
    }


def _environment(config: EvalConfig) -> dict:
    import diffusers
    import transformers

    return {
        "device": config.device,
        "dtype": config.dtype,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }

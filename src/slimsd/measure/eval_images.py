"""The images an evaluation scores: one folder per model, named from its identity, so two models never share
images. Generation is resumable (an existing image is reused only when its PNG info says it was made by this
model with this run's settings, else it is made again; each is written atomically) and shardable: image *i*
always uses seed S+i, whichever process makes it, so ``--shard k/n`` runs fill one folder with exactly the images
a single run would make."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slimsd.atomic import atomic_write_bytes
from slimsd.errors import SlimsdError
from slimsd.measure.prompts import Prompt
from slimsd.models.loading import native_resolution
from slimsd.run.outputs import safe_stem


def parse_shard(text: str | None) -> tuple[int, int]:
    """``k/n`` -> (k, n) with 0 <= k < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise SlimsdError(f"bad --shard {text!r}: expected k/n with 0 <= k < n, e.g. 0/4")
    return int(m[1]), int(m[2])


def model_slug(source: str) -> str:
    """The folder of a model's images, named from its identity (:func:`slimsd.models.loading.model_source`: a
    local folder's resolved path, a hub id, a micro or preset name): a readable tail and 8 hex digits of the
    identity's sha256, so two folders both called ``final`` never share images."""
    tail = "_".join(Path(source).parts[-2:]) if Path(source).is_absolute() else source
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:8]
    return f"{safe_stem(tail, 60, keep='._-', sep='_', lower=False, fallback='model')}-{digest}"


@dataclass
class GenSettings:
    steps: int | None = 25  # None: the model's own (a step-distilled student's, else 25)
    guidance: float | None = 7.5  # None: the model's own (else 7.5)
    seed: int = 0
    resolution: int | None = None  # None: the model's own
    scheduler: str | None = None  # None: the model's own (names: slimsd.run.generate.SCHEDULERS)
    batch_size: int = 1
    dtype: str = "fp32"  # the pipeline's, as slimsd.devices names it
    deep_cache: int = 1  # slimsd.run.deepcache's interval; 1: off
    loras: list = field(default_factory=list)  # [[sha256, scale], ...] of the LoRAs merged into the model
    vae: str | None = (
        None  # the sha256 of the tiny decoder's weights the model decodes with (None: its own VAE)
    )


def own_settings(settings: GenSettings, model: str) -> GenSettings:
    """``settings`` with the steps and guidance left open filled from MODEL's own (a step-distilled student
    samples in 4 steps, a teacher in 25)."""
    from dataclasses import replace

    from slimsd.models.loading import model_sampling
    from slimsd.run.generate import sampling_defaults

    own = sampling_defaults(model_sampling(model))
    return replace(
        settings,
        steps=own["steps"] if settings.steps is None else settings.steps,
        guidance=own["guidance"] if settings.guidance is None else settings.guidance,
    )


def image_path(folder: Path, prompt: Prompt) -> Path:
    return folder / f"{prompt.id}.png"


def wanted_settings(prompt: Prompt, settings: GenSettings, source: str) -> dict:
    """What the PNG info of prompt's image must hold for the image to be reused: the model, the prompt and every
    setting that decides the pixels. A size or scheduler left to the model is stored as asked (``eval_*``
    None), since the same model always gives the same one; an explicit one must also be what the image has."""
    want = {
        "model_source": source,
        "prompt": prompt.caption,
        "negative_prompt": "",
        "steps": settings.steps,
        "guidance": float(settings.guidance),
        "seed": settings.seed + prompt.index,
        "dtype": settings.dtype,
        "deep_cache": settings.deep_cache,
        "eval_resolution": settings.resolution,
        "eval_scheduler": settings.scheduler,
    }
    if settings.resolution:
        want["width"] = want["height"] = settings.resolution
    if settings.scheduler:
        want["scheduler"] = settings.scheduler
    if settings.loras:
        want["eval_loras"] = settings.loras
    if settings.vae:
        want["eval_vae"] = settings.vae
    return want


def differing_setting(path: Path, want: dict) -> str | None:
    """None when the image at PATH was made as WANT says; else the first setting that differs ('missing' when
    there is no image, 'unreadable' when its PNG info cannot be read)."""
    from slimsd.run.pnginfo import settings_from_png

    if not path.is_file():
        return "missing"
    try:
        stored = settings_from_png(path)
    except SlimsdError:
        return "unreadable"
    extra = stored.get("extra")
    # an image from before deep-cache existed was made without it
    stored = {"deep_cache": 1, **stored, **(extra if isinstance(extra, dict) else {})}
    return next((key for key, value in want.items() if key not in stored or stored[key] != value), None)


def plan_images(
    prompts: Sequence[Prompt],
    folder: Path,
    settings: GenSettings,
    source: str,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[Prompt], dict]:
    """The prompts of this shard whose image must be made (missing, or made with other settings), and the counts:
    ``reused``, ``regenerated`` (an image was there, made otherwise), ``generated`` (both kinds of new images),
    ``differing`` (regenerated images by the first setting that differed) and ``in_shard``."""
    k, n = shard
    mine = [p for p in prompts if p.index % n == k]
    todo, differing = [], {}
    for p in mine:
        key = differing_setting(image_path(folder, p), wanted_settings(p, settings, source))
        if key is not None:
            todo.append(p)
        if key not in (None, "missing"):
            differing[key] = differing.get(key, 0) + 1
    counts = {
        "generated": len(todo),
        "reused": len(mine) - len(todo),
        "regenerated": sum(differing.values()),
        "differing": differing,
        "in_shard": len(mine),
    }
    return todo, counts


def generate_missing(
    pipe,
    prompts: Sequence[Prompt],
    folder: str | Path,
    settings: GenSettings,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Generate the image of each of ``prompts`` into ``folder`` (the ones :func:`plan_images` names).

    Prompt i uses seed S+i (:func:`slimsd.run.generate.generate`'s per-prompt seeds), so an image does not
    depend on the sharding or on what was generated before (nor, beyond float rounding, on the batch size).
    Each batch's PNGs are written atomically as soon as they are made, with their PNG info and the size and
    scheduler asked for, so a killed run leaves only whole images, each checked before it is reused.
    """
    from slimsd.run import generate as gen
    from slimsd.run.pnginfo import png_bytes

    folder = Path(folder)
    size = settings.resolution or native_resolution(pipe)  # generate() validates every setting
    asked = {"eval_resolution": settings.resolution, "eval_scheduler": settings.scheduler}
    if settings.loras:
        asked["eval_loras"] = settings.loras
    if settings.vae:
        asked["eval_vae"] = settings.vae
    done = 0
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start : start + settings.batch_size]
        results = gen.generate(
            pipe,
            [p.caption for p in batch],
            steps=settings.steps,
            guidance=settings.guidance,
            width=size,
            height=size,
            batch_size=settings.batch_size,
            scheduler=settings.scheduler,
            seeds=[settings.seed + p.index for p in batch],
            deep_cache=settings.deep_cache,
            on_warning=lambda _msg: None,  # long COCO captions are cut at 77 tokens, as in the protocol
        )
        for p, r in zip(batch, results, strict=True):
            r.settings.extra = dict(asked)
            atomic_write_bytes(image_path(folder, p), png_bytes(r.image, r.settings))
        done += len(batch)
        if progress:
            progress(done, len(prompts))
    return done

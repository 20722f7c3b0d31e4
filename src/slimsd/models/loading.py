"""MODEL -> diffusers pipeline: a preset, a micro model, a local diffusers folder or a hub id.

Weights load from safetensors only. A folder or hub repo that holds only pickle files (``.bin``, ``.ckpt``,
``.pt``, ``.pth``) is refused unless the caller passes ``allow_pickle=True``: unpickling runs code.
``trust_remote_code`` is never passed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.models.micro import MICRO_NAMES, build_micro, load_tokenizer
from slimsd.models.presets import PRESETS, Preset, get_preset

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
TOY_NAMES = ("toy-sd",)  # the trained toy teacher (committed weights), see slimsd.toy.teacher


def describe_model(model: str) -> str:
    """What kind of MODEL string this is: 'micro', 'toy', 'preset', 'local' or 'hub'."""
    if model in MICRO_NAMES:
        return "micro"
    if model in TOY_NAMES:
        return "toy"
    if model in PRESETS:
        return "preset"
    if Path(model).exists():
        return "local"
    if _looks_like_hub_id(model):
        return "hub"
    raise SlimsdError(
        f"unknown model {model!r}: not a preset (see `slimsd presets`), not an existing folder, not a hub id (org/name)"
    )


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return (
        len(parts) == 2
        and all(p and not p.startswith(".") for p in parts)
        and not model.startswith(("/", "."))
    )


def check_local_folder(folder: Path, allow_pickle: bool) -> None:
    """Refuse a folder that is not a diffusers pipeline, or whose weights are pickle-only."""
    if not folder.is_dir():
        raise SlimsdError(
            f"model path {str(folder)!r} is not a folder; a diffusers pipeline folder is expected"
        )
    if not (folder / "model_index.json").is_file():
        raise SlimsdError(
            f"model folder {str(folder)!r} has no model_index.json: not a diffusers pipeline folder"
        )
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in sub.iterdir() if f.is_file()]
        has_safe = any(f.suffix == ".safetensors" for f in files)
        pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickles and not has_safe and not allow_pickle:
            raise SlimsdError(
                f"{sub.name}/{pickles[0]} in {str(folder)!r} is a pickle file and there is no safetensors "
                "copy; pickle can run code when loaded: pass --allow-pickle to load it anyway"
            )


def build_random_pipeline(preset: Preset, seed: int = 0):
    """A full-size pipeline of ``preset`` with random weights (offline; for benchmarks and smoke tests).

    The tokenizer is the small offline fixture: token ids stay inside the text encoder's vocabulary.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from slimsd.models.presets import student_teacher_unet

    torch.manual_seed(seed)
    unet_cfg = student_teacher_unet(preset)
    teacher = get_preset(preset.teacher) if preset.kind == "student" else preset
    unet = UNet2DConditionModel.from_config(unet_cfg)
    if preset.kind == "student":
        from slimsd.models.architecture import build_student

        unet, _, _ = build_student(unet, preset.recipe)
    vae = AutoencoderKL.from_config(teacher.vae)
    encoders = []
    for cfg in teacher.text_encoders:
        cfg = dict(cfg)
        cls = CLIPTextModelWithProjection if cfg.pop("with_projection", False) else CLIPTextModel
        encoders.append(cls(CLIPTextConfig(**cfg)))
    sched_cfg = dict(teacher.scheduler)
    sched_cls = {
        "PNDMScheduler": PNDMScheduler,
        "DDIMScheduler": DDIMScheduler,
        "EulerDiscreteScheduler": EulerDiscreteScheduler,
    }[sched_cfg.pop("_class_name")]
    scheduler = sched_cls.from_config(sched_cfg)
    if teacher.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=load_tokenizer(),
            tokenizer_2=load_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=load_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(
    model: str,
    *,
    random_weights: bool = False,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
):
    """A diffusers pipeline for MODEL (see the module docstring)."""
    kind = describe_model(model)
    if kind == "micro":
        pipe = build_micro(model)
    elif kind == "toy":
        from slimsd.toy.teacher import load_toy_teacher

        pipe = load_toy_teacher()
    elif kind == "preset" and random_weights:
        pipe = build_random_pipeline(get_preset(model))
    elif kind == "local":
        check_local_folder(Path(model), allow_pickle)
        pipe = _from_pretrained(model, allow_pickle, torch_dtype, variant)
    else:
        if random_weights:
            raise SlimsdError(f"--random-weights needs a preset name; {model!r} is a hub id")
        hub_id = get_preset(model).hub_id if kind == "preset" else model
        pipe = _from_pretrained(hub_id, allow_pickle, torch_dtype, variant)
    if torch_dtype is not None and kind in ("micro", "toy", "preset"):
        pipe = pipe.to(dtype=torch_dtype)
    _drop_safety_checker(pipe)
    return pipe


def _from_pretrained(source: str, allow_pickle: bool, torch_dtype, variant):
    from diffusers import DiffusionPipeline

    kwargs = {"use_safetensors": None if allow_pickle else True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if variant:
        kwargs["variant"] = variant
    if not Path(source).exists():
        kwargs["safety_checker"] = None  # never download a separate safety-checker model
    try:
        return DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as e:
        raise SlimsdError(f"could not load {source!r}: {hub_error_reason(e)}") from None
    except ValueError as e:  # diffusers: safetensors requested but only pickle weights in the repo
        msg = str(e).strip().splitlines()[0]
        if "safetensors" in msg.lower() and not allow_pickle:
            raise SlimsdError(
                f"{source!r} has no safetensors weights; pass --allow-pickle to load pickle files "
                "(pickle can run code)"
            ) from None
        raise SlimsdError(f"could not load {source!r}: {msg}") from None


def hub_error_reason(e: Exception) -> str:
    """A short reason for a failed hub/local load (the libraries' messages run to several sentences)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first if len(first) < 300 else first[:297] + "..."


def _drop_safety_checker(pipe) -> None:
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None


def read_slimsd_info(folder: str | Path) -> dict | None:
    """The provenance compress writes beside a student (teacher, recipe, weight map), if there is one."""
    path = Path(folder) / "slimsd.json"
    return json.loads(path.read_text()) if path.is_file() else None

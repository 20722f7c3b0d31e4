"""MODEL -> a ready diffusers pipeline: the one loader (:func:`load`, also ``slimsd.load``).

MODEL is a preset name (``slimsd presets``), an offline model (``micro-sd``, ``micro-sdxl``, ``toy-sd``), a
local diffusers folder, a single-file checkpoint in the original layout (``.safetensors``, or ``.ckpt`` with
``allow_pickle``; :mod:`slimsd.models.single_file`) or a hub id. Every command that runs a model (generate, ui, eval, demo, bench, cache,
distill, compress) gets its pipeline here, so the same rules hold everywhere:

- weights load from safetensors only: a folder or hub repo that holds only pickle files (``.bin``, ``.ckpt``,
  ``.pt``, ``.pth``) is refused unless the caller passes ``allow_pickle=True`` (unpickling runs code);
  ``trust_remote_code`` is never passed and no separate safety-checker model is ever downloaded;
- the device and dtype follow :mod:`slimsd.devices`;
- ``optimize=True`` (the default) applies the fast runtime (:mod:`slimsd.run.runtime`); ``optimize=False``
  gives the plain diffusers pipeline, for training and weight surgery, which need the modules as they are;
- library progress bars are off: commands show their own.

The pipeline remembers where it came from (``pipe._slimsd``, read by :func:`model_info`): the model name and
source, the scheduler it was loaded with, and the runtime that was applied.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from slimsd.devices import quiet_deepspeed, resolve_device, resolve_dtype
from slimsd.errors import SlimsdError
from slimsd.models.presets import PRESETS, Preset, get_preset

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def describe_model(model: str) -> str:
    """What kind of MODEL string this is: 'micro' (offline: micro-sd, micro-sdxl, toy-sd), 'preset',
    'local' (a diffusers folder), 'single-file' or 'hub'."""
    from slimsd.models.single_file import SUFFIXES

    if model in PRESETS:
        return "micro" if PRESETS[model].kind == "micro" else "preset"
    if Path(model).suffix.lower() in SUFFIXES:
        if not Path(model).is_file():
            raise SlimsdError(f"model file {model!r} does not exist (a single-file checkpoint was expected)")
        return "single-file"
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


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype``: a random SDXL U-Net never exists in fp32 (10 GB) first."""
    old = torch.get_default_dtype()
    # fp16 random init works too, but the CPU kernels for it are slow: build in fp32 and cast afterwards.
    torch.set_default_dtype(torch.float32 if dtype == torch.float16 else dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_pipeline(preset: Preset, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A full-size pipeline of ``preset`` with random weights (offline; for benchmarks and smoke tests).

    The tokenizer is the small offline fixture: token ids stay inside the text encoder's vocabulary.
    """
    import diffusers
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from slimsd.models.micro import load_tokenizer
    from slimsd.models.presets import student_teacher_unet

    with torch.random.fork_rng(devices=[]), default_dtype(dtype):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(student_teacher_unet(preset))
        teacher = get_preset(preset.teacher) if preset.kind == "student" else preset
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
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
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


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """The libraries' loading progress bars off ("Loading pipeline components...", checkpoint shards, and
    downloads), for this load only: a caller's own settings come back afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    was = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
        not hub_utils.are_progress_bars_disabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()
        if was[2]:
            hub_utils.enable_progress_bars()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers and transformers warn as they build pipelines and load adapters: errors only, and no
    progress bars, for this call."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with quiet_loading():
            yield
    finally:
        diffusers_logging.set_verbosity(was[0])
        transformers_logging.set_verbosity(was[1])


def _diffusers_pipeline(
    model: str,
    kind: str,
    torch_dtype,
    allow_pickle: bool,
    random_weights: bool,
    seed: int,
    prediction_type: str | None = None,
):
    """The plain diffusers pipeline of MODEL, in ``torch_dtype``, on the CPU."""
    if random_weights and kind not in ("preset", "micro"):
        raise SlimsdError(f"--random-weights needs a preset name; {model!r} is a {kind} model")
    if kind == "micro":
        if model == "toy-sd":
            from slimsd.toy.teacher import load_toy_teacher

            return load_toy_teacher(torch_dtype)
        from slimsd.models.micro import build_micro

        return build_micro(model)
    if kind == "preset" and random_weights:
        return build_random_pipeline(get_preset(model), seed, torch_dtype)
    if kind == "single-file":
        from slimsd.models.single_file import load_single_file

        return load_single_file(model, allow_pickle, prediction_type)
    if kind == "local":
        check_local_folder(Path(model), allow_pickle)
        return _from_pretrained(model, allow_pickle, torch_dtype, local=True)
    hub_id = get_preset(model).hub_id if kind == "preset" else model
    return _from_pretrained(hub_id, allow_pickle, torch_dtype, local=False)


def load(
    model: str,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = None,
    optimize: bool = True,
    compile: bool = False,
    allow_pickle: bool = False,
    random_weights: bool = False,
    seed: int = 0,
    loras: Sequence = (),
    on_warning: Callable[[str], None] | None = None,
    prediction_type: str | None = None,
):
    """A ready diffusers pipeline for MODEL on ``device`` in ``dtype`` (see the module docstring).

    ``optimize`` applies the fast runtime (channels_last, fused QKV, SDPA; ``compile`` adds torch.compile);
    ``scheduler`` picks a named scheduler (:mod:`slimsd.run.schedulers`); ``random_weights`` builds a preset
    with random weights seeded by ``seed`` (offline). An SDXL VAE in fp16 overflows to NaN (black images), so
    in fp16 it is marked ``force_upcast``: diffusers decodes in fp32.

    ``loras``: LoRA adapters (``"FILE[:SCALE]"`` or ``(path, scale)``), merged into the weights before the
    runtime (:mod:`slimsd.models.lora`); ``on_warning`` receives the line about layers a LoRA skipped.

    ``prediction_type`` (``epsilon`` | ``v_prediction``) overrides what the model says it predicts: a single
    file written by another tool may not say (an SD 2.x one must be told).
    """
    from slimsd.models import lora, runtimes
    from slimsd.run import runtime
    from slimsd.run.schedulers import check_scheduler, scheduler_name, set_scheduler

    quiet_deepspeed()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_scheduler(scheduler)
    if prediction_type is not None:
        from slimsd.models.single_file import check_prediction_type

        check_prediction_type(prediction_type)
    kind = describe_model(model)
    sampling = model_sampling(model)
    loras = [lora.as_spec(s, allow_pickle) for s in loras]  # a bad file fails before minutes of loading
    if sampling and sampling.get("lora"):
        # An LCM-LoRA student's adapters come with it, merged first and once (--from-png lists them again).
        own = lora.as_spec((str(Path(model) / sampling["lora"]), 1.0), allow_pickle)
        loras = [own, *(s for s in loras if Path(s.path).resolve() != Path(own.path).resolve())]
    exported = kind == "local" and runtimes.is_exported(model)  # ONNX Runtime / OpenVINO sessions
    if exported:
        runtimes.check_load_options(loras, compile, device)
    with quiet_loading():
        pipe = (
            runtimes.load_exported(model)
            if exported
            else _diffusers_pipeline(
                model, kind, torch_dtype, allow_pickle, random_weights, seed, prediction_type
            )
        )
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction_type
        )
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    weight_map = lora.student_weight_map(model, kind, pipe.unet) if loras else None
    applied_loras = lora.apply_loras(pipe, loras, allow_pickle, weight_map, on_warning)
    if exported:
        pass
    elif optimize:
        runtime.optimize_pipeline(
            pipe, runtime.RuntimeConfig(device=device, dtype=torch_dtype, compile=compile)
        )
    else:
        runtime.place(pipe, device, torch_dtype)
    if is_sdxl(pipe) and torch_dtype == torch.float16 and getattr(pipe, "vae", None) is not None:
        pipe.vae.register_to_config(force_upcast=True)
    pipe.set_progress_bar_config(disable=True)
    pipe._slimsd = {
        "model": model,
        "kind": kind,
        "source": model_source(model, random_weights),
        "random_weights": random_weights,
        "base_scheduler": dict(pipe.scheduler.config),
        "default_scheduler": scheduler_name(pipe.scheduler),
        "runtime": runtimes.runtime_record(model)
        if exported
        else runtime.applied(pipe.unet, optimized=optimize),
        # A step-distilled student says how it samples (scheduler, steps, guidance): generate's defaults.
        "sampling": sampling,
        "loras": applied_loras,
    }
    if scheduler is not None:  # the pipeline's own from now on: generate() uses it when given none
        set_scheduler(pipe, scheduler)
        pipe._slimsd["default_scheduler"] = scheduler
    return pipe


def model_source(model: str, random_weights: bool = False) -> str:
    """Where MODEL's weights come from, as every PNG records it (``model_source``): the resolved path of a local
    folder, the hub id of a preset or hub model, the name of a micro model or of a preset with random weights."""
    kind = describe_model(model)
    if kind in ("local", "single-file"):
        return str(Path(model).resolve())
    if kind == "preset" and not random_weights:
        return get_preset(model).hub_id or model
    return model


def model_info(pipe) -> dict:
    """What :func:`load` recorded about PIPE (a pipeline made elsewhere gets placeholders)."""
    info = getattr(pipe, "_slimsd", None)
    if info is None:
        from slimsd.run.runtime import applied
        from slimsd.run.schedulers import scheduler_name

        info = {
            "model": type(pipe).__name__,
            "kind": "pipeline",
            "source": None,
            "base_scheduler": dict(pipe.scheduler.config),
            "default_scheduler": scheduler_name(pipe.scheduler),
            "runtime": applied(pipe.unet, optimized=False),
            "loras": [],
        }
        pipe._slimsd = info
    return info


def _from_pretrained(source: str, allow_pickle: bool, torch_dtype, local: bool):
    from diffusers import DiffusionPipeline

    kwargs = {"use_safetensors": None if allow_pickle else True}
    if (
        torch_dtype != torch.float32
    ):  # fp32 is what diffusers loads; asking for it only makes it cast and warn
        kwargs["torch_dtype"] = torch_dtype
    if not local:
        kwargs["safety_checker"] = None  # never download a separate safety-checker model
    try:
        return DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as e:
        if local:
            raise SlimsdError(f"model folder {source!r} is broken: {_first_line(e)}") from None
        raise SlimsdError(f"could not load {source!r}: {hub_error_reason(e)}") from None
    except ValueError as e:  # diffusers: safetensors requested but only pickle weights in the repo
        msg = _first_line(e)
        if "safetensors" in msg.lower() and not allow_pickle:
            raise SlimsdError(
                f"{source!r} has no safetensors weights; pass --allow-pickle to load pickle files "
                "(pickle can run code)"
            ) from None
        if local:
            raise SlimsdError(f"model folder {source!r} is broken: {msg}") from None
        raise SlimsdError(f"could not load {source!r}: {msg}") from None


def _first_line(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first if len(first) < 300 else first[:297] + "..."


def hub_error_reason(e: Exception) -> str:
    """A short reason for a failed hub load (the libraries' messages run to several sentences)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    return _first_line(e)


def is_sdxl(pipe_or_unet) -> bool:
    """An SDXL-class model: its U-Net takes SDXL's added text and time conditions."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return unet.config.get("addition_embed_type") == "text_time"


def native_resolution_of(unet_config: dict, vae_config: dict) -> int:
    """The image size in pixels a model was made for: U-Net sample size x the VAE's down-sampling."""
    return int(unet_config.get("sample_size", 64)) * 2 ** (
        len(vae_config.get("block_out_channels", [0] * 4)) - 1
    )


def native_resolution(pipe) -> int:
    return native_resolution_of(dict(pipe.unet.config), dict(pipe.vae.config))


def model_sampling(model: str) -> dict | None:
    """How MODEL samples unless told otherwise, read without loading it: a step-distilled student's own (its
    slimsd.json ``sampling``: scheduler, steps, guidance); the toy teacher's guidance (TOY_SAMPLING: its PLMS
    scheduler follows 0.93 of its captions at guidance 2 and 0.13 at SD's 7.5), also for a student of it that says
    nothing itself; None for other models (25 steps, 7.5)."""
    if model == "toy-sd":
        from slimsd.toy.teacher import TOY_SAMPLING

        return {"guidance": TOY_SAMPLING["guidance_scale"]}
    if describe_model(model) != "local":
        return None
    info = read_slimsd_info(model) or {}
    if "sampling" in info:
        return info["sampling"]
    return model_sampling("toy-sd") if info.get("teacher") == "toy-sd" else None


def read_slimsd_info(folder: str | Path) -> dict | None:
    """The provenance compress writes beside a student (teacher, recipe, weight map), if there is one; a
    single file exported by slimsd carries it in its header."""
    if Path(folder).is_file():
        from slimsd.models.single_file import provenance

        return provenance(folder)
    path = Path(folder) / "slimsd.json"
    return json.loads(path.read_text()) if path.is_file() else None

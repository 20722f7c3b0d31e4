"""MODEL -> a ready diffusers pipeline: the one loader (:func:`load`, also ``slimsd.load``).

MODEL is a preset name (``slimsd presets``), an offline model (``micro-sd``, ``micro-sdxl``, ``toy-sd``), a
local diffusers folder, a single-file checkpoint in the original layout (``.safetensors``, or ``.ckpt`` with
``allow_pickle``; :mod:`slimsd.models.single_file`) or a hub id. Every command that runs a model (generate, ui, eval, demo, bench, cache,
distill, compress) gets its pipeline here, so the same rules hold everywhere:

- weights load from safetensors only: a folder or hub repo that holds only pickle files (``.bin``, ``.ckpt``,
  ``.pt``, ``.pth``) is refused unless the caller passes ``allow_pickle=True`` (unpickling runs code);
  ``trust_remote_code`` is never passed and no separate safety-checker model is ever downloaded;
- the device and dtype follow :mod:`slimsd.devices`;
- ``optimize=True`` (the default) applies the fast runtime (:mod:`slimsd.models.runtime`); ``optimize=False``
  gives the plain diffusers pipeline, for training and weight surgery, which need the modules as they are;
- library progress bars are off: commands show their own.

The pipeline remembers where it came from (``pipe._slimsd``, read by :func:`model_info`): the model name and
source, the scheduler it was loaded with, and the runtime that was applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from slimsd.devices import quiet_deepspeed, resolve_device, resolve_dtype
from slimsd.errors import SlimsdError
from slimsd.models.presets import Preset, get_preset

# The loader's public names that live in sources.py (read without loading): callers ask the loader for them.
from slimsd.models.sources import (  # noqa: F401
    ModelRef,
    _first_line,
    check_local_folder,
    describe_model,
    hub_error_reason,
    is_sdxl,
    model_sampling,
    native_resolution,
    quiet_libraries,
    quiet_loading,
    read_slimsd_info,
    resolve_model,
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


def _diffusers_pipeline(
    ref: ModelRef,
    torch_dtype,
    allow_pickle: bool,
    random_weights: bool,
    seed: int,
    prediction_type: str | None = None,
):
    """The plain diffusers pipeline of the model REF names, in ``torch_dtype``, on the CPU."""
    model, kind = ref.name, ref.kind
    if random_weights and kind not in ("preset", "micro"):
        raise SlimsdError(f"--random-weights needs a preset name; {model!r} is a {kind} model")
    if kind == "micro":
        if model == "toy-sd":
            from slimsd.toy.teacher import load_toy_teacher

            return load_toy_teacher(torch_dtype)
        from slimsd.models.micro import build_micro

        return build_micro(model)
    if kind == "preset" and random_weights:
        return build_random_pipeline(ref.preset, seed, torch_dtype)
    if kind == "single-file":
        from slimsd.models.single_file import load_single_file

        return load_single_file(model, allow_pickle, prediction_type)
    if kind == "local":
        check_local_folder(Path(model), allow_pickle)
        return _from_pretrained(model, allow_pickle, torch_dtype, local=True)
    return _from_pretrained(ref.location, allow_pickle, torch_dtype, local=False)  # a hub id


@quiet_libraries()  # the API as quiet as the commands: a notebook sees none of the libraries' chatter
def load(
    model: str | ModelRef,
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
    vae: str | None = None,
):
    """A ready diffusers pipeline for MODEL on ``device`` in ``dtype`` (see the module docstring).

    ``optimize`` applies the fast runtime (channels_last, fused QKV, SDPA; ``compile`` adds torch.compile);
    ``scheduler`` picks a named scheduler (:mod:`slimsd.models.schedulers`); ``random_weights`` builds a preset
    with random weights seeded by ``seed`` (offline). An SDXL VAE in fp16 overflows to NaN (black images), so
    in fp16 it is marked ``force_upcast``: diffusers decodes in fp32.

    ``loras``: LoRA adapters (``"FILE[:SCALE]"`` or ``(path, scale)``), merged into the weights before the
    runtime (:mod:`slimsd.models.lora`); ``on_warning`` receives the line about layers a LoRA skipped.

    ``prediction_type`` (``epsilon`` | ``v_prediction``) overrides what the model says it predicts: a single
    file written by another tool may not say (an SD 2.x one must be told).

    ``vae``: a tiny decoder, folder or TAESD-layout file (:mod:`slimsd.models.decoders`) in place of the model's
    VAE: a pipeline with it decodes, not encodes (img2img and inpainting need the model's own VAE).
    """
    from slimsd.models import decoders, lora, runtime, runtimes
    from slimsd.models.schedulers import check_scheduler, scheduler_name, set_scheduler

    quiet_deepspeed()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_scheduler(scheduler)
    if prediction_type is not None:
        from slimsd.models.single_file import check_prediction_type

        check_prediction_type(prediction_type)
    ref = resolve_model(model)  # the name is read once; every step below takes ref
    model, kind, sampling = ref.name, ref.kind, ref.sampling
    loras = [lora.as_spec(s, allow_pickle) for s in loras]  # a bad file fails before minutes of loading
    if vae is not None:
        decoders.check_decoder(vae)
    if sampling and sampling.get("lora"):
        # An LCM-LoRA student's adapters come with it, merged first and once (--from-png lists them again).
        own = lora.as_spec((str(Path(model) / sampling["lora"]), 1.0), allow_pickle)
        loras = [own, *(s for s in loras if Path(s.path).resolve() != Path(own.path).resolve())]
    exported = kind == "local" and runtimes.is_exported(model)  # ONNX Runtime / OpenVINO sessions
    if exported:
        runtimes.check_load_options(loras, compile, device)
        if vae is not None:
            raise SlimsdError(
                f"--vae does not apply to the exported folder {model!r}: its decoder is part of the export"
            )
    with quiet_loading():
        pipe = (
            runtimes.load_exported(model, dtype)
            if exported
            else _diffusers_pipeline(ref, torch_dtype, allow_pickle, random_weights, seed, prediction_type)
        )
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction_type
        )
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    weight_map = lora.student_weight_map(ref, pipe.unet) if loras else None
    applied_loras = lora.apply_loras(pipe, loras, allow_pickle, weight_map, on_warning)
    vae_record = decoders.swap_decoder(pipe, vae) if vae is not None else None
    if exported:
        pass  # the sessions run as load_exported compiled them (runtimes.kernel_dtype)
    elif optimize:
        runtime.optimize_pipeline(
            pipe, runtime.RuntimeConfig(device=device, dtype=torch_dtype, compile=compile)
        )
    else:
        runtime.place(pipe, device, torch_dtype)
    # (a tiny decoder has no post_quant_conv, which diffusers' upcast path reads; it decodes in fp16 as it is)
    if (
        is_sdxl(pipe)
        and torch_dtype == torch.float16
        and vae is None
        and getattr(pipe, "vae", None) is not None
    ):
        pipe.vae.register_to_config(force_upcast=True)
    pipe.set_progress_bar_config(disable=True)
    pipe._slimsd = {
        "model": model,
        "kind": kind,
        "source": model_source(ref, random_weights),
        "random_weights": random_weights,
        "base_scheduler": dict(pipe.scheduler.config),
        "default_scheduler": scheduler_name(pipe.scheduler),
        "runtime": runtimes.runtime_record(model, pipe)
        if exported
        else runtime.applied(pipe.unet, optimized=optimize),
        # A step-distilled student says how it samples (scheduler, steps, guidance): generate's defaults.
        "sampling": sampling,
        "loras": applied_loras,
        "vae": vae_record,  # the tiny decoder in place of the model's VAE: {"path", "sha256"}
    }
    if scheduler is not None:  # the pipeline's own from now on: generate() uses it when given none
        set_scheduler(pipe, scheduler)
        pipe._slimsd["default_scheduler"] = scheduler
    return pipe


def model_source(model: str | ModelRef, random_weights: bool = False) -> str:
    """Where MODEL's weights come from, as every PNG records it (``model_source``): the resolved path of a local
    folder, the hub id of a preset or hub model, the name of a micro model or of a preset with random weights."""
    ref = resolve_model(model)
    return ref.name if ref.kind == "preset" and random_weights else ref.location


def model_info(pipe) -> dict:
    """What :func:`load` recorded about PIPE (a pipeline made elsewhere gets placeholders)."""
    info = getattr(pipe, "_slimsd", None)
    if info is None:
        from slimsd.models.runtime import applied
        from slimsd.models.schedulers import scheduler_name

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

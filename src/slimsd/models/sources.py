"""Where a model comes from, read without loading it: what a name is (a preset, an offline micro model, a local
diffusers folder, a single file in the original layout, a hub id), a folder's safetensors-only check, the
provenance slimsd wrote beside it (slimsd.json, or a single file's header), how it samples, and the libraries
quieted while reading. The lowest module of models/: it imports none of the others but presets."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slimsd.errors import SlimsdError
from slimsd.models.presets import PRESETS, Preset

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # a single file in the original layout (single_file.py)


def describe_model(model: str) -> str:
    """What kind of MODEL string this is: 'micro' (offline: micro-sd, micro-sdxl, toy-sd), 'preset',
    'local' (a diffusers folder), 'single-file' or 'hub'."""
    if model in PRESETS:
        return "micro" if PRESETS[model].kind == "micro" else "preset"
    if Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES:
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


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved once (:func:`resolve_model`): what it is, where it lives, what slimsd wrote beside
    it and how it samples. The loader, the counter, the LoRA mapper and the trainer take this instead of the name,
    so a name is read once however many steps use it."""

    name: str  # as given
    kind: (
        str  # micro (micro-sd, micro-sdxl, toy-sd) | preset | local (a diffusers folder) | single-file | hub
    )
    location: str  # where the weights are: the resolved path, the hub id (preset, hub), or the name (micro)
    preset: Preset | None = None  # the preset entry (micro, preset)
    family: str | None = None  # sd | sdxl, when known without loading (presets, micro models)
    info: dict | None = None  # slimsd's provenance: slimsd.json beside a folder, a single file's header
    sampling: dict | None = None  # how it samples unless told otherwise (model_sampling)


def resolve_model(model: str | ModelRef) -> ModelRef:
    """MODEL as a :class:`ModelRef` (one already resolved is returned as it is); an unknown name is one line."""
    if isinstance(model, ModelRef):
        return model
    kind = describe_model(model)
    preset = PRESETS.get(model) if kind in ("micro", "preset") else None
    info, location = None, model
    if kind in ("local", "single-file"):
        location = str(Path(model).resolve())
        info = _readable_info(model)
    elif kind == "preset":
        location = preset.hub_id or model
    family = preset.family if preset is not None else None
    return ModelRef(model, kind, location, preset, family, info, _sampling(model, kind, info))


def _readable_info(model: str) -> dict | None:
    """read_slimsd_info, or None for a single file whose header does not read: the loader, which reads it
    again, says what is wrong with it in one line."""
    from safetensors import SafetensorError

    try:
        return read_slimsd_info(model)
    except (SafetensorError, OSError, ValueError):
        return None


def _sampling(model: str, kind: str, info: dict | None) -> dict | None:
    """How a model samples unless told otherwise, read without loading it: a step-distilled student's own (its
    slimsd.json ``sampling``: scheduler, steps, guidance); the toy teacher's guidance (TOY_SAMPLING: its PLMS
    scheduler follows 0.93 of its captions at guidance 2 and 0.13 at SD's 7.5), also for a student of it that says
    nothing itself; None for other models (25 steps, 7.5)."""
    if model == "toy-sd":
        from slimsd.toy.teacher import TOY_SAMPLING

        return {"guidance": TOY_SAMPLING["guidance_scale"]}
    if kind != "local":
        return None
    info = info or {}
    if "sampling" in info:
        return info["sampling"]
    return _sampling("toy-sd", "micro", None) if info.get("teacher") == "toy-sd" else None


def model_sampling(model: str | ModelRef) -> dict | None:
    """How MODEL samples unless told otherwise (:class:`ModelRef` ``sampling``)."""
    return resolve_model(model).sampling


def read_slimsd_info(folder: str | Path) -> dict | None:
    """The provenance compress writes beside a student (teacher, recipe, weight map), if there is one; a
    single file exported by slimsd carries it in its header."""
    if Path(folder).is_file():
        return provenance(folder)
    path = Path(folder) / "slimsd.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_metadata(path: str | Path) -> dict:
    """The header metadata of a .safetensors file (none for .ckpt), without reading its tensors."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def provenance(path: str | Path) -> dict | None:
    """A slimsd export's teacher, recipe and weight map (what slimsd.json holds beside a folder), or None."""
    meta = read_metadata(path)
    if "slimsd.teacher" not in meta:
        return None
    return {
        "teacher": meta["slimsd.teacher"],
        "recipe": json.loads(meta.get("slimsd.recipe") or "null"),
        "weight_map": json.loads(meta.get("slimsd.weight_map") or "{}"),
    }

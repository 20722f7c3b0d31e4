"""LoRA adapters applied at load time (``--lora FILE[:SCALE]``, ``slimsd.load(..., loras=[...])``).

A LoRA file in diffusers/peft format or in kohya/A1111 format (which diffusers converts) is read, reduced to
plain ``B @ A`` pairs (its alpha/rank and its SCALE folded into ``B``), loaded with diffusers'
``load_lora_weights`` and MERGED into the base weights (``fuse_lora``, then ``unload_lora_weights``): inference
costs nothing extra, and the fast runtime (fused Q/K/V, :mod:`slimsd.models.runtime`) applies afterwards to the
merged weights. Several LoRAs add up, each with its own scale.

Layers a LoRA names that the model does not have, or has in another shape, are left out (one warning line
with their count and a few names); a LoRA that fits nothing is refused. On a student that slimsd knows the
making of (a ``slimsd compress``/``distill`` folder with its weight map, or a student preset), a LoRA whose
U-Net layers do not all fit the student by name is read as a LoRA of the TEACHER: each of its layers goes to
the student layers copied from that teacher layer (BK-SDM keeps e.g. the teacher's up-block layers 0 and 2 as
the student's 0 and 1, so the names alone would put layer 1's LoRA on the wrong layer). Text-encoder layers
apply to the text encoder(s) as diffusers applies them.

Each LoRA is recorded (``pipe._slimsd["loras"]``, the PNG info): name, resolved path, scale, the file's sha256
(A1111's ``Lora hashes`` show its first 10 hex digits), layers applied and skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from slimsd.errors import SlimsdError
from slimsd.files import file_sha256, safe_stem
from slimsd.models.sources import PICKLE_SUFFIXES, ModelRef, quiet_libraries

SCALE_RANGE = (-10.0, 10.0)
SHOWN_SKIPPED = 3  # skipped layer names shown in the warning
_SPEC_HELP = "expected FILE[:SCALE], e.g. lcm-lora.safetensors:0.8"


class LoraSpec(NamedTuple):
    path: str
    scale: float = 1.0
    sha256: str | None = None  # the file must still hash to this (a PNG's record); None: any file


def parse_lora_spec(text: str, allow_pickle: bool = False) -> tuple[str, float]:
    """``"path/x.safetensors:0.8"`` -> (path, 0.8); no ``:SCALE`` -> scale 1.0. A colon that belongs to the
    path (``C:\\loras\\x.safetensors``, a file whose name has one) is not read as a scale. The file must exist
    and be safetensors (pickle files only with ``allow_pickle``)."""
    text = str(text).strip()
    path, sep, tail = text.rpartition(":")
    if (
        not sep
        or Path(text).is_file()
        or re.search(r"[/\\]", tail)
        or tail.lower().endswith((".safetensors", *PICKLE_SUFFIXES))
    ):
        path, tail = text, None
    scale = 1.0
    if tail is not None:
        try:
            scale = float(tail)
        except ValueError:
            raise SlimsdError(
                f"--lora {text!r}: scale {tail!r} is not a number; {_SPEC_HELP} (SCALE from "
                f"{SCALE_RANGE[0]:g} to {SCALE_RANGE[1]:g}, default 1)"
            ) from None
    check_scale(scale, text)
    check_lora_file(path, allow_pickle)
    return path, scale


def check_scale(scale, spec: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise SlimsdError(f"--lora {spec!r}: scale {scale!r} is not a number; {_SPEC_HELP}")
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise SlimsdError(
            f"--lora {spec!r}: scale {scale:g} is out of range; allowed: {SCALE_RANGE[0]:g} to {SCALE_RANGE[1]:g}"
        )


def check_lora_file(path: str, allow_pickle: bool) -> None:
    """Refuse a missing file, a folder, another file type, or a pickle file without ``allow_pickle``."""
    if not path:
        raise SlimsdError(f"--lora names no file; {_SPEC_HELP}")
    p = Path(path)
    if p.is_dir():
        raise SlimsdError(
            f"LoRA {path!r} is a folder; name the weights file in it (e.g. {path}/pytorch_lora_weights.safetensors)"
        )
    if not p.is_file():
        raise SlimsdError(f"LoRA file {path!r} does not exist")
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise SlimsdError(
            f"LoRA file {path!r} is a pickle file ({suffix}); pickle can run code when loaded: use a "
            ".safetensors file, or pass --allow-pickle to load it anyway"
        )
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise SlimsdError(
            f"LoRA file {path!r} has type {suffix or '(none)'!r}; allowed: .safetensors (or "
            f"{', '.join(PICKLE_SUFFIXES)} with --allow-pickle)"
        )


def as_spec(item, allow_pickle: bool = False) -> LoraSpec:
    """A checked :class:`LoraSpec` from ``"FILE[:SCALE]"``, ``(path, scale)`` or ``(path, scale, sha256)``.
    With a sha256, the file must still have it (regenerating from a PNG: the LoRA must be the one used)."""
    if isinstance(item, str | os.PathLike):
        return LoraSpec(*parse_lora_spec(os.fspath(item), allow_pickle))
    spec = LoraSpec(*item)
    check_scale(spec.scale, f"{spec.path}:{spec.scale}")
    check_lora_file(os.fspath(spec.path), allow_pickle)
    if spec.sha256 is not None and file_sha256(spec.path) != spec.sha256:
        raise SlimsdError(
            f"LoRA file {str(spec.path)!r} has changed: its sha256 is {file_sha256(spec.path)[:10]}..., the "
            f"image was made with {spec.sha256[:10]}...; restore that file, or choose LoRAs with --lora"
        )
    return LoraSpec(os.fspath(spec.path), float(spec.scale), spec.sha256)


# Reading a file: diffusers' conversion, then one layout (peft's MODULE.lora_A.weight ...) with scale 1.


def read_lora_file(path: str) -> tuple[dict, dict | None]:
    """(tensors, diffusers' adapter metadata or None) of a LoRA file; pickle files are read with
    ``weights_only`` (the caller has checked --allow-pickle)."""
    try:
        if Path(path).suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                header = f.metadata() or {}
            state = load_file(path)
            metadata = header.get("lora_adapter_metadata")
            return state, json.loads(metadata) if metadata else None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: the libraries' reasons are one line each
        raise SlimsdError(
            f"LoRA file {path!r} cannot be read: {str(e).splitlines()[0] if str(e) else e}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SlimsdError(f"LoRA file {path!r} does not hold a dict of tensors")
    return state, None


def _fold_kohya_alphas(state: dict) -> dict:
    """kohya/A1111 layers scale by alpha/rank: fold that into ``lora_up`` (as diffusers reads ``.alpha``)."""
    out = dict(state)
    for key, alpha in state.items():
        base = key.removesuffix(".alpha")
        if (
            key.endswith(".alpha")
            and f"{base}.lora_down.weight" in state
            and f"{base}.lora_up.weight" in state
        ):
            rank = state[f"{base}.lora_down.weight"].shape[0]
            up = state[f"{base}.lora_up.weight"]
            out[f"{base}.lora_up.weight"] = (up.float() * (float(alpha) / rank)).to(up.dtype)
            del out[key]
    return out


def _peft_layout(state: dict, component: str, module) -> dict:
    """One component's keys (prefix removed) in peft's layout, converted as diffusers' loaders convert them."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        return convert_unet_state_dict_to_peft(state)
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(module, "text_model"):  # recent transformers flatten CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def _scale_factors(layers: dict[str, dict], metadata: dict | None, component: str) -> dict[str, float]:
    """alpha/rank (alpha/sqrt(rank) with rsLoRA) per layer from diffusers' adapter metadata (peft's config);
    without metadata a diffusers LoRA has alpha = rank: factor 1."""
    config = {
        k.removeprefix(f"{component}."): v
        for k, v in (metadata or {}).items()
        if k.startswith(f"{component}.")
    }
    if not config:
        return dict.fromkeys(layers, 1.0)
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    factors = {}
    for module, tensors in layers.items():
        rank = tensors["lora_A.weight"].shape[0] if "lora_A.weight" in tensors else 1
        alpha = pattern.get(get_pattern_key(pattern, module), config.get("lora_alpha", rank))
        factors[module] = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return factors


def lora_layers(pipe, path: str) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{component: {module: {"lora_A.weight": A, "lora_B.weight": B, ...}}} with each layer's alpha/rank folded
    into B (scale 1: W' = W + B @ A)."""
    raw, metadata = read_lora_file(path)
    if not any("lora" in k for k in raw):
        shown = ", ".join(list(raw)[:2]) or "none"
        raise SlimsdError(f"{path!r} is not a LoRA file: no LoRA layers among its keys (first: {shown})")
    kwargs = {"unet_config": pipe.unet.config} if "text_encoder_2" in pipe.components else {}  # as diffusers
    try:
        state, alphas = pipe.lora_state_dict(_fold_kohya_alphas(raw), **kwargs)
    except (ValueError, KeyError) as e:
        raise SlimsdError(
            f"LoRA file {path!r} is in a layout diffusers cannot convert: {str(e).splitlines()[0]}"
        ) from None
    if alphas:  # every .alpha diffusers reads was folded above
        raise SlimsdError(f"LoRA file {path!r}: {len(alphas)} alpha values could not be placed")
    groups: dict[str, dict] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        groups.setdefault(component, {})[rest] = tensor
    out: dict[str, dict] = {}
    for component, part in groups.items():
        layers: dict[str, dict] = {}
        if component not in _lora_components(pipe):  # e.g. text_encoder_2 on SD 1.x: check_family refuses it
            out[component] = {}
            continue
        for key, tensor in _peft_layout(part, component, getattr(pipe, component)).items():
            module, _, name = key.partition(".lora_")
            layers.setdefault(module, {})[f"lora_{name}"] = tensor
        factors = _scale_factors(layers, metadata, component)
        for module, tensors in layers.items():
            if factors[module] != 1.0:
                for name in ("lora_B.weight", "lora_B.bias"):
                    if name in tensors:
                        tensors[name] = (tensors[name].float() * factors[module]).to(tensors[name].dtype)
        out[component] = layers
    return out


def _lora_components(pipe) -> list[str]:
    return [
        c
        for c in getattr(pipe, "_lora_loadable_modules", ["unet", "text_encoder"])
        if getattr(pipe, c, None) is not None
    ]


# Fitting a LoRA to the model.


def _fits(module, tensors: dict) -> bool:
    """The layer exists as a Linear/Conv2d and the LoRA's A and B have its input and output shapes."""
    a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or a is None or b is None:
        return False
    w = module.weight
    return a.dim() == w.dim() and tuple(a.shape[1:]) == tuple(w.shape[1:]) and b.shape[0] == w.shape[0]


def check_family(pipe, layers: dict, path: str) -> None:
    """Refuse a LoRA of another model family: some of its layers would fit by shape alone (an SDXL LoRA's
    self-attention on SD 1.x), and a few wrong layers make a broken image, not a warning."""
    missing = [c for c in layers if c not in _lora_components(pipe)]
    if missing:
        raise SlimsdError(
            f"LoRA {path!r} was made for another model family: it has layers for {missing[0]!r}, which this "
            f"model does not have (it has {', '.join(_lora_components(pipe))})"
        )
    width = pipe.unet.config.cross_attention_dim
    widths = {
        t["lora_A.weight"].shape[1]
        for m, t in layers.get("unet", {}).items()
        if m.endswith("attn2.to_k") and "lora_A.weight" in t
    }
    if isinstance(width, int) and widths and width not in widths:
        raise SlimsdError(
            f"LoRA {path!r} was made for another model family: its cross-attention reads {min(widths)}-wide "
            f"text embeddings, this model's {width}-wide"
        )


def teacher_to_student(weight_map: dict[str, str] | None) -> dict[str, list[str]] | None:
    """{teacher module: [student modules copied from it]} from a {student weight: teacher weight} map."""
    if not weight_map:
        return None
    out: dict[str, list[str]] = {}
    for student, teacher in weight_map.items():
        if student.endswith(".weight") and teacher.endswith(".weight"):
            out.setdefault(teacher.removesuffix(".weight"), []).append(student.removesuffix(".weight"))
    return out


def fit_layers(
    pipe, layers: dict, teacher_map: dict[str, list[str]] | None
) -> tuple[dict, list[str], list[str], bool]:
    """(state dict for diffusers, applied layer names, skipped layer names, read as the teacher's).

    Layer names are the LoRA's own (``unet.down_blocks...to_q``). The U-Net part is read by name when all of
    it fits; else, when ``teacher_map`` is given, as the teacher's (each layer to the student layers copied
    from it)."""
    state, applied, skipped, as_teacher = {}, [], [], False
    for component, comp_layers in layers.items():
        part = getattr(pipe, component) if component in _lora_components(pipe) else None
        modules = dict(part.named_modules()) if part is not None else {}
        targets = {m: [m] for m in comp_layers}
        if component == "unet" and teacher_map is not None:
            own = all(_fits(modules.get(m), t) for m, t in comp_layers.items())
            if not own:
                as_teacher = True
                targets = {m: teacher_map.get(m, []) for m in comp_layers}
        for module, tensors in comp_layers.items():
            fitting = [t for t in targets[module] if _fits(modules.get(t), tensors)]
            (applied if fitting else skipped).append(f"{component}.{module}")
            for target in fitting:
                for name, tensor in tensors.items():
                    state[f"{component}.{target}.{name}"] = tensor
    return state, applied, skipped, as_teacher


def student_weight_map(ref: ModelRef, unet) -> dict[str, str] | None:
    """{student weight: teacher weight} of a student slimsd knows the making of: a folder written by
    ``slimsd compress`` or ``distill`` (its slimsd.json) or its single-file export (its header), or a student
    preset (its recipe); else None."""
    from slimsd.models.architecture import load_recipe, plan, weight_map
    from slimsd.models.presets import student_teacher_unet

    if ref.kind in ("local", "single-file"):
        return (ref.info or {}).get("weight_map") or None
    preset = ref.preset
    if ref.kind != "preset" or preset is None or preset.kind != "student" or not preset.recipe:
        return None
    teacher = {k: v for k, v in student_teacher_unet(preset).items() if not k.startswith("_")}
    _, p = plan(teacher, load_recipe(preset.recipe))
    return weight_map(unet.state_dict().keys(), p)


def adapter_names(paths: Sequence[str]) -> list[str]:
    """Adapter names from the file stems (peft names cannot hold dots), made unique: x, x_2, ..."""

    names: list[str] = []
    for path in paths:
        stem = safe_stem(Path(path).stem, 60, keep="-", sep="_", lower=False, fallback="lora")
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}_{n}"
        names.append(name)
    return names


def apply_loras(
    pipe,
    specs: Sequence,
    allow_pickle: bool = False,
    weight_map: dict[str, str] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> list[dict]:
    """Merge the LoRAs SPECS (``"FILE[:SCALE]"``, ``(path, scale)`` or ``(path, scale, sha256)``) into PIPE's
    weights; returns one record per LoRA. ``weight_map``: the student's {student weight: teacher weight}
    (:func:`student_weight_map`), so that a teacher's LoRA reaches the layers copied from the teacher's."""
    specs = [as_spec(s, allow_pickle) for s in specs]
    if not specs:
        return []
    import warnings

    warn = on_warning or (lambda m: warnings.warn(m, stacklevel=3))
    names = adapter_names([s.path for s in specs])
    teacher_map = teacher_to_student(weight_map)
    records = []
    with quiet_libraries():
        for spec, name in zip(specs, names, strict=True):
            layers = lora_layers(pipe, spec.path)
            check_family(pipe, layers, spec.path)
            state, applied, skipped, as_teacher = fit_layers(pipe, layers, teacher_map)
            total = len(applied) + len(skipped)
            if not applied:
                raise SlimsdError(
                    f"LoRA {spec.path!r} fits nothing in this model: none of its {total} layers exists here "
                    f"with its shape (first: {skipped[0] if skipped else 'none'}); it was made for another model"
                )
            if skipped:
                shown = ", ".join(skipped[:SHOWN_SKIPPED]) + (", ..." if len(skipped) > SHOWN_SKIPPED else "")
                reading = " (read as the teacher's LoRA)" if as_teacher else ""
                why = (
                    "no counterpart in this student" if as_teacher else "not in this model, or another shape"
                )
                warn(f"LoRA {name}{reading}: {len(skipped)} of {total} layers skipped ({why}): {shown}")
            for key in [k for k in state if ".lora_B." in k]:  # the user's scale, folded like alpha/rank
                state[key] = (state[key].float() * spec.scale).to(state[key].dtype)
            # merged one by one (the sum is the same): the next LoRA meets plain layers again
            pipe.load_lora_weights(state, adapter_name=name)
            pipe.fuse_lora(components=_lora_components(pipe), lora_scale=1.0, adapter_names=[name])
            pipe.unload_lora_weights()
            records.append(
                {
                    "name": name,
                    "path": str(Path(spec.path).resolve()),
                    "scale": spec.scale,
                    "sha256": file_sha256(spec.path),
                    "layers_applied": len(applied),
                    "layers_skipped": len(skipped),
                    "read_as": "teacher" if as_teacher else "own",
                }
            )
    return records


# Writing a LoRA in kohya/A1111's layout (`slimsd export --to a1111-lora`).

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a pipeline's LoRA file
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_TAILS = {  # how each format names a layer's down (A) and up (B) matrices
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
}


def lora_file_of(path: str | os.PathLike) -> Path:
    """The LoRA file a user names: the file itself, or a folder holding pytorch_lora_weights.safetensors (a
    `slimsd finetune` final/ or its run folder, an lcm-lora student)."""
    p = Path(path)
    for candidate in (p, p / LORA_FILE, p / "final" / LORA_FILE):
        if candidate.is_file():
            return candidate
    raise SlimsdError(
        f"{str(p)!r} is neither a LoRA file nor a folder holding {LORA_FILE} (a `slimsd finetune` output)"
    )


def to_kohya(state: dict, metadata: dict | None, path: str = "LoRA") -> dict[str, torch.Tensor]:
    """A diffusers/peft LoRA state dict in kohya/A1111's layout: ``lora_unet_<module, dots as _>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha`` (kohya scales by alpha/rank: alpha is set so that the scale is peft's);
    text encoder layers as ``lora_te_text_model_...`` (SDXL: ``lora_te1_``/``lora_te2_``)."""
    layers: dict[str, dict[str, dict]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        tail = next((t for t in _TAILS if rest.endswith(f".{t}")), None)
        if component not in KOHYA_PREFIXES or tail is None:
            raise SlimsdError(
                f"{path!r}: key {key!r} is not a diffusers/peft LoRA layer (unet./text_encoder. ... "
                ".lora_A/.lora_B); allowed: a LoRA in diffusers' format"
            )
        module = rest[: -len(tail) - 1]
        layers.setdefault(component, {}).setdefault(module, {})[
            f"lora_{'AB'[_TAILS[tail] == 'up']}.weight"
        ] = tensor
    sdxl = "text_encoder_2" in layers
    out = {}
    for component, comp_layers in layers.items():
        prefix = "lora_te1_" if component == "text_encoder" and sdxl else KOHYA_PREFIXES[component]
        factors = _scale_factors(comp_layers, metadata, component)
        for module, tensors in comp_layers.items():
            if set(tensors) != {"lora_A.weight", "lora_B.weight"}:
                raise SlimsdError(f"{path!r}: layer {component}.{module} lacks its down or up matrix")
            down = tensors["lora_A.weight"]
            alpha = factors[module] * down.shape[0]
            if component != "unet" and not module.startswith("text_model."):  # kohya names CLIP's text_model
                module = f"text_model.{module}"
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = tensors["lora_B.weight"].contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def export_a1111_lora(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write the LoRA SRC (a file or a finetune folder) to OUT in kohya/A1111's layout, whole or not at all."""
    from safetensors.torch import save

    from slimsd.atomic import atomic_write_bytes

    if Path(out).suffix.lower() != ".safetensors":
        raise SlimsdError(f"--out {str(out)!r}: the file name must end in .safetensors")
    if Path(out).exists() and not overwrite:
        raise SlimsdError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    path = str(lora_file_of(src))
    check_lora_file(path, allow_pickle=False)
    state, metadata = read_lora_file(path)
    kohya = to_kohya(state, metadata, path)
    atomic_write_bytes(out, save(kohya, metadata={"ss_network_module": "networks.lora"}))
    return {"source": path, "out": str(out), "layers": sum(k.endswith(".alpha") for k in kohya)}

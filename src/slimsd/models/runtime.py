"""The fast runtime: how :func:`slimsd.load` prepares a pipeline for inference (``optimize=True``, the default).

Plain diffusers runs a model eagerly in the dtype and memory layout it was loaded in. slimsd applies:

- **channels_last** memory format for the convolutions (oneDNN's and cuDNN's preferred layout: no reorder
  before and after every conv);
- **fused QKV projections** (one GEMM instead of three for self-attention, one instead of two for K/V of
  cross-attention; diffusers' ``fuse_qkv_projections``), where diffusers can fuse them;
- **SDPA** attention (``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient kernels,
  on CPU too), which diffusers already selects on torch 2;
- **torch.compile** (inductor; opt-in, ``compile=True``): its warm-up is long (minutes on 2 CPU cores), so
  ``slimsd bench`` reports it apart;
- eval mode and no autograd state on every part.

The dtype is not part of the runtime: it comes from the device/dtype policy (:mod:`slimsd.devices`), the same
with and without the runtime, so that a benchmark compares like with like.

Process-wide settings (torch's thread count, flush-to-zero for denormals on the CPU) are applied by
:func:`apply_process_settings`; they change every model in the process, so a comparison applies them once,
before building either side, and records them (``slimsd bench`` does).

:func:`applied` reads back from a module what is really in effect (a fusion diffusers refused is reported as
not applied); ``slimsd generate --json``, the web UI and ``slimsd bench`` report that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from slimsd.devices import dtype_name
from slimsd.errors import SlimsdError


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode ("max-autotune", "reduce-overhead", ...) on CUDA
    threads: int | None = None  # torch intra-op threads; None leaves torch's default (one per physical core)


_PROCESS = {"flush_denormal": False}  # what apply_process_settings set in this process


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SlimsdError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def apply_process_settings(cfg: RuntimeConfig) -> dict:
    """Threads, and flush-to-zero for denormals on the CPU (trained and random weights alike produce
    denormals in GroupNorm tails, which slow x86 arithmetic). Affects the whole process; returns what it set."""
    set_threads(cfg.threads)
    if cfg.device == "cpu" and torch.set_flush_denormal(True):
        _PROCESS["flush_denormal"] = True
    return process_settings()


def process_settings() -> dict:
    return {
        "threads": torch.get_num_threads(),
        "flush_denormal": _PROCESS["flush_denormal"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _fuse_qkv(model) -> None:
    """Fuse Q/K/V projections where diffusers can (it refuses models with added-KV attention), then drop the
    separate projections the fused attention no longer reads (diffusers keeps them, for unfusing): the
    runtime then holds each weight once, and the model's parameter count stays the model's."""
    fuse = getattr(model, "fuse_qkv_projections", None)
    if fuse is None:
        return
    try:
        fuse()
    except ValueError:
        return
    for m in model.modules():
        if getattr(m, "fused_projections", False):
            # self-attention reads to_qkv; cross-attention reads to_q and to_kv
            unused = ("to_k", "to_v") if m.is_cross_attention else ("to_q", "to_k", "to_v")
            for name in unused:
                setattr(m, name, None)


def optimize_unet(unet, cfg: RuntimeConfig):
    """``unet`` moved to cfg.device/dtype and prepared for fast inference; returns the module to call.

    With ``cfg.compile`` the result is a ``torch.compile`` wrapper (the first call compiles); its ``config``
    and attributes still reach the U-Net.
    """
    apply_process_settings(cfg)
    unet = unet.eval().requires_grad_(False).to(device=cfg.device)
    if unet.dtype != cfg.dtype:  # diffusers warns on every cast, even a no-op one
        unet = unet.to(dtype=cfg.dtype)
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    if cfg.fuse_qkv:
        _fuse_qkv(unet)
    if cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        unet = compile_module(unet, cfg)
    return unet


def compile_module(module, cfg: RuntimeConfig):
    if cfg.device == "cpu":
        # Freezing turns weights into constants, so inductor can pre-pack them for oneDNN (CPU only).
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(module, mode=cfg.compile_mode, fullgraph=False)


def place(pipe, device: str, dtype: torch.dtype):
    """Move PIPE to ``device``, and cast it to ``dtype`` only where it is not already (diffusers warns on
    every cast, even a no-op one)."""
    pipe.to(device)
    if any(
        getattr(pipe, name, None) is not None and getattr(pipe, name).dtype != dtype
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    ):
        pipe.to(device, dtype)
    return pipe


def optimize_pipeline(pipe, cfg: RuntimeConfig):
    """A diffusers pipeline prepared for fast inference: the U-Net as in :func:`optimize_unet`, the VAE in
    channels_last with fused QKV, everything on cfg.device in cfg.dtype. Returns the same pipeline."""
    apply_process_settings(cfg)
    place(pipe, cfg.device, cfg.dtype)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        part = getattr(pipe, name, None)
        if part is not None:
            part.eval().requires_grad_(False)
    pipe.unet = optimize_unet(pipe.unet, cfg)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        if cfg.fuse_qkv:
            _fuse_qkv(vae)
        if cfg.channels_last:
            vae.to(memory_format=torch.channels_last)
    return pipe


def _attention_kind(processor) -> str:
    name = type(processor).__name__
    if name in ("AttnProcessor2_0", "FusedAttnProcessor2_0"):
        return "sdpa"
    if name == "AttnProcessor":
        return "eager"
    return name


def applied(unet, optimized: bool) -> dict:
    """What is in effect in ``unet`` (read from the module, not from what was asked for)."""
    compiled = hasattr(unet, "_orig_mod")
    module = unet._orig_mod if compiled else unet
    first = next(module.parameters())
    attn = [m for m in module.modules() if hasattr(m, "fused_projections")]
    kinds = sorted({_attention_kind(p) for p in module.attn_processors.values()})
    return {
        "optimized": optimized,
        "device": str(first.device),
        "dtype": dtype_name(first.dtype),
        "channels_last": bool(module.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        and module.conv_in.weight.shape[-1] > 1,
        "fused_qkv": bool(attn) and all(m.fused_projections for m in attn),
        "attention": "/".join(kinds) or "none",
        "compile": compiled,
    }


def summary(applied_: dict) -> str:
    """One line for people: 'fp32 on cpu · channels_last · fused QKV · sdpa' (or '· plain diffusers')."""
    parts = [f"{applied_['dtype']} on {applied_['device']}"]
    if not applied_["optimized"]:
        return " · ".join([*parts, "plain diffusers"])
    parts += [
        name
        for name, key in (("channels_last", "channels_last"), ("fused QKV", "fused_qkv"))
        if applied_[key]
    ]
    parts.append(applied_["attention"])
    if applied_["compile"]:
        parts.append("torch.compile")
    return " · ".join(parts)


def describe(cfg: RuntimeConfig, unet=None) -> dict:
    """The settings asked for, what was applied (when ``unet`` is given) and the process-wide settings."""
    out = {
        "requested": {
            "device": cfg.device,
            "dtype": dtype_name(cfg.dtype),
            "channels_last": cfg.channels_last,
            "fuse_qkv": cfg.fuse_qkv,
            "compile": cfg.compile,
            "compile_mode": cfg.compile_mode,
        },
        "process": process_settings(),
    }
    if unet is not None:
        out["applied"] = applied(unet, optimized=True)
    return out

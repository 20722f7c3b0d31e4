"""The fast runtime: how slimsd prepares a U-Net (and the rest of a pipeline) for speed.

Plain diffusers runs a model eagerly in the dtype and memory layout it was loaded in. slimsd applies, per
device, the set of changes that measured fastest (see ``benchmarks/`` for the numbers and the commands):

- **dtype**: fp16 on CUDA; on CPU bf16 when the CPU has native bf16 dot products (``avx512_bf16`` / AMX),
  where oneDNN's bf16 convolutions and GEMMs run about twice as fast as fp32; fp32 otherwise.
- **channels_last** memory format for the convolutions (oneDNN's and cuDNN's preferred layout: no reorder
  before and after every conv). On CPU this matters most in bf16.
- **fused QKV projections** (one GEMM instead of three for self-attention, one instead of two for K/V of
  cross-attention; diffusers' ``fuse_qkv_projections``).
- **SDPA** attention (``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient kernels,
  on CPU too), which diffusers already selects on torch 2.
- **torch.compile** (inductor; opt-in, ``compile=True``): its warm-up is long (minutes on 2 CPU cores), so it
  is reported apart by ``slimsd bench``.
- **inference mode**, no autograd state, flush-to-zero for denormals on CPU.

Everything is a plain function over a :class:`RuntimeConfig`; outputs match eager diffusers within the
tolerance of the chosen dtype (``tests/test_runtime.py``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from slimsd.errors import SlimsdError, unknown

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    fuse_qkv: bool = True
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode ("max-autotune", "reduce-overhead", ...) on CUDA
    threads: int | None = None  # torch intra-op threads; None leaves torch's default (one per physical core)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """True where bf16 GEMMs/convolutions run natively (AVX512-BF16 or AMX): there bf16 beats fp32 on CPU."""
    flags = cpu_flags()
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    return native and torch.backends.mkldnn.is_available()


# The vector extensions that decide CPU inference speed, widest last; recorded with every CPU benchmark.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU has: bf16 beats fp32 only with avx512_bf16 / amx_bf16 (see module doc)."""
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def resolve_device(device: str | None) -> str:
    """'auto'/None -> cuda when available, else cpu; refuses a CUDA device that is not there."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimsdError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise SlimsdError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto' -> fp16 on CUDA/MPS, bf16 on a CPU with native bf16, else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.startswith(("cuda", "mps")):
            return torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if name not in DTYPES:
        raise unknown("dtype", name, DTYPE_CHOICES)
    dtype = DTYPES[name]
    if device == "cpu" and dtype == torch.float16:
        raise SlimsdError("dtype float16 is slow and poorly supported on CPU; use bfloat16 or float32 there")
    return dtype


def default_config(
    device: str = "auto", dtype: str | torch.dtype | None = "auto", **overrides
) -> RuntimeConfig:
    """The fastest settings measured for ``device`` (see the module docstring), with ``overrides`` applied."""
    device = resolve_device(device)
    cfg = RuntimeConfig(device=device, dtype=resolve_dtype(dtype, device))
    return replace(cfg, **overrides)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SlimsdError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _fuse_qkv(model) -> None:
    """Fuse Q/K/V projections where diffusers can (it refuses models with added-KV attention)."""
    fuse = getattr(model, "fuse_qkv_projections", None)
    if fuse is None:
        return
    with contextlib.suppress(ValueError):
        fuse()


def optimize_unet(unet, cfg: RuntimeConfig):
    """``unet`` moved to cfg.device/dtype and prepared for fast inference; returns the module to call.

    With ``cfg.compile`` the result is a ``torch.compile`` wrapper (the first call compiles); its ``config``
    and attributes still reach the U-Net.
    """
    set_threads(cfg.threads)
    if cfg.device == "cpu":
        torch.set_flush_denormal(
            True
        )  # random and trained weights alike produce denormals in GroupNorm tails
    unet = unet.eval().requires_grad_(False).to(device=cfg.device, dtype=cfg.dtype)
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


def optimize_pipeline(pipe, cfg: RuntimeConfig):
    """A diffusers pipeline prepared for fast inference: the U-Net as in :func:`optimize_unet`, the VAE in
    channels_last with fused QKV, everything on cfg.device in cfg.dtype. Returns the same pipeline."""
    set_threads(cfg.threads)
    pipe.to(cfg.device, cfg.dtype)
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
    with contextlib.suppress(AttributeError):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def describe(cfg: RuntimeConfig) -> dict:
    """The settings as JSON-ready data (recorded with every benchmark result)."""
    return {
        "device": cfg.device,
        "dtype": dtype_name(cfg.dtype),
        "channels_last": cfg.channels_last,
        "fuse_qkv": cfg.fuse_qkv,
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode,
        "threads": cfg.threads or torch.get_num_threads(),
        "flush_denormal": cfg.device == "cpu",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }

"""The one device and dtype policy: which device a command runs on and in which floating-point type.

- device ``auto`` (or None): ``cuda`` when CUDA is available, else ``cpu``. ``cpu``, ``cuda``, ``cuda:N`` and
  ``mps`` are accepted only where this machine has them.
- dtype ``auto`` (or None): fp16 on CUDA and MPS; on the CPU bf16 where the CPU has native bf16 dot products
  (AVX512-BF16 or AMX, where oneDNN's bf16 kernels run about twice as fast as fp32), else fp32. fp16 on the
  CPU is refused: its kernels there are slow or missing.
- ``SLIMSD_CPU_DTYPE=bf16|fp32`` (environment) forces the CPU's ``auto`` dtype on any machine: bf16 on a CPU
  without native bf16 runs, slowly, through emulated kernels. The test suite runs its dtype-sensitive tests
  under both values so that a machine of either kind checks both defaults.

Every command and the trainer resolve their ``--device``/``--dtype`` (and ``mixed_precision``) here, and every
record of a run names the dtype with :func:`dtype_name` (``fp32``, ``fp16``, ``bf16``).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

import torch

from slimsd.errors import SlimsdError, unknown

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (auto: cuda when available, else cpu)."
DTYPE_HELP = "auto | fp32 | fp16 | bf16 (auto: fp16 on a GPU, bf16 on a CPU with native bf16, else fp32)."

CPU_DTYPE_ENV = "SLIMSD_CPU_DTYPE"
CPU_DTYPE_CHOICES = ("bf16", "fp32")

# accelerate's mixed_precision words -> the dtype the frozen models compute in
MIXED_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype: fp32, fp16, bf16 (others as torch spells them)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def weights_place(network) -> tuple[torch.device, torch.dtype]:
    """Where NETWORK computes: the device and dtype of its first floating-point parameter. diffusers'
    ``pipe.device`` and ``ModelMixin.dtype`` walk every submodule looking for offloading hooks, about a
    millisecond each on a small U-Net, on every image; this reads one tensor. A network that is not a torch
    module (an exported one, :mod:`slimsd.models.runtimes`) says its own ``device`` and ``dtype``."""
    if not isinstance(network, torch.nn.Module):
        return torch.device(network.device), network.dtype
    for p in network.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def resolve_device(device: str | torch.device | None) -> str:
    """``None``/``auto`` -> cuda when available, else cpu. Refuses devices this machine lacks. A
    ``torch.device`` (from accelerate, say) is taken as it is."""
    if isinstance(device, torch.device):
        return str(device)
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = re.fullmatch(r"cpu|mps|cuda(?::(\d+))?", str(device))
    if not m:
        raise SlimsdError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SlimsdError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise SlimsdError(
                f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise SlimsdError("device 'mps' asked for but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None``/``auto`` -> fp16 on CUDA/MPS, bf16 on a CPU with native bf16, else fp32 (module docstring)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith(("cuda", "mps")):
            return torch.float16
        return DTYPES[cpu_default_dtype()]
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPE_CHOICES)
    if DTYPES[dtype] == torch.float16 and device == "cpu":
        raise SlimsdError(f"dtype {dtype!r} is not supported on the CPU; use fp32 or bf16 there")
    return DTYPES[dtype]


def cpu_default_dtype() -> str:
    """The CPU's ``auto`` dtype: ``SLIMSD_CPU_DTYPE`` where set, else bf16 with native bf16, else fp32."""
    forced = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if forced:
        if forced not in CPU_DTYPE_CHOICES:
            raise unknown(f"{CPU_DTYPE_ENV} value", forced, CPU_DTYPE_CHOICES)
        return forced
    return "bf16" if cpu_supports_bf16() else "fp32"


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
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return native and torch.backends.mkldnn.is_available()


# The vector extensions that decide CPU inference speed, widest last; recorded with every CPU benchmark.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU has: bf16 beats fp32 only with avx512_bf16 / amx_bf16."""
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


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU model."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model()


def quiet_deepspeed() -> None:
    """Where the deepspeed package is installed, accelerate imports it (``unwrap_model``) in every run, and
    deepspeed's accelerator auto-detection prints a WARNING line on stdout on a machine without CUDA. Naming the
    CPU accelerator (its documented override, DS_ACCELERATOR) is what the detection would pick, silently."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

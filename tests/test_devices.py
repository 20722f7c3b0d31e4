"""slimsd.devices: the one device/dtype policy every command and the trainer use."""

from __future__ import annotations

import pytest
import torch

from slimsd import devices
from slimsd.errors import SlimsdError

from helpers import machine_cpu_dtype, run_cli


def test_auto_dtype_follows_the_device_and_the_cpu(monkeypatch):
    monkeypatch.delenv("SLIMSD_CPU_DTYPE", raising=False)  # the flags' policy, not the switch (tested below)
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert devices.resolve_dtype("auto", "cpu") == torch.float32
    assert devices.resolve_dtype(None, "cpu") == torch.float32
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "amx_bf16"}))
    native = torch.backends.mkldnn.is_available()
    assert devices.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert devices.resolve_dtype("auto", "cuda") == torch.float16
    assert devices.resolve_dtype("auto", "cuda:1") == torch.float16
    assert devices.resolve_dtype("auto", "mps") == torch.float16


def test_named_dtypes_and_refusals():
    assert devices.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert devices.resolve_dtype("float32", "cpu") == torch.float32
    assert devices.resolve_dtype(torch.float16, "cuda") == torch.float16
    with pytest.raises(SlimsdError, match=r"dtype 'fp16' is not supported on the CPU"):
        devices.resolve_dtype("fp16", "cpu")
    with pytest.raises(SlimsdError, match=r"unknown dtype 'int8'; allowed: .*bf16.*fp32"):
        devices.resolve_dtype("int8", "cpu")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "CUDA is not available"),
        ("cuda:0", "CUDA is not available"),
        ("cudafoo", "unknown device 'cudafoo'"),
        ("tpu", "unknown device 'tpu'"),
        ("cpu:0", "unknown device 'cpu:0'"),
    ],
)
def test_devices_this_machine_lacks_are_refused(device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, on every machine
    assert devices.resolve_device("auto") == "cpu" and devices.resolve_device(None) == "cpu"
    assert devices.resolve_device("cpu") == "cpu"
    with pytest.raises(SlimsdError, match=message):
        devices.resolve_device(device)


def test_short_names_and_the_trainers_words():
    assert [devices.dtype_name(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == [
        "fp32",
        "fp16",
        "bf16",
    ]
    assert devices.dtype_name(torch.float64) == "float64"
    assert {k: devices.DTYPES[v] for k, v in devices.MIXED_PRECISION.items()} == {
        "no": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
    }


def test_the_cli_offers_exactly_the_policys_dtypes():
    from slimsd.commands.options import DTYPE_CHOICES

    assert DTYPE_CHOICES == devices.DTYPE_CHOICES


def test_cpu_isa_and_bf16_follow_the_flags(monkeypatch):
    zen1 = frozenset({"fpu", "avx", "avx2", "fma", "sse4_2"})
    monkeypatch.setattr(devices, "cpu_flags", lambda: zen1)
    assert devices.cpu_isa() == ["avx2", "fma"]
    assert not devices.cpu_supports_bf16()
    sapphire = zen1 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    monkeypatch.setattr(devices, "cpu_flags", lambda: sapphire)
    assert devices.cpu_isa() == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
    assert devices.cpu_supports_bf16() == torch.backends.mkldnn.is_available()


def test_the_cpu_default_is_what_this_machine_should_pick():
    """Read independently (tests/helpers.py parses /proc/cpuinfo itself): bf16 on a CPU with avx512_bf16 or
    amx_bf16, fp32 elsewhere, unless SLIMSD_CPU_DTYPE says otherwise."""
    assert devices.dtype_name(devices.resolve_dtype("auto", "cpu")) == machine_cpu_dtype()


def test_slimsd_cpu_dtype_forces_the_cpu_default_on_any_cpu(monkeypatch):
    for flags in (frozenset({"avx2"}), frozenset({"avx2", "avx512_bf16", "amx_bf16"})):
        monkeypatch.setattr(devices, "cpu_flags", lambda f=flags: f)
        for forced, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            monkeypatch.setenv("SLIMSD_CPU_DTYPE", forced)
            assert devices.resolve_dtype("auto", "cpu") == want
            assert devices.resolve_dtype(None, "cpu") == want
            assert devices.resolve_dtype("auto", "cuda") == torch.float16  # the CPU's default only
            assert devices.resolve_dtype("fp32", "cpu") == torch.float32  # an explicit dtype still wins
    monkeypatch.setenv("SLIMSD_CPU_DTYPE", "fp16")
    with pytest.raises(SlimsdError, match=r"unknown SLIMSD_CPU_DTYPE value 'fp16'; allowed: bf16, fp32"):
        devices.resolve_dtype("auto", "cpu")


def test_a_bad_slimsd_cpu_dtype_is_one_line_from_the_cli(monkeypatch, capsys):
    monkeypatch.setenv("SLIMSD_CPU_DTYPE", "int8")
    code, _out, err = run_cli(["generate", "micro-sd", "x", "--steps", "1"], capsys)
    assert (
        code == 2
        and err.strip() == "slimsd: error: unknown SLIMSD_CPU_DTYPE value 'int8'; allowed: bf16, fp32"
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weights_place_is_what_diffusers_reports(dtype):
    """generate records the U-Net's device and dtype without diffusers' module walks; same answer as theirs."""
    from slimsd.models.loading import load

    pipe = load("micro-sd", device="cpu", dtype=dtype)
    assert devices.weights_place(pipe.unet) == (pipe.device, pipe.unet.dtype)
    assert devices.weights_place(pipe.unet)[1] == devices.DTYPES[dtype]
    assert devices.weights_place(pipe.text_encoder) == (pipe.text_encoder.device, pipe.text_encoder.dtype)


def test_weights_place_of_a_network_without_parameters():
    class Exported:  # what slimsd.models.runtimes puts where diffusers expects a module
        device = "cpu"
        dtype = torch.float32

    assert devices.weights_place(Exported()) == (torch.device("cpu"), torch.float32)

"""The fast runtime gives the outputs of eager diffusers (within the dtype's tolerance) and picks dtypes sanely."""

from __future__ import annotations

import copy

import pytest
import torch

from slimsd.errors import SlimsdError
from slimsd.measure.bench import unet_inputs
from slimsd.run import runtime


@pytest.fixture(autouse=True)
def _one_thread():
    # Micro models: one thread is faster than two on a shared 2-core machine (no OpenMP barriers).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", ["micro_sd", "micro_sdxl"])
def test_optimized_unet_matches_eager_fp32(name, request):
    pipe = request.getfixturevalue(name)
    eager = copy.deepcopy(pipe.unet).eval()
    cfg = runtime.RuntimeConfig(device="cpu", dtype=torch.float32, channels_last=True, fuse_qkv=True)
    fast = runtime.optimize_unet(copy.deepcopy(pipe.unet), cfg)
    fused = [p for p in fast.attn_processors.values() if "Fused" in type(p).__name__]
    assert fused, "fuse_qkv should have installed fused attention processors"
    inputs = unet_inputs(eager, 64, 2, "cpu", torch.float32, seed=3)
    with torch.inference_mode():
        ref, out = eager(**inputs).sample, fast(**inputs).sample
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_optimized_unet_bf16_close_to_fp32(micro_sd):
    eager = copy.deepcopy(micro_sd.unet).eval()
    fast = runtime.optimize_unet(copy.deepcopy(micro_sd.unet), runtime.RuntimeConfig(dtype=torch.bfloat16))
    assert next(fast.parameters()).dtype == torch.bfloat16
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    inputs = unet_inputs(eager, 64, 1, "cpu", torch.float32, seed=4)
    fast_inputs = unet_inputs(eager, 64, 1, "cpu", torch.bfloat16, seed=4)
    with torch.inference_mode():
        ref, out = eager(**inputs).sample, fast(**fast_inputs).sample.float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 output differs from fp32 eager by {rel:.3f} (relative L2)"


def test_optimize_pipeline_sets_dtype_and_layout(micro_sd):
    pipe = copy.deepcopy(micro_sd)
    runtime.optimize_pipeline(pipe, runtime.RuntimeConfig(dtype=torch.bfloat16))
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_resolve_dtype_cpu():
    auto = runtime.resolve_dtype("auto", "cpu")
    assert auto == (torch.bfloat16 if runtime.cpu_supports_bf16() else torch.float32)
    assert runtime.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert runtime.resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(SlimsdError, match="float16"):
        runtime.resolve_dtype("float16", "cpu")
    with pytest.raises(SlimsdError, match="int8"):
        runtime.resolve_dtype("int8", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a missing GPU")
def test_resolve_device_refuses_missing_cuda():
    assert runtime.resolve_device("auto") == "cpu"
    with pytest.raises(SlimsdError, match="CUDA is not available"):
        runtime.resolve_device("cuda")
    with pytest.raises(SlimsdError, match="unknown device"):
        runtime.resolve_device("tpu")


def test_describe_records_settings():
    d = runtime.describe(runtime.RuntimeConfig(dtype=torch.bfloat16, compile=True, threads=1))
    assert (
        d["dtype"] == "bfloat16" and d["compile"] is True and d["threads"] == 1 and d["channels_last"] is True
    )


def test_cpu_isa_and_bf16_follow_the_flags(monkeypatch):
    zen1 = frozenset({"fpu", "avx", "avx2", "fma", "sse4_2"})
    monkeypatch.setattr(runtime, "cpu_flags", lambda: zen1)
    assert runtime.cpu_isa() == ["avx2", "fma"]
    assert not runtime.cpu_supports_bf16()
    sapphire = zen1 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    monkeypatch.setattr(runtime, "cpu_flags", lambda: sapphire)
    assert runtime.cpu_isa() == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
    assert runtime.cpu_supports_bf16() == torch.backends.mkldnn.is_available()

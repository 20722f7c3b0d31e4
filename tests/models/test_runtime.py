"""The fast runtime gives the outputs of eager diffusers (within the dtype's tolerance) and picks dtypes sanely."""

from __future__ import annotations

import copy

import pytest
import torch

from slimsd.measure.bench import unet_inputs
from slimsd.models import runtime


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


def test_applied_reads_back_what_is_in_effect(micro_sd):
    plain = copy.deepcopy(micro_sd.unet).eval()
    assert runtime.applied(plain, optimized=False) == {
        "optimized": False,
        "device": "cpu",
        "dtype": "fp32",
        "channels_last": False,
        "fused_qkv": False,
        "attention": "sdpa",
        "compile": False,
    }
    fast = runtime.optimize_unet(copy.deepcopy(micro_sd.unet), runtime.RuntimeConfig(dtype=torch.bfloat16))
    got = runtime.applied(fast, optimized=True)
    assert (got["dtype"], got["channels_last"], got["fused_qkv"], got["attention"]) == (
        "bf16",
        True,
        True,
        "sdpa",
    )


def test_a_fusion_diffusers_refuses_is_reported_as_not_applied(micro_sd, monkeypatch):
    unet = copy.deepcopy(micro_sd.unet)

    def refuse():
        raise ValueError("`fuse_qkv_projections()` is not supported for models having added KV projections.")

    monkeypatch.setattr(unet, "fuse_qkv_projections", refuse)
    cfg = runtime.RuntimeConfig(fuse_qkv=True)
    fast = runtime.optimize_unet(unet, cfg)
    described = runtime.describe(cfg, fast)
    assert described["requested"]["fuse_qkv"] is True
    assert described["applied"]["fused_qkv"] is False
    assert described["applied"]["channels_last"] is True


def test_summary_line_names_the_applied_settings():
    applied = {
        "optimized": True,
        "device": "cpu",
        "dtype": "fp32",
        "channels_last": True,
        "fused_qkv": False,
        "attention": "sdpa",
        "compile": False,
    }
    assert runtime.summary(applied) == "fp32 on cpu · channels_last · sdpa"
    assert runtime.summary(applied | {"optimized": False}) == "fp32 on cpu · plain diffusers"


@pytest.mark.parametrize("name", ["micro_sd", "micro_sdxl"])
def test_fused_model_holds_each_weight_once(name, request):
    pipe = request.getfixturevalue(name)
    plain = sum(p.numel() for p in pipe.unet.parameters())
    fast = runtime.optimize_unet(copy.deepcopy(pipe.unet), runtime.RuntimeConfig(fuse_qkv=True))
    assert runtime.applied(fast, optimized=True)["fused_qkv"]
    assert sum(p.numel() for p in fast.parameters()) == plain

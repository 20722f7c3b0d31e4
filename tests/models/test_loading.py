"""slimsd.load, the one loader: the runtime changes speed, not pixels; without it, plain diffusers; what it
reports; device, dtype and safety rules; broken folders named as such; the libraries' bars left as they were."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from slimsd.errors import SlimsdError
from slimsd.models.loading import load
from slimsd.run.generate import generate

from helpers import run_cli

TOY = {"steps": 4, "guidance": 5.0, "seed": 11}


def pixels(results) -> np.ndarray:
    return np.stack([np.asarray(r.image, dtype=np.int16) for r in results])


def test_an_image_with_and_without_the_runtime_is_the_same_to_float_rounding():
    fast = load("toy-sd", device="cpu", dtype="fp32")
    plain = load("toy-sd", device="cpu", dtype="fp32", optimize=False)
    assert fast._slimsd["runtime"]["fused_qkv"] and fast._slimsd["runtime"]["channels_last"]
    assert not plain._slimsd["runtime"]["fused_qkv"] and not plain._slimsd["runtime"]["channels_last"]
    prompts = ["a red circle", "a small blue square on the left"]
    a = pixels(generate(fast, prompts, **TOY))
    b = pixels(generate(plain, prompts, **TOY))
    # different GEMM grouping and memory layout: rounding-level differences, at most one grey level here and there
    assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.05


def test_without_the_runtime_it_is_plain_diffusers():
    """slimsd's loader and generation with optimize=False give the pixels of diffusers' own pipeline, called
    the way the diffusers docs call it, on the committed toy weights."""
    from diffusers import StableDiffusionPipeline

    from slimsd.toy.teacher import TOY_DIR

    ours = generate(load("toy-sd", device="cpu", dtype="fp32", optimize=False), "a green triangle", **TOY)[0]
    theirs = StableDiffusionPipeline.from_pretrained(
        str(TOY_DIR), safety_checker=None, requires_safety_checker=False
    )
    theirs.set_progress_bar_config(disable=True)
    image = theirs(
        "a green triangle",
        num_inference_steps=TOY["steps"],
        guidance_scale=TOY["guidance"],
        generator=torch.Generator("cpu").manual_seed(TOY["seed"]),
    ).images[0]
    assert np.array_equal(np.asarray(ours.image), np.asarray(image))


def test_generate_json_reports_the_runtime_applied(tmp_path, capsys):
    args = [
        "generate",
        "micro-sd",
        "a red circle",
        "--steps",
        "1",
        "--seed",
        "3",
        "--out",
        str(tmp_path),
        "--json",
    ]
    code, out, _ = run_cli([*args, "--device", "cpu", "--dtype", "fp32"], capsys)
    assert code == 0
    assert json.loads(out)["runtime"] == {
        "optimized": True,
        "device": "cpu",
        "dtype": "fp32",
        "channels_last": True,
        "fused_qkv": True,
        "attention": "sdpa",
        "compile": False,
    }
    code, out, _ = run_cli([*args, "--no-optimize", "--dtype", "bf16"], capsys)
    runtime = json.loads(out)["runtime"]
    assert code == 0 and (runtime["optimized"], runtime["channels_last"], runtime["fused_qkv"]) == (
        False,
        False,
        False,
    )
    assert runtime["dtype"] == "bf16" and runtime["device"] == "cpu"


def test_device_and_dtype_follow_the_policy():
    pipe = load("micro-sdxl", device="cpu", dtype="bf16", optimize=False)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {
        torch.bfloat16
    }
    with pytest.raises(SlimsdError, match="'fp16' is not supported on the CPU"):
        load("micro-sd", dtype="fp16")
    with pytest.raises(SlimsdError, match="unknown device 'gpu'"):
        load("micro-sd", device="gpu")


def test_a_broken_local_folder_is_reported_as_broken(tmp_path, monkeypatch):
    from slimsd.models.compress import compress

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "student"
    compress("micro-sd", "bk-small", folder)
    (folder / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(SlimsdError) as e:
        load(str(folder))
    message = str(e.value)
    assert "broken" in message and str(folder) in message and "local cache" not in message
    shutil.rmtree(folder / "vae")
    with pytest.raises(SlimsdError, match="broken"):
        load(str(folder))


def test_loading_leaves_the_libraries_progress_bars_as_it_found_them():
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_progress_bar()
    load("micro-sd", optimize=False)
    assert diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    load("micro-sd", optimize=False)
    assert not diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.enable_progress_bar()

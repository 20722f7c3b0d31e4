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
    # (the README's claim): a pixel moves only when its value lies within that difference of a rounding boundary,
    # a few in a thousand at most (measured: max 1, 0.08% of the values)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


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


def test_the_toy_teacher_and_its_students_sample_at_the_guidance_it_was_measured_best_at(tmp_path):
    """toy-sd's default guidance is the best of its recorded sweep (training.json, scored by
    scripts/train_toy_teacher.py), not SD's 7.5 where its PLMS sampler follows 13% of captions; a student of it
    that says nothing itself inherits it; a student's own sampling (a step-distilled one) and other models keep
    theirs."""
    from slimsd.models.loading import model_sampling
    from slimsd.run.generate import DEFAULT_GUIDANCE, sampling_defaults
    from slimsd.toy.teacher import TOY_DIR

    sweep = json.loads((TOY_DIR / "training.json").read_text())["guidance_sweep"]
    best = max(sweep, key=lambda g: sweep[g]["caption_fidelity"])
    assert sampling_defaults(model_sampling("toy-sd")) == {"steps": 25, "guidance": float(best)}
    assert sampling_defaults(model_sampling("micro-sd"))["guidance"] == DEFAULT_GUIDANCE

    student, lcm, other = (tmp_path / n for n in ("kd", "lcm", "other"))
    for folder, info in (
        (student, {"teacher": "toy-sd", "recipe": {"name": "bk-small"}}),
        (lcm, {"teacher": "toy-sd", "sampling": {"scheduler": "lcm", "steps": 4, "guidance": 2.0}}),
        (other, {"teacher": "CompVis/stable-diffusion-v1-4"}),
    ):
        folder.mkdir()
        (folder / "slimsd.json").write_text(json.dumps(info))
    assert model_sampling(str(student)) == model_sampling("toy-sd")
    assert model_sampling(str(lcm)) == {"scheduler": "lcm", "steps": 4, "guidance": 2.0}
    assert model_sampling(str(other)) is None
    # the loaded teacher reports it, so generate's defaults follow
    (image,) = generate(load("toy-sd", device="cpu", dtype="fp32"), "a red circle", steps=1, seed=0)
    assert image.settings.guidance == float(best)

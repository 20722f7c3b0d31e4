"""slimsd.run.generate and `slimsd generate`: seeds, batches, schedulers, PNG metadata, file names, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from slimsd.atomic import write_new_file
from slimsd.cli import main
from slimsd.errors import SlimsdError
from slimsd.images import make_grid
from slimsd.models import schedulers
from slimsd.models.loading import load
from slimsd.run import generate as g
from slimsd.run import outputs, pnginfo

FAST = {"steps": 2, "guidance": 7.5}


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def run_cli(argv, capsys):
    """`slimsd ARGV` in-process -> (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", ["micro_sd", "micro_sdxl"])
def test_same_seed_same_pixels_and_batch_image_i_is_seed_plus_i(name, request):
    pipe = request.getfixturevalue(name)
    batch = g.generate(pipe, "a red circle", seed=10, num_images=3, batch_size=3, **FAST)
    assert [r.seed for r in batch] == [10, 11, 12]
    single = g.generate(pipe, "a red circle", seed=12, **FAST)[0]
    again = g.generate(pipe, "a red circle", seed=12, **FAST)[0]
    assert np.array_equal(pixels(single), pixels(again))  # same seed, same settings: the same pixels
    # A batch changes float summation order only (~1e-6 before the 8-bit rounding).
    assert np.abs(pixels(batch[2]) - pixels(single)).max() <= 1
    assert np.abs(pixels(batch[0]) - pixels(single)).max() > 1  # a different seed is a different image


def test_seed_minus_one_draws_and_reports_a_seed(micro_sd):
    (r,) = g.generate(micro_sd, "a blue square", seed=-1, steps=1)
    assert 0 <= r.seed <= g.MAX_SEED and r.settings.seed == r.seed
    assert f"Seed: {r.seed}," in r.settings.a1111_parameters()


@pytest.mark.parametrize("scheduler", list(schedulers.SCHEDULERS))
def test_every_scheduler_runs_and_the_pipeline_keeps_its_own(micro_sd, scheduler):
    own = micro_sd.scheduler
    (r,) = g.generate(micro_sd, "a green triangle", seed=3, scheduler=scheduler, steps=1)
    assert r.settings.scheduler == scheduler
    assert np.isfinite(pixels(r)).all() and pixels(r).std() > 0
    assert micro_sd.scheduler is own


def test_set_scheduler_uses_the_model_noise_schedule_and_is_named_back(micro_sdxl):
    pipe = micro_sdxl
    before = pipe.scheduler
    try:
        for name in schedulers.SCHEDULERS:
            schedulers.set_scheduler(pipe, name)
            assert type(pipe.scheduler).__name__ == schedulers.SCHEDULERS[name][0]
            assert (
                schedulers.scheduler_name(pipe.scheduler) == name
            )  # karras does not leak into plain dpm++2m
            assert pipe.scheduler.config.beta_schedule == before.config.beta_schedule
    finally:
        pipe.scheduler = before


@pytest.mark.slow
def test_cli_from_png_reproduces_the_image_exactly(tmp_path, capsys):
    code, out, err = run_cli(
        [
            "generate",
            "micro-sd",
            "a red / circle\x07 ../../x",
            "--negative",
            "blurry",
            "--steps",
            "2",
            "--seed",
            "5",
            "--num-images",
            "2",
            "--scheduler",
            "euler-ancestral",
            "--out",
            str(tmp_path / "a"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["seeds"] == [5, 6] and report["grid"]
    first = report["images"][1]["path"]
    assert "/" not in first.split("/")[-1] and "\x07" not in first
    text = Image.open(first).text
    assert text["parameters"] == (
        "a red / circle\x07 ../../x\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, "
        "CFG scale: 7.5, Seed: 6, Size: 64x64, Model: micro-sd, Version: slimsd 0.1.0"
    )
    stored = json.loads(text["slimsd"])
    assert stored["seed"] == 6 and stored["model_source"] == "micro-sd" and stored["time_s"] > 0
    code, out, err = run_cli(
        ["generate", "--from-png", first, "--out", str(tmp_path / "b"), "--json"], capsys
    )
    assert code == 0, err
    again = json.loads(out)["images"][0]
    assert again["seed"] == 6
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again["path"])))


def test_from_png_runs_in_the_dtype_the_image_records(monkeypatch, tmp_path, capsys):
    """An image made in fp32 (an AVX2 machine's default) reproduces pixel for pixel on a CPU whose default is
    bf16 (forced here with SLIMSD_CPU_DTYPE), and says so; an image made in a dtype the CPU does not run
    (fp16, a GPU's) falls back to the default with a line saying that pixels may differ."""
    monkeypatch.setenv("SLIMSD_CPU_DTYPE", "bf16")
    args = ["generate", "micro-sd", "a red circle", "--steps", "2", "--seed", "5", "--json"]
    code, out, err = run_cli([*args, "--dtype", "fp32", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    first = json.loads(out)["images"][0]["path"]
    pixels = np.asarray(Image.open(first))
    code, out, err = run_cli(
        ["generate", "--from-png", first, "--out", str(tmp_path / "b"), "--json"], capsys
    )
    assert code == 0, err
    again = json.loads(out)
    assert again["settings"]["dtype"] == "fp32" and again["runtime"]["dtype"] == "fp32"
    assert err.strip() == "slimsd: dtype fp32, as the image records (bf16 is this machine's default)"
    assert np.array_equal(pixels, np.asarray(Image.open(again["images"][0]["path"])))
    # what the recorded dtype prevents: the same PNG in bf16 comes back different
    code, out, err = run_cli(
        ["generate", "--from-png", first, "--dtype", "bf16", "--out", str(tmp_path / "c"), "--json"], capsys
    )
    assert code == 0 and err == ""
    assert np.abs(pixels.astype(int) - np.asarray(Image.open(json.loads(out)["images"][0]["path"]))).max() > 0
    # a GPU's fp16 image on the CPU: the default, said in one line
    image = Image.open(first)
    stored = json.loads(image.text["slimsd"]) | {"dtype": "fp16", "device": "cuda"}
    gpu_png = tmp_path / "gpu.png"
    gpu_png.write_bytes(pnginfo.png_bytes(image, pnginfo.Settings(**stored)))
    code, out, err = run_cli(
        ["generate", "--from-png", str(gpu_png), "--out", str(tmp_path / "d"), "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(out)["settings"]["dtype"] == "bf16"
    assert err.strip() == (
        "slimsd: the image was made in fp16, which cpu does not run here; using bf16 instead: pixels may differ"
    )


@pytest.mark.slow
def test_cli_from_png_reproduces_a_deep_cache_image_exactly(tmp_path, capsys):
    args = [
        "generate",
        "micro-sd",
        "a red circle",
        "--steps",
        "4",
        "--seed",
        "5",
        "--scheduler",
        "euler",
        "--json",
    ]
    code, out, err = run_cli([*args, "--deep-cache", "2", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    (first,) = [Image.open(i["path"]) for i in json.loads(out)["images"]]
    assert ", Model: micro-sd, Deep cache: 2, Version: " in first.text["parameters"]
    assert json.loads(first.text["slimsd"])["deep_cache"] == 2
    code, out, err = run_cli([*args, "--out", str(tmp_path / "full")], capsys)
    full = Image.open(json.loads(out)["images"][0]["path"])
    assert "Deep cache" not in full.text["parameters"] and json.loads(full.text["slimsd"])["deep_cache"] == 1
    assert not np.array_equal(np.asarray(first), np.asarray(full))  # the setting decides the pixels
    # --from-png with the JSON chunk, and with only A1111's parameters text (as another tool would keep it)
    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", first.text["parameters"])
    first.save(a1111, pnginfo=info)
    for png, out_dir in ((first.filename, "b"), (str(a1111), "c")):
        code, out, err = run_cli(
            ["generate", "--from-png", png, "--out", str(tmp_path / out_dir), "--json"], capsys
        )
        assert code == 0, err
        again = json.loads(out)
        assert again["settings"]["deep_cache"] == 2
        assert np.array_equal(np.asarray(first), np.asarray(Image.open(again["images"][0]["path"])))


@pytest.mark.slow
def test_png_metadata_round_trip_on_sdxl(micro_sdxl, tmp_path):
    results = g.generate(
        micro_sdxl,
        "a small yellow star",
        negative="dark",
        seed=42,
        scheduler="dpm++2m-karras",
        width=64,
        height=72,
        **FAST,
    )
    (path,) = outputs.save_images(results, tmp_path)
    stored = pnginfo.settings_from_png(path)
    parsed = pnginfo.parse_a1111(Image.open(path).text["parameters"])
    for key in ("prompt", "negative_prompt", "steps", "guidance", "width", "height", "seed", "scheduler"):
        assert parsed[key] == stored[key], key
    again = g.generate(
        micro_sdxl,
        stored["prompt"],
        negative=stored["negative_prompt"],
        steps=stored["steps"],
        guidance=stored["guidance"],
        width=stored["width"],
        height=stored["height"],
        seed=stored["seed"],
        scheduler=stored["scheduler"],
    )[0]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(again.image))


def test_parse_a1111_quoted_model_and_multiline_prompts():
    s = pnginfo.Settings(
        prompt="line one\nline two",
        negative_prompt="bad, ugly",
        steps=30,
        guidance=6.0,
        width=512,
        height=768,
        seed=123,
        scheduler="dpm++2m-karras",
        model="/models/my, model",
        slimsd_version="x",
    )
    parsed = pnginfo.parse_a1111(s.a1111_parameters())
    assert parsed == {
        "prompt": "line one\nline two",
        "negative_prompt": "bad, ugly",
        "steps": 30,
        "guidance": 6.0,
        "seed": 123,
        "width": 512,
        "height": 768,
        "scheduler": "dpm++2m-karras",
        "model": "/models/my, model",
    }
    s.deep_cache = 3
    assert ', Model: "/models/my, model", Deep cache: 3, Version: slimsd x' in s.a1111_parameters()
    assert pnginfo.parse_a1111(s.a1111_parameters()) == {**parsed, "deep_cache": 3}
    a1111 = "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 9, Size: 512x512"
    assert pnginfo.parse_a1111(a1111)["scheduler"] == "dpm++2m-karras"
    with pytest.raises(SlimsdError, match="Steps"):
        pnginfo.parse_a1111("just a caption")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", "a-red-circle"),
        ("../../etc/passwd", "etc-passwd"),
        ("C:\\Windows\\x\x00\x1b[31m", "c-windows-x-31m"),
        ("", "image"),
        ("/// ...", "image"),
        ("café ünïcode 猫", "cafe-unicode"),
    ],
)
def test_safe_stem(text, expected):
    assert outputs.safe_stem(text) == expected


def test_safe_stem_is_length_limited_and_files_never_overwritten(tmp_path):
    assert len(outputs.safe_stem("word " * 100)) <= 60
    a = write_new_file(tmp_path, "00000-1-x", ".png", b"first")
    b = write_new_file(tmp_path, "00000-1-x", ".png", b"second")
    assert a != b and a.read_bytes() == b"first" and b.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-1-x-1.png", "00000-1-x.png"]  # no temp files
    assert outputs.next_index(tmp_path) == 1


def test_grid_holds_every_image():
    ims = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    grid = make_grid(ims)
    assert grid.size == (16, 16)
    assert grid.getpixel((12, 4)) == (0, 128, 0) and grid.getpixel((4, 12)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 100}, "width 100"),
        ({"height": 4096}, "height 4096"),
        ({"steps": 0}, "steps 0"),
        ({"guidance": 51.0}, "guidance 51"),
        ({"guidance": float("nan")}, "guidance nan"),
        ({"seed": -2}, "seed -2"),
        ({"scheduler": "heun"}, "unknown scheduler 'heun'; allowed: ddim"),
        ({"deep_cache": 0}, "deep-cache 0 is out of range; allowed: 1 to 50"),
        ({"deep_cache": 51}, "deep-cache 51 is out of range"),
    ],
)
def test_validate_refuses_bad_settings(kwargs, match):
    args = {"steps": 2, "guidance": 7.5, "width": 64, "height": 64, "seed": 0} | kwargs
    with pytest.raises(SlimsdError, match=match):
        g.validate(**args)


def test_long_prompt_warns_it_was_truncated(micro_sd):
    seen = []
    g.generate(micro_sd, "red circle " * 60, steps=1, seed=0, on_warning=seen.append)
    assert len(seen) == 1 and "truncated" in seen[0] and "77" in seen[0]


def test_load_defaults_and_errors(cpu_default):
    pipe = load("micro-sd", scheduler="unipc")
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[cpu_default]
    assert pipe.device.type == "cpu" and pipe.unet.dtype == want and pipe.vae.dtype == want
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe._slimsd["default_scheduler"] == "unipc"  # generate() uses it when given none
    (r,) = g.generate(pipe, "a red circle", steps=2, seed=1)
    assert r.settings.scheduler == "unipc" and type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe._slimsd["base_scheduler"]["skip_prk_steps"] is True  # the model's own (PNDM), remembered
    with pytest.raises(SlimsdError, match="unknown scheduler 'fast'"):
        load("micro-sd", scheduler="fast")
    with pytest.raises(SlimsdError, match="fp16' is not supported on the CPU"):
        load("micro-sd", dtype="fp16")
    with pytest.raises(SlimsdError, match="unknown model"):
        load("no-such-model")


def test_sdxl_vae_upcasts_in_fp16():
    pipe = load("micro-sdxl", device="cpu", dtype=torch.float16)
    assert pipe.vae.config.force_upcast is True


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["micro-sd", "x", "--width", "63"], "width 63 is not allowed"),
        (["micro-sd", "x", "--scheduler", "heun"], "unknown scheduler 'heun'"),
        (["micro-sd", "x", "--steps", "many"], "'many' is not a valid integer"),
        (["micro-sd", "x", "--deep-cache", "0"], "deep-cache 0 is out of range; allowed: 1 to 50"),
        (["micro-sd", "x", "--deep-cache", "51"], "deep-cache 51 is out of range; allowed: 1 to 50"),
        (["micro-sd", "x", "--deep-cache", "x"], "'--deep-cache': 'x' is not a valid integer"),
        (["not-a-model", "x"], "unknown model 'not-a-model'"),
        (["micro-sd"], "missing PROMPT"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, match, capsys, tmp_path):
    code, _out, err = run_cli(["generate", *argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_ddim_never_clips_latents_the_model_config_does_not_mention(micro_sd):
    """DDIMScheduler's class default clips x̂₀ to [-1, 1] (for pixel models); a latent model's config that says
    nothing about it must sample unclipped: x̂₀ = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t), DDIM eq. 12."""
    pipe = micro_sd
    before = pipe.scheduler
    info = getattr(pipe, "_slimsd", None)
    saved = info["base_scheduler"] if info else None
    try:
        base = {k: v for k, v in dict(before.config).items() if k != "clip_sample"}
        if info:
            info["base_scheduler"] = base
        else:
            pipe.scheduler = type(before).from_config(base)
        schedulers.set_scheduler(pipe, "ddim")
        ddim = pipe.scheduler
        ddim.set_timesteps(10)
        t = ddim.timesteps[0]
        x_t, eps = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), -2.0)
        a = ddim.alphas_cumprod[t]
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        assert x0.abs().min() > 1  # clipping would show
        out = ddim.step(eps, t, x_t)
        torch.testing.assert_close(out.pred_original_sample, x0)
    finally:
        pipe.scheduler = before
        if info:
            info["base_scheduler"] = saved

"""img2img and inpainting: slimsd's generate() against plain diffusers on the same components and seed, the PNG
info, `slimsd generate --init-image/--mask/--strength` with --from-png, and bad input."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.run import generate as g
from slimsd.run import pnginfo

from helpers import run_cli

PROMPT = "a red circle"


def as_int(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An init image of an odd size (so it is resized), a mask of the same size, as files."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (84, 76, 3), dtype=np.uint8))  # 76x84
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (8, 10, 30, 40))
    init.save(folder / "init.png")
    mask.save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def plain(cls_name: str, pipe):
    """The diffusers pipeline CLS_NAME on PIPE's very components (no slimsd code in between)."""
    import diffusers

    task = getattr(diffusers, cls_name)(**pipe.components)
    task.set_progress_bar_config(disable=True)
    return task


def lanczos(path, size, mode="RGB"):
    """The documented resize, done here by hand: stretched to SIZE with PIL's Lanczos."""
    return Image.open(path).convert(mode).resize(size, Image.Resampling.LANCZOS)


@pytest.mark.parametrize(
    ("name", "cls_name"),
    [("micro_sd", "StableDiffusionImg2ImgPipeline"), ("micro_sdxl", "StableDiffusionXLImg2ImgPipeline")],
)
def test_img2img_equals_plain_diffusers_on_the_same_components_and_seed(name, cls_name, inputs, request):
    pipe = request.getfixturevalue(name)
    init, _ = inputs
    results = g.generate(pipe, PROMPT, init_image=init, strength=0.6, steps=4, seed=3, num_images=2)
    assert (results[1].settings.width, results[1].settings.height) == (72, 80)  # 76x84 rounded down to 8s
    expected = plain(cls_name, pipe)(
        prompt=[PROMPT],
        image=lanczos(init, (72, 80)),
        strength=0.6,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(4)],  # image 1 uses seed 3 + 1
        width=72,
        height=80,
    ).images[0]
    assert np.array_equal(as_int(results[1].image), as_int(expected))
    assert not np.array_equal(as_int(results[0].image), as_int(expected))  # seed 3 is another image


def test_inpainting_with_a_4_channel_unet_equals_plain_diffusers(micro_sd, inputs):
    init, mask = inputs
    (r,) = g.generate(
        micro_sd, PROMPT, init_image=init, mask=mask, strength=0.8, steps=3, seed=5, width=64, height=64
    )
    expected = plain("StableDiffusionInpaintPipeline", micro_sd)(
        prompt=[PROMPT],
        image=lanczos(init, (64, 64)),
        mask_image=lanczos(mask, (64, 64), "L"),
        strength=0.8,
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(5)],
        width=64,
        height=64,
    ).images[0]
    assert np.array_equal(as_int(r.image), as_int(expected))
    img2img = g.generate(
        micro_sd, PROMPT, init_image=init, strength=0.8, steps=3, seed=5, width=64, height=64
    )
    assert not np.array_equal(as_int(r.image), as_int(img2img[0].image))  # the mask is used


def test_a_9_channel_inpainting_unet_gets_the_mask_and_without_one_repaints_everything(micro_sd, inputs):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from slimsd.models.presets import get_preset

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**get_preset("micro-sd").unet, "in_channels": 9}).eval()
    pipe = StableDiffusionInpaintPipeline(**{**micro_sd.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    init, mask = inputs
    white = Image.new("L", (64, 64), 255)
    for given, expected_mask in ((mask, lanczos(mask, (64, 64), "L")), (None, white)):
        (r,) = g.generate(
            pipe, PROMPT, init_image=init, mask=given, strength=1.0, steps=2, seed=1, width=64, height=64
        )
        expected = plain("StableDiffusionInpaintPipeline", pipe)(
            prompt=[PROMPT],
            image=lanczos(init, (64, 64)),
            mask_image=expected_mask,
            strength=1.0,
            num_inference_steps=2,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(1)],
            width=64,
            height=64,
        ).images[0]
        assert np.array_equal(as_int(r.image), as_int(expected))


def test_png_info_says_denoising_strength_and_records_the_files(micro_sd, inputs, tmp_path):
    from slimsd.run.outputs import save_images

    init, mask = inputs
    results = g.generate(micro_sd, PROMPT, init_image=init, mask=mask, strength=0.5, steps=4, seed=2)
    (path,) = save_images(results, tmp_path)
    text = Image.open(path).text
    assert text["parameters"] == (
        "a red circle\nSteps: 4, Sampler: PLMS, CFG scale: 7.5, Seed: 2, Size: 72x80, Model: StableDiffusionPipeline, "
        "Denoising strength: 0.5, Version: slimsd 0.1.0"
    )
    assert pnginfo.parse_a1111(text["parameters"])["strength"] == 0.5
    stored = json.loads(text["slimsd"])
    for key, file in (("init_image", init), ("mask", mask)):
        assert stored[key] == {
            "name": file.name,
            "path": str(file.resolve()),
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        }
    assert stored["strength"] == 0.5 and stored["controlnet"] is None


def test_txt2img_png_info_is_unchanged(micro_sd):
    (r,) = g.generate(micro_sd, PROMPT, steps=1, seed=0)
    assert "Denoising strength" not in r.settings.a1111_parameters() and r.settings.strength is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": 0.0}, "strength 0.0 is out of range; allowed: above 0, up to 1"),
        ({"strength": 1.5}, "strength 1.5 is out of range"),
        ({"strength": 0.2, "steps": 4}, "strength 0.2 with 4 steps runs no denoising step"),
        ({"mask": "mask"}, None),
    ],
)
def test_generate_refuses_bad_img2img_settings(micro_sd, inputs, kwargs, match):
    init, mask = inputs
    if "mask" in kwargs:  # a mask of another size than the init image
        small = Image.new("L", (8, 8), 255)
        with pytest.raises(
            SlimsdError, match=r"mask '\(in memory\)' is 8x8 but init image 'init.png' is 76x84"
        ):
            g.generate(micro_sd, PROMPT, init_image=init, mask=small, steps=2)
        with pytest.raises(SlimsdError, match="a mask needs an init image"):
            g.generate(micro_sd, PROMPT, mask=mask, steps=2)
        with pytest.raises(SlimsdError, match="strength applies to img2img"):
            g.generate(micro_sd, PROMPT, strength=0.5, steps=2)
        return
    with pytest.raises(SlimsdError, match=match):
        g.generate(micro_sd, PROMPT, init_image=init, **({"steps": 2} | kwargs))


@pytest.mark.slow
def test_cli_from_png_reproduces_an_inpainted_image_from_the_recorded_or_given_files(
    inputs, tmp_path, capsys
):
    init, mask = inputs
    here = tmp_path / "init.png"  # a copy this test may move and change
    shutil.copy(init, here)
    args = ["generate", "micro-sd", PROMPT, "--steps", "4", "--seed", "7", "--json"]
    code, out, err = run_cli(
        [
            *args,
            "--init-image",
            str(here),
            "--mask",
            str(mask),
            "--strength",
            "0.75",
            "--out",
            str(tmp_path / "a"),
        ],
        capsys,
    )
    assert code == 0, err
    first = json.loads(out)["images"][0]["path"]
    assert "Denoising strength: 0.75" in Image.open(first).text["parameters"]

    def again(out_dir, *extra):
        return run_cli(
            ["generate", "--from-png", first, "--out", str(tmp_path / out_dir), "--json", *extra], capsys
        )

    code, out, err = again("b")  # the files at their recorded paths
    assert code == 0, err
    assert np.array_equal(as_int(Image.open(first)), as_int(Image.open(json.loads(out)["images"][0]["path"])))
    moved = tmp_path / "moved.png"
    here.rename(moved)
    code, out, err = again("c")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "init image 'init.png', which is not at its recorded path" in err and "--init-image FILE" in err
    code, out, err = again("d", "--init-image", str(moved))  # given again
    assert code == 0, err
    assert np.array_equal(as_int(Image.open(first)), as_int(Image.open(json.loads(out)["images"][0]["path"])))
    Image.new("RGB", (76, 84), "blue").save(here)  # another file at the recorded path
    code, out, err = again("e")
    assert code == 2 and "has changed: its sha256 is" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--init-image", "{missing}"], "init image '{missing}' does not exist"),
        (["--init-image", "{text}"], "init image '{text}' is not a readable image"),
        (
            ["--init-image", "{init}", "--strength", "0"],
            "strength 0.0 is out of range; allowed: above 0, up to 1",
        ),
        (["--init-image", "{init}", "--strength", "1.01"], "strength 1.01 is out of range"),
        (["--init-image", "{init}", "--strength", "x"], "'--strength': 'x' is not a valid float"),
        (["--strength", "0.5"], "--strength applies to img2img: give --init-image FILE with it"),
        (["--mask", "{mask}"], "a mask needs an init image"),
        (
            ["--init-image", "{init}", "--mask", "{small}"],
            "mask 'small.png' is 8x8 but init image 'init.png' is 76x84",
        ),
        (["--init-image", "{big}"], "width 4000 is not allowed"),
        (["--controlnet", "{dir}"], "--controlnet DIR and --control-image FILE go together"),
        (["--controlnet", "{dir}", "--control-image", "{init}"], "is not a diffusers ControlNet folder"),
        (
            ["--controlnet", "{dir}", "--control-image", "{init}", "--control-scale", "3"],
            "control-scale 3.0 is out",
        ),
    ],
)
def test_cli_bad_img2img_input_is_one_line_and_exit_2(extra, match, inputs, tmp_path, capsys):
    init, mask = inputs
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    Image.new("RGB", (4000, 16)).save(tmp_path / "big.png")
    names = {
        "missing": str(tmp_path / "missing.png"),
        "text": str(tmp_path / "notes.txt"),
        "init": str(init),
        "mask": str(mask),
        "small": str(tmp_path / "small.png"),
        "big": str(tmp_path / "big.png"),
        "dir": str(tmp_path),
    }
    argv = ["generate", "micro-sd", PROMPT, "--steps", "4", "--out", str(tmp_path / "out")]
    code, _out, err = run_cli([*argv, *(e.format(**names) for e in extra)], capsys)
    assert code == 2, err
    assert match.format(**names) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_img2img_with_a_step_distilled_schedule_equals_plain_diffusers(micro_sd, inputs):
    """LCM sampling (a step-distilled student's own): the same pipeline with diffusers' LCMScheduler."""
    from diffusers import LCMScheduler

    init, _ = inputs
    (r,) = g.generate(
        micro_sd, PROMPT, init_image=init, strength=0.5, steps=4, seed=8, guidance=1.0, scheduler="lcm"
    )
    task = plain("StableDiffusionImg2ImgPipeline", micro_sd)
    task.scheduler = LCMScheduler.from_config(micro_sd.scheduler.config)
    expected = task(
        prompt=[PROMPT],
        image=lanczos(init, (72, 80)),
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=[torch.Generator("cpu").manual_seed(8)],
        width=72,
        height=80,
    ).images[0]
    assert np.array_equal(as_int(r.image), as_int(expected))

"""slimsd.run.controlnet: a ControlNet for any U-Net (a mid-block-less BK-SDM student included), generating with it,
and `slimsd generate --controlnet DIR --control-image FILE`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.run import generate as g
from slimsd.run.controlnet import controlnet_for

from helpers import run_cli

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def student():
    """A bk-tiny student compressed from micro-sd: no mid block."""
    from slimsd.models.compress import compress_pipeline
    from slimsd.models.micro import build_micro

    pipe = compress_pipeline(build_micro("micro-sd"), "bk-tiny").pipeline
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.mid_block is None and pipe.unet.config.mid_block_type is None
    return pipe


def control(side: int, size: int = 64) -> Image.Image:
    """An edge-map-like control image: white on the left (SIDE 0) or right (1) half, black elsewhere."""
    image = Image.new("RGB", (size, size), "black")
    image.paste((255, 255, 255), (0, 0, size // 2, size) if side == 0 else (size // 2, 0, size, size))
    return image


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def perturbed(controlnet):
    """CONTROLNET as if trained: random output convs (zero-initialised) and a control image embedding with a
    trained one's gain (a fresh one's features barely depend on the image): the control image now matters."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.5)
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0, 0.3)
    return controlnet


def test_diffusers_from_unet_fails_on_the_student_and_controlnet_for_copies_it(student):
    from diffusers import ControlNetModel

    with pytest.raises(ValueError, match="unknown mid_block_type : None"):
        ControlNetModel.from_unet(student.unet)  # the BK-SDM #64 report
    cn = controlnet_for(student.unet)
    assert type(cn.mid_block).__name__ == "UNetMidBlock2D"  # fresh; its residual goes through a zero conv
    ours = student.unet.state_dict()
    for name, tensor in cn.state_dict().items():
        if name.split(".")[0] in ("conv_in", "time_embedding", "down_blocks"):
            assert torch.equal(tensor, ours[name]), name
    outs = [*cn.controlnet_down_blocks, cn.controlnet_mid_block]
    assert (
        len(cn.controlnet_down_blocks)
        == sum(len(b.resnets) for b in student.unet.down_blocks)
        + sum(b.downsamplers is not None for b in student.unet.down_blocks)
        + 1
    )  # conv_in's residual too: one per residual the student's up blocks take
    assert all(not o.weight.any() and not o.bias.any() for o in outs)


def test_a_fresh_controlnet_leaves_the_student_unchanged_and_a_trained_one_follows_the_image(student):
    cn = controlnet_for(student.unet)
    alone = g.generate(student, PROMPT, steps=2, seed=1)[0]
    with_cn = g.generate(student, PROMPT, steps=2, seed=1, controlnet=cn, control_image=control(0))[0]
    assert np.array_equal(pixels(alone), pixels(with_cn))  # zero residuals: the student's own image
    perturbed(cn)
    a = g.generate(student, PROMPT, steps=2, seed=1, controlnet=cn, control_image=control(0))[0]
    again = g.generate(student, PROMPT, steps=2, seed=1, controlnet=cn, control_image=control(0))[0]
    b = g.generate(student, PROMPT, steps=2, seed=1, controlnet=cn, control_image=control(1))[0]
    assert np.array_equal(pixels(a), pixels(again))
    assert np.abs(pixels(a) - pixels(alone)).max() > 8 and np.abs(pixels(a) - pixels(b)).max() > 8
    weak = g.generate(
        student, PROMPT, steps=2, seed=1, controlnet=cn, control_image=control(0), control_scale=0.0
    )[0]
    assert np.array_equal(pixels(weak), pixels(alone))  # scale 0: no residual at all
    assert ', ControlNet 0: "Module: none, Model: controlnet, Weight: 1", ' in a.settings.a1111_parameters()


def test_controlnet_on_sdxl_starts_from_the_model_alone(micro_sdxl):
    cn = controlnet_for(micro_sdxl.unet)
    alone = g.generate(micro_sdxl, PROMPT, steps=2, seed=4)[0]
    with_cn = g.generate(micro_sdxl, PROMPT, steps=2, seed=4, controlnet=cn, control_image=control(0))[0]
    assert np.array_equal(pixels(alone), pixels(with_cn))
    b = g.generate(micro_sdxl, PROMPT, steps=2, seed=4, controlnet=perturbed(cn), control_image=control(0))[0]
    assert np.abs(pixels(b) - pixels(alone)).max() > 8


def test_bad_controlnet_requests(student):
    from slimsd.models.loading import load

    with pytest.raises(SlimsdError, match="fused attention projections"):
        controlnet_for(load("micro-sd").unet)  # the fast runtime's U-Net
    cn = controlnet_for(student.unet)
    with pytest.raises(SlimsdError, match="a ControlNet needs a control image"):
        g.generate(student, PROMPT, steps=2, controlnet=cn)
    with pytest.raises(SlimsdError, match=r"control-scale 2\.5 is out of range; allowed: 0 to 2"):
        g.generate(student, PROMPT, steps=2, controlnet=cn, control_image=control(0), control_scale=2.5)
    with pytest.raises(SlimsdError, match="deep cache with a ControlNet is not supported"):
        g.generate(student, PROMPT, steps=2, controlnet=cn, control_image=control(0), deep_cache=2)


@pytest.mark.slow
def test_cli_generates_with_a_saved_controlnet_and_from_png_reproduces(tmp_path, capsys):
    from slimsd.models.micro import build_micro

    folder = tmp_path / "cn"
    perturbed(controlnet_for(build_micro("micro-sd").unet)).save_pretrained(folder)
    control(3).save(tmp_path / "edges.png")
    args = ["generate", "micro-sd", PROMPT, "--steps", "2", "--seed", "9", "--json"]
    cn_args = ["--controlnet", str(folder), "--control-image", str(tmp_path / "edges.png")]
    code, out, err = run_cli(
        [*args, *cn_args, "--control-scale", "0.5", "--out", str(tmp_path / "a")], capsys
    )
    assert code == 0, err
    first = json.loads(out)["images"][0]["path"]
    text = Image.open(first).text
    assert ', ControlNet 0: "Module: none, Model: cn, Weight: 0.5", ' in text["parameters"]
    stored = json.loads(text["slimsd"])["controlnet"]
    assert (stored["path"], stored["scale"], stored["image"]["name"]) == (
        str(folder.resolve()),
        0.5,
        "edges.png",
    )
    code, out, err = run_cli([*args, "--out", str(tmp_path / "plain")], capsys)
    plain = np.asarray(Image.open(json.loads(out)["images"][0]["path"]))
    assert not np.array_equal(np.asarray(Image.open(first)), plain)  # the ControlNet was used
    code, out, err = run_cli(
        ["generate", "--from-png", first, "--out", str(tmp_path / "b"), "--json"], capsys
    )
    assert code == 0, err
    assert np.array_equal(
        np.asarray(Image.open(first)), np.asarray(Image.open(json.loads(out)["images"][0]["path"]))
    )

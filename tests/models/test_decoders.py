"""Tiny decoders (models/decoders.py): what slimsd decodes with one is what a plain diffusers pipeline decodes with
``pipe.vae = AutoencoderTiny.from_pretrained(DIR)`` and what its decoder network gives on the U-Net's latents (the
scaling convention, SD and SDXL); the wrong convention (diffusers#4676) is refused; parameters and MACs against
published and hand-counted figures; PNG info records the decoder and --from-png restores it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.models.decoders import build_tiny_decoder, swap_decoder
from slimsd.models.presets import MICRO_VAE
from slimsd.run import generate as g
from slimsd.run import pnginfo

from helpers import run_cli
from helpers import tiny_decoder_folder as decoder_folder

PROMPT = "a red circle"
PIPELINES = {"micro-sd": "StableDiffusionPipeline", "micro-sdxl": "StableDiffusionXLPipeline"}


def as_int(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("model", ["micro-sd", "micro-sdxl"])
def test_slimsd_and_plain_diffusers_decode_the_same_image(tmp_path, model):
    """slimsd.load(vae=DIR) + generate() against plain diffusers on fresh components with its VAE swapped, same
    seed; and the plain pipeline's image against the decoder network run by hand on the U-Net's latents (no
    division by SD's 0.18215 / SDXL's 0.13025 in between), mapped [-1, 1] -> [0, 255] with rounding."""
    import diffusers
    from diffusers import AutoencoderTiny

    from slimsd.models.loading import load
    from slimsd.models.micro import build_micro

    folder = decoder_folder(tmp_path, model)
    pipe = load(model, device="cpu", dtype="fp32", optimize=False, vae=str(folder))
    assert isinstance(pipe.vae, AutoencoderTiny)
    ours = g.generate(pipe, PROMPT, steps=2, guidance=5.0, seed=3, width=64, height=64)[0].image

    plain = getattr(diffusers, PIPELINES[model])(**build_micro(model).components)
    plain.set_progress_bar_config(disable=True)
    plain.vae = AutoencoderTiny.from_pretrained(folder)
    kw = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64}
    theirs = plain(PROMPT, generator=torch.Generator().manual_seed(3), **kw).images[0]
    latents = plain(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    with torch.no_grad():
        x = plain.vae.decoder(latents)[0]  # DecoderTiny: U-Net latents -> [-1, 1]
    by_hand = ((x.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(as_int(ours) - as_int(theirs)).max() <= 1
    assert np.abs(as_int(theirs) - as_int(by_hand)).max() <= 1
    assert as_int(theirs).std() > 1  # an image, not a constant


def test_the_wrong_scaling_convention_and_wrong_latent_spaces_are_refused(tmp_path, micro_sd):
    import copy

    wrong = decoder_folder(tmp_path, "micro-sd", scaling_factor=0.18215)
    with pytest.raises(
        SlimsdError, match=r"scaling_factor 0.18215; a tiny decoder takes the U-Net's latents"
    ):
        swap_decoder(copy.copy(micro_sd), wrong)
    six = tmp_path / "six"
    build_tiny_decoder(
        "micro-tiny-decoder", dict(micro_sd.vae.config) | {"latent_channels": 6}
    ).save_pretrained(six)
    with pytest.raises(SlimsdError, match="decodes 6-channel latents 8x up; the model's VAE 4-channel"):
        swap_decoder(copy.copy(micro_sd), six)
    with pytest.raises(SlimsdError, match="holds no AutoencoderTiny"):
        swap_decoder(copy.copy(micro_sd), tmp_path)


def conv_macs(side: int, c_in: int, c_out: int) -> int:
    return side * side * c_in * c_out * 9


def test_decoder_counts_against_published_and_hand_counted_figures():
    """SD's VAE decoder: 49.49 M parameters (the issue's 49.5 M: post_quant_conv + decoder of
    stabilityai/sd-vae-ft-mse); TAESD's decoder: 1.22 M (madebyollin/taesd). TAESD's MACs at 512 px written out:
    a 4->64 convolution at 64x64, stages of 3-3-3-1 blocks of three 64->64 convolutions at 64, 128, 256, 512 px,
    a 64->64 convolution after each upsampling and a 64->3 one at the end."""
    from slimsd.models.counting import decoder_counts
    from slimsd.models.decoders import meta_decoders
    from slimsd.models.presets import SD_VAE

    full, tiny = meta_decoders(SD_VAE)
    full_params, _ = decoder_counts(full, 512)
    tiny_params, tiny_macs = decoder_counts(tiny, 512)
    assert full_params == pytest.approx(49.49e6, rel=1e-3)
    assert tiny_params == pytest.approx(1.22e6, rel=5e-3)
    macs = conv_macs(64, 4, 64)
    for side, blocks in ((64, 3), (128, 3), (256, 3), (512, 1)):
        macs += blocks * 3 * conv_macs(side, 64, 64)
        macs += conv_macs(side * 2, 64, 64) if side < 512 else conv_macs(512, 64, 3)
    assert tiny_macs == macs


def test_lite_decoder_drops_the_full_resolution_block():
    """lite-decoder is TAESD's without the 512 px stage's block: its MACs written out are TAESD's less three
    64->64 convolutions at 512 px, 20x or more fewer than SD's VAE decoder (the issue's target); it is a plain
    AutoencoderTiny that decodes a latent to an image of the VAE's size."""
    from diffusers import AutoencoderTiny

    from slimsd.models.counting import decoder_counts
    from slimsd.models.decoders import meta_decoders, tiny_decoder_config
    from slimsd.models.presets import SD_VAE

    full, lite = meta_decoders(SD_VAE, "lite-decoder")
    _, full_macs = decoder_counts(full, 512)
    _, lite_macs = decoder_counts(lite, 512)
    macs = conv_macs(64, 4, 64)
    for side in (64, 128, 256):
        macs += 3 * 3 * conv_macs(side, 64, 64) + conv_macs(side * 2, 64, 64)
    assert lite_macs == macs + conv_macs(512, 64, 3)
    assert full_macs / lite_macs >= 20
    small = AutoencoderTiny(**tiny_decoder_config("lite-decoder", MICRO_VAE)).eval()
    with torch.no_grad():
        assert small.decode(torch.zeros(1, 4, 8, 8)).sample.shape == (1, 3, 64, 64)


def test_png_records_the_decoder_and_from_png_restores_it(tmp_path, capsys):
    folder = decoder_folder(tmp_path, "micro-sd")
    out = tmp_path / "out"
    args = [
        "generate",
        "micro-sd",
        PROMPT,
        "--steps",
        "2",
        "--seed",
        "4",
        "--dtype",
        "fp32",
        "--vae",
        str(folder),
    ]
    code, _, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 0, err
    png = next(out.glob("*.png"))
    stored = pnginfo.settings_from_png(png)
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert stored["vae"] == {
        "path": str(folder.resolve()),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    assert f"VAE hash: {stored['vae']['sha256'][:10]}" in pnginfo.read_png_text(png)["parameters"]

    again = tmp_path / "again"
    code, out_text, err = run_cli(
        ["generate", "--from-png", str(png), "--dtype", "fp32", "--out", str(again), "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(out_text)["vae"]["path"] == str(folder.resolve())
    assert np.array_equal(as_int(Image.open(png)), as_int(Image.open(next(again.glob("*.png")))))

    decoder_folder(tmp_path, "micro-sd", latent_magnitude=4)  # rewritten: same path, the config changed...
    other = build_tiny_decoder("micro-tiny-decoder", json.loads((folder / "config.json").read_text()), seed=2)
    other.save_pretrained(folder)  # ... and now the weights
    code, _, err = run_cli(["generate", "--from-png", str(png), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "has changed: its weights' sha256 is" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*args[:-1], str(tmp_path / "missing"), "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "does not exist" in err


def test_img2img_with_a_tiny_decoder_is_one_line(tmp_path, capsys):
    folder = decoder_folder(tmp_path, "micro-sd")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "init.png")
    args = ["generate", "micro-sd", PROMPT, "--steps", "2", "--vae", str(folder), "--init-image"]
    code, _, err = run_cli([*args, str(tmp_path / "init.png"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "a tiny decoder (--vae) only decodes" in err


def test_inspect_shows_both_decoders(tmp_path, capsys):
    """SD 1.x's decoder against TAESD's size at 512 px (published parameter counts, as above); a folder given with
    --vae is the one compared."""
    code, out, err = run_cli(["inspect", "bk-sdm-tiny", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)["decoders"]
    assert d["resolution"] == 512 and d["tiny_decoder"]["source"] == "tiny-decoder"
    assert d["vae_decoder"]["params"] == pytest.approx(49.49e6, rel=1e-3)
    assert d["tiny_decoder"]["params"] == pytest.approx(1.22e6, rel=5e-3)
    folder = decoder_folder(tmp_path, "micro-sd")
    code, out, _ = run_cli(["inspect", "micro-sd", "--vae", str(folder)], capsys)
    params = sum(p.numel() for p in build_tiny_decoder("micro-tiny-decoder", MICRO_VAE).decoder.parameters())
    assert code == 0 and f"tiny decoder  {params:>15,} params" in out
    code, _, err = run_cli(["inspect", "micro-sd", "--vae", str(tmp_path)], capsys)
    assert code == 2 and "holds no AutoencoderTiny" in err

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


def generate_with(vae) -> list[str]:
    """`slimsd generate` of one fixed micro-sd image decoded by VAE (a folder or a file)."""
    return [
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
        str(vae),
    ]


def test_png_records_the_decoder_and_from_png_restores_it(tmp_path, capsys):
    folder = decoder_folder(tmp_path, "micro-sd")
    out = tmp_path / "out"
    args = generate_with(folder)
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


# --- TAESD-layout files (models/taesd_layout.py) --------------------------------------------------------------
# TAESD's decoder as madebyollin/taesd publishes it (taesd.py), written out here: the files slimsd writes must
# load into it with load_state_dict(strict=True), and its state dicts must read back through --vae FILE.


class Clamp(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def conv3(n_in: int, n_out: int, bias: bool = True) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Block(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        relu = torch.nn.ReLU
        self.conv = torch.nn.Sequential(conv3(n, n), relu(), conv3(n, n), relu(), conv3(n, n))
        self.skip = torch.nn.Identity()
        self.fuse = relu()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def published_taesd_decoder() -> torch.nn.Sequential:
    """TAESD's Decoder for SD 1.x/2.x and SDXL latents, as published: 64 channels, 3-3-3-1 blocks."""
    up = torch.nn.Upsample
    return torch.nn.Sequential(
        Clamp(), conv3(4, 64), torch.nn.ReLU(),
        Block(64), Block(64), Block(64), up(scale_factor=2), conv3(64, 64, bias=False),
        Block(64), Block(64), Block(64), up(scale_factor=2), conv3(64, 64, bias=False),
        Block(64), Block(64), Block(64), up(scale_factor=2), conv3(64, 64, bias=False),
        Block(64), conv3(64, 3),
    )  # fmt: skip


def taesd_decoder(blocks: tuple[int, ...], n: int) -> torch.nn.Sequential:
    """TAESD's Decoder with BLOCKS blocks per stage and N channels (the sizes of slimsd's presets)."""
    layers = [Clamp(), conv3(4, n), torch.nn.ReLU()]
    for stage, count in enumerate(blocks):
        layers += [Block(n) for _ in range(count)]
        if stage < len(blocks) - 1:
            layers += [torch.nn.Upsample(scale_factor=2), conv3(n, n, bias=False)]
    return torch.nn.Sequential(*layers, conv3(n, 3))


# preset -> (blocks per stage, channels, the VAE whose latent space it decodes), as the presets are documented
SIZES = {
    "tiny-decoder": ((3, 3, 3, 1), 64, "SD_VAE"),
    "lite-decoder": ((3, 3, 3, 0), 64, "SD_VAE"),
    "micro-tiny-decoder": ((2, 2, 2, 1), 16, "MICRO_VAE"),
}


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def preset_folder(tmp_path, name: str, info: dict | None = None):
    """A seeded decoder of preset NAME saved as a `vae-decoder` run's final/ is: AutoencoderTiny + slimsd.json."""
    from slimsd.models import presets

    folder = tmp_path / name
    build_tiny_decoder(name, getattr(presets, SIZES[name][2]), seed=5).save_pretrained(folder)
    if info is not None:
        (folder / "slimsd.json").write_text(json.dumps(info))
    return folder


def test_the_written_out_decoder_is_the_published_one():
    """The parametrised decoder above at TAESD's sizes has exactly the published one's tensors."""
    assert shapes(taesd_decoder((3, 3, 3, 1), 64).state_dict()) == shapes(
        published_taesd_decoder().state_dict()
    )


@pytest.mark.parametrize("name", list(SIZES))
def test_exported_file_loads_into_taesd_and_decodes_as_diffusers(tmp_path, capsys, name):
    """`slimsd export DIR --to single-file`: the file loads strictly into TAESD's decoder, which decodes latents
    to what diffusers' AutoencoderTiny from the folder decodes (TAESD [0, 1] -> diffusers [-1, 1]); fp16 by
    default; its header carries the folder's config and slimsd.json, and reading it back gives the folder's."""
    from diffusers import AutoencoderTiny
    from safetensors import safe_open
    from safetensors.torch import load_file

    from slimsd.models.decoders import load_decoder, read_decoder_info

    info = {"kind": "tiny-decoder", "teacher": "micro-sd", "latent_scaling": "unet-latents", "decoder": name}
    folder = preset_folder(tmp_path, name, info)
    out = tmp_path / "d.safetensors"
    code, text, err = run_cli(
        ["export", str(folder), "--to", "single-file", "--dtype", "fp32", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert text.splitlines() == [f"wrote {out} (fp32, tiny decoder, TAESD layout)"]
    blocks, n, _ = SIZES[name]
    taesd = taesd_decoder(blocks, n)
    taesd.load_state_dict(load_file(out), strict=True)
    if name == "tiny-decoder":  # TAESD's own sizes: the file the tools' fixed TAESD decoder loads
        published_taesd_decoder().load_state_dict(load_file(out), strict=True)
    else:  # other sizes do not fit it (README: only tiny-decoder files go to ComfyUI, A1111, SD.Next)
        with pytest.raises(RuntimeError):
            published_taesd_decoder().load_state_dict(load_file(out), strict=True)
    theirs = AutoencoderTiny.from_pretrained(folder).eval()
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        want = theirs.decode(z).sample
        got = taesd(z) * 2 - 1
        back = load_decoder(out).decode(z).sample
    assert want.std() > 0.01
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(back, want)  # fp32: the very same weights

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    config = json.loads((folder / "config.json").read_text())
    assert json.loads(meta["slimsd.decoder_config"]) == {
        k: v for k, v in config.items() if not k.startswith("_")
    }
    assert json.loads(meta["slimsd.info"]) == info == read_decoder_info(out)
    loaded = dict(load_decoder(out).config)
    assert {k: loaded[k] for k in config if not k.startswith("_")} == {
        k: v for k, v in config.items() if not k.startswith("_")
    }

    half = tmp_path / "h.safetensors"
    assert run_cli(["export", str(folder), "--to", "single-file", "--out", str(half)], capsys)[0] == 0
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}


@pytest.mark.parametrize("model", ["micro-sd", "micro-sdxl"])
def test_a_published_taesd_file_decodes_as_plain_diffusers(tmp_path, model):
    """A file in TAESD's layout with no slimsd header (TAESD's decoder above, random weights: what
    madebyollin's taesd_decoder / taesdxl_decoder.safetensors are) read through slimsd.load(vae=FILE) gives the
    image plain diffusers gives with pipe.vae = AutoencoderTiny() (TAESD's sizes, diffusers' defaults) holding
    those weights, put there by diffusers' own converter rule (decoder.layers.{i - 1} = TAESD's {i})."""
    import diffusers
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    from slimsd.models.loading import load
    from slimsd.models.micro import build_micro

    torch.manual_seed(11)
    taesd = published_taesd_decoder()
    for p in taesd.parameters():  # weights that make an image, not a saturated blank
        p.data.mul_(0.7)
    state = {k: v.contiguous() for k, v in taesd.state_dict().items()}
    file = tmp_path / "taesd_decoder.safetensors"
    save_file(state, file)  # no metadata

    pipe = load(model, device="cpu", dtype="fp32", optimize=False, vae=str(file))
    assert isinstance(pipe.vae, AutoencoderTiny)
    ours = g.generate(pipe, PROMPT, steps=2, guidance=5.0, seed=3, width=64, height=64)[0].image

    plain = getattr(diffusers, PIPELINES[model])(**build_micro(model).components)
    plain.set_progress_bar_config(disable=True)
    plain.vae = AutoencoderTiny()
    converted = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        converted[f"{int(index) - 1}.{rest}"] = value
    plain.vae.decoder.layers.load_state_dict(converted, strict=True)
    kw = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64}
    theirs = plain(PROMPT, generator=torch.Generator().manual_seed(3), **kw).images[0]
    assert np.abs(as_int(ours) - as_int(theirs)).max() <= 1
    assert as_int(theirs).std() > 1


def test_folder_then_file_generates_what_the_folder_does(tmp_path):
    """folder -> export (fp32) -> generate --vae FILE: pixel for pixel the image generate --vae DIR makes."""
    from slimsd.models.loading import load
    from slimsd.models.single_file_export import export_decoder_file

    folder = decoder_folder(tmp_path, "micro-sdxl")
    file = export_decoder_file(folder, tmp_path / "d.safetensors", dtype="fp32")
    images = []
    for vae in (folder, file):
        pipe = load("micro-sdxl", device="cpu", dtype="fp32", optimize=False, vae=str(vae))
        images.append(
            as_int(g.generate(pipe, PROMPT, steps=2, guidance=5.0, seed=8, width=64, height=64)[0].image)
        )
    assert np.array_equal(images[0], images[1]) and images[0].std() > 1


def test_png_records_a_decoder_file_and_from_png_restores_it(tmp_path, capsys):
    from slimsd.models.single_file_export import export_decoder_file

    file = export_decoder_file(decoder_folder(tmp_path, "micro-sd"), tmp_path / "d.safetensors")
    args = generate_with(file)
    code, _, err = run_cli([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    png = next((tmp_path / "out").glob("*.png"))
    want = {"path": str(file.resolve()), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    assert pnginfo.settings_from_png(png)["vae"] == want
    again = tmp_path / "again"
    code, _, err = run_cli(
        ["generate", "--from-png", str(png), "--dtype", "fp32", "--out", str(again)], capsys
    )
    assert code == 0, err
    assert np.array_equal(as_int(Image.open(png)), as_int(Image.open(next(again.glob("*.png")))))

    other = tmp_path / "other"
    build_tiny_decoder("micro-tiny-decoder", MICRO_VAE, seed=9).save_pretrained(other)
    export_decoder_file(other, file, overwrite=True)  # the same path, other weights
    code, _, err = run_cli(["generate", "--from-png", str(png), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "has changed: its weights' sha256 is" in err and len(err.strip().splitlines()) == 1
    file.unlink()
    code, _, err = run_cli(["generate", "--from-png", str(png), "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "which is not there any more" in err and len(err.strip().splitlines()) == 1


def test_bad_decoder_files_are_one_line(tmp_path, capsys):
    """Not safetensors, not TAESD's keys, a header that contradicts the tensors, another latent space, another
    suffix: one line naming the file and what is expected, exit 2, nothing generated."""
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    keys = tmp_path / "keys.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, keys)
    state = {k: v.contiguous() for k, v in taesd_decoder((1, 1, 1, 1), 8).state_dict().items()}
    gap = tmp_path / "gap.safetensors"  # a stage's conv where a block should be
    save_file({k: v for k, v in state.items() if not k.startswith("3.")}, gap)
    six = tmp_path / "six.safetensors"
    save_file(state | {"1.weight": torch.zeros(8, 6, 3, 3)}, six)
    lying = tmp_path / "lying.safetensors"
    config = {"num_decoder_blocks": [2, 1, 1, 1], "decoder_block_out_channels": [8] * 4}
    save_file(state, lying, metadata={"slimsd.decoder_config": json.dumps(config)})
    pth = tmp_path / "taesd_decoder.pth"
    torch.save(state, pth)
    cases = [
        (junk, "is not a readable safetensors file"),
        (keys, "tensor 'decoder.conv_in.weight' is not in TAESD's layout"),
        (gap, "its tensors are not TAESD's decoder sequence"),
        (six, "decodes 6-channel latents 8x up; the model's VAE 4-channel latents"),
        (lying, "its header's config says"),
        (pth, "is not a .safetensors file"),
    ]
    for file, needle in cases:
        out = tmp_path / f"out-{file.stem}"
        code, _, err = run_cli(
            ["generate", "micro-sd", PROMPT, "--steps", "1", "--vae", str(file), "--out", str(out)], capsys
        )
        assert code == 2 and needle in err, (file, err)
        assert str(file) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists() or not any(out.iterdir())
    code, _, err = run_cli(["inspect", "micro-sd", "--vae", str(keys)], capsys)
    assert code == 2 and "expected a tiny decoder in TAESD's layout" in err


def test_inspect_counts_a_decoder_file(tmp_path, capsys):
    """inspect --vae FILE: the file's decoder parameters (a third-party file: the sizes read from its keys)."""
    from safetensors.torch import save_file

    small = taesd_decoder((1, 2, 0, 1), 8)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, tmp_path / "d.safetensors")
    code, out, err = run_cli(["inspect", "micro-sd", "--vae", str(tmp_path / "d.safetensors")], capsys)
    params = sum(p.numel() for p in small.parameters())
    assert code == 0 and f"tiny decoder  {params:>15,} params" in out, err

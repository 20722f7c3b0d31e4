"""Full-size architectures on the meta device: the published sizes, reproduced."""

import json

import pytest

from slimsd.models.counting import summarize

from helpers import run_cli

# (preset, U-Net parameters exactly, U-Net MACs at 512 px in G or None): BK-SDM Table 1 and the model cards.
PUBLISHED = [
    ("sd-v1.4", 859_520_964, 338.7),
    ("bk-sdm-base", 579_384_964, 223.8),
    ("bk-sdm-small", 482_346_884, 217.7),
    ("bk-sdm-tiny", 323_384_964, 205.0),
    ("segmind-small-sd", 579_384_964, None),  # published config: the BK-SDM base layout
    ("segmind-tiny-sd", 323_384_964, None),  # published config: the BK-SDM tiny layout
    ("sdxl-base-1.0", 2_567_463_684, None),
    ("sd-v2.1-base", 865_910_724, None),
]


@pytest.mark.parametrize(("name", "params", "macs_g"), PUBLISHED)
def test_published_unet_sizes(name, params, macs_g):
    s = summarize(name, 512)
    assert s["unet_params"] == params
    if macs_g is not None:
        assert abs(s["unet_macs"] / 1e9 - macs_g) / macs_g < 0.005


def test_ssd1b_and_vega_match_their_published_sizes():
    ssd = summarize("ssd-1b")
    assert ssd["resolution"] == 1024
    assert abs(ssd["unet_params"] - 1.3e9) / 1.3e9 < 0.03  # "1.3B": 50% of SDXL's 2.57B
    vega = summarize("segmind-vega")
    # Segmind: 745M in all; down 247M, mid 31M, up 460M.
    assert round(vega["unet_params"] / 1e6) == 745
    blocks = vega["unet_blocks"]
    assert (round(blocks["down"] / 1e6), round(blocks["mid"] / 1e6), round(blocks["up"] / 1e6)) == (
        247,
        31,
        460,
    )


def test_text_encoder_and_vae_sizes():
    sd = summarize("sd-v1.4")
    assert sd["text_encoder_params"] == 123_060_480  # CLIP ViT-L/14 text tower
    assert sd["vae_params"] == 83_653_863
    assert sd["total_params"] == sd["unet_params"] + sd["text_encoder_params"] + sd["vae_params"]
    xl = summarize("sdxl-base-1.0")
    assert xl["text_encoder_params_each"] == [123_060_480, 694_659_840]  # CLIP-L + OpenCLIP bigG (projection)


def test_macs_scale_with_resolution():
    a, b = summarize("bk-sdm-tiny", 256)["unet_macs"], summarize("bk-sdm-tiny", 512)["unet_macs"]
    assert (
        3.5 < b / a < 4.5
    )  # convolutions scale with the latent area; cross-attention k/v projections do not


def test_inspect_cli_json_fields(capsys):
    code, out, _ = run_cli(["inspect", "bk-sdm-small", "--resolution", "512", "--json"], capsys)
    assert code == 0
    s = json.loads(out)
    for key in ("unet_params", "unet_macs", "text_encoder_params", "vae_params", "total_params"):
        assert isinstance(s[key], int) and s[key] > 0
    assert s["unet_params"] == 482_346_884


def test_inspect_reads_a_local_folder(tmp_path, micro_sd, capsys):
    micro_sd.save_pretrained(tmp_path / "m", safe_serialization=True)
    code, out, _ = run_cli(["inspect", str(tmp_path / "m"), "--json"], capsys)
    assert code == 0
    s = json.loads(out)
    assert s["unet_params"] == sum(p.numel() for p in micro_sd.unet.parameters())
    assert s["text_encoder_params"] == sum(p.numel() for p in micro_sd.text_encoder.parameters())
    assert s["vae_params"] == sum(p.numel() for p in micro_sd.vae.parameters())


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "no-such-model"],
        ["inspect", "sd-v1.4", "--resolution", "20"],
        ["inspect", "sd-v1.4", "--resolution", "100"],
    ],
)
def test_inspect_bad_input_is_one_line_exit_2(args, capsys):
    code, _out, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err

"""Single-file checkpoints: export -> import is exact, diffusers' own converter reads our exports, the U-Net
architecture is read from the tensor names, and bad files are one line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimsd.errors import SlimsdError
from slimsd.models.loading import load
from slimsd.models.single_file import load_single_file, read_unet_config
from slimsd.models.single_file_export import export_single_file

from helpers import FAST_DISTILL, run_cli

# (teacher, recipe): the unmodified micro teachers and a student of each recipe
LAYOUTS = [
    ("micro-sd", None),
    ("micro-sdxl", None),
    ("micro-sd", "bk-base"),
    ("micro-sd", "bk-small"),
    ("micro-sd", "bk-tiny"),
    ("micro-sdxl", "ssd-1b"),
    ("micro-sdxl", "vega"),
]
IDS = [r or t for t, r in LAYOUTS]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """layout id -> (diffusers folder, our fp32 export of it)."""
    from slimsd.models.compress import compress

    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for (teacher, recipe), name in zip(LAYOUTS, IDS, strict=True):
        folder = root / name
        if recipe is None:
            load(teacher, device="cpu", dtype="fp32", optimize=False).save_pretrained(folder)
        else:
            compress(teacher, recipe, folder)
        out[name] = (folder, export_single_file(str(folder), root / f"{name}.safetensors", dtype="fp32"))
    return out


def _folder(folder):
    return load(str(folder), device="cpu", dtype="fp32", optimize=False)


def _assert_same_tensors(a, b, names=COMPONENTS):
    for name in names:
        if getattr(a, name, None) is None:
            assert getattr(b, name, None) is None
            continue
        sa = {k: v for k, v in getattr(a, name).state_dict().items() if not k.endswith("position_ids")}
        sb = {k: v for k, v in getattr(b, name).state_dict().items() if not k.endswith("position_ids")}
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def _seeded_image(pipe):
    """The image of 2 seeded steps. Every weight is first copied to fresh storage: the same numbers at another
    memory alignment (diffusers maps its files unaligned) take other CPU kernels, off in the last float bit."""
    for name in COMPONENTS:
        for t in getattr(pipe, name).parameters() if getattr(pipe, name, None) is not None else ():
            t.data = t.data.clone()
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    return image


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", IDS)
def test_round_trip_is_exact(exported, name):
    folder, file = exported[name]
    ours, ref = load(str(file), device="cpu", dtype="fp32", optimize=False), _folder(folder)
    _assert_same_tensors(ref, ours)
    assert _public(ours.unet.config) == _public(ref.unet.config)
    assert _public(ours.vae.config) == _public(ref.vae.config)
    assert _public(ours.scheduler.config) == _public(ref.scheduler.config)
    for part in ("text_encoder", "text_encoder_2"):
        if getattr(ref, part, None) is not None:
            a, b = getattr(ref, part).config, getattr(ours, part).config
            assert (a.num_attention_heads, a.hidden_act, a.eos_token_id) == (
                b.num_attention_heads,
                b.hidden_act,
                b.eos_token_id,
            )


@pytest.mark.parametrize("name", ["micro-sd", "bk-small", "ssd-1b"])
def test_image_from_file_equals_image_from_folder(exported, name):
    folder, file = exported[name]
    a = _seeded_image(load(str(file), device="cpu", dtype="fp32", optimize=False))
    b = _seeded_image(_folder(folder))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", IDS)
def test_diffusers_from_single_file_reads_our_export(exported, name):
    """diffusers' own converter (code we did not write) turns our file into the folder's weights and image."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    folder, file = exported[name]
    sdxl = "sdxl" in name or name in ("ssd-1b", "vega")
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    theirs = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    if sdxl:
        # diffusers picks the file's encoder for text_encoder_2 by width; the micro models' two encoders are
        # equally wide (32), so it takes embedders.0. Its OpenCLIP converter, called on embedders.1, decides.
        te2 = theirs.text_encoder_2
        converted = convert_open_clip_checkpoint(
            te2, load_file(file), prefix="conditioner.embedders.1.model."
        )
        te2.load_state_dict(converted, strict=False, assign=True)
    ref = _folder(folder)
    _assert_same_tensors(ref, theirs)
    assert np.array_equal(_seeded_image(theirs), _seeded_image(ref))


@pytest.mark.parametrize("name", IDS)
def test_architecture_is_read_from_the_keys(exported, name):
    """No metadata: the U-Net's blocks, layers, attention placement, depths and mid block from the names."""
    from diffusers import UNet2DConditionModel

    folder, file = exported[name]
    ref = _folder(folder).unet
    with safe_open(str(file), framework="pt") as f:
        shapes = {
            k.removeprefix("model.diffusion_model."): tuple(f.get_slice(k).get_shape())
            for k in f.keys()  # noqa: SIM118 - safe_open is not a dict
            if k.startswith("model.diffusion_model.")
        }
    read = read_unet_config(shapes, name)
    fields = (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "cross_attention_dim",
        "use_linear_projection",
        "in_channels",
        "out_channels",
        "addition_embed_type",
        "projection_class_embeddings_input_dim",
    )
    assert {f: read.get(f) for f in fields} == {f: ref.config[f] for f in fields}
    # what no shape holds (heads, groups, time-embedding width) from the folder; the rest as read
    unheard = ("attention_head_dim", "norm_num_groups", "addition_time_embed_dim", "sample_size")
    with torch.device("meta"):
        built = UNet2DConditionModel.from_config({**{k: ref.config[k] for k in unheard}, **read})
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


@pytest.mark.parametrize(("name", "heads"), [("bk-small", 8), ("ssd-1b", [1, 1, 1])])
def test_import_without_metadata(exported, tmp_path, name, heads):
    """A file another tool wrote (no slimsd header) loads: same tensors; epsilon; what no shape holds by the
    published families' convention (SD 1.x: 8 heads; SDXL: 64 channels per head), not micro's own values."""
    folder, file = exported[name]
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(file), bare)
    pipe = load_single_file(str(bare))
    _assert_same_tensors(_folder(folder), pipe)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.unet.config.attention_head_dim == heads


def test_header_metadata(exported):
    folder, file = exported["ssd-1b"]
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    info = json.loads((folder / "slimsd.json").read_text())
    assert meta["slimsd.teacher"] == "micro-sdxl"
    assert json.loads(meta["slimsd.recipe"]) == info["recipe"]
    assert meta["slimsd.prediction_type"] == "epsilon"
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    assert json.loads(meta["slimsd.unet_config"]) == {
        k: v for k, v in unet_cfg.items() if not k.startswith("_")
    }


def _sd2_micro():
    """micro-sd with OpenCLIP's text-encoder activation: the SD 2.x layout (cond_stage_model.model.*)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = load("micro-sd", device="cpu", dtype="fp32", optimize=False)
    cfg = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    torch.manual_seed(5)
    pipe.text_encoder = CLIPTextModel(cfg)
    return pipe


def test_sd2_layout_and_prediction_type(tmp_path):
    from diffusers import StableDiffusionPipeline

    from slimsd.models.single_file import original_state

    pipe = _sd2_micro()
    state, family = original_state(pipe)
    assert family == "sd2" and "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in state
    file = tmp_path / "sd2.safetensors"
    save_file(state, file)  # no metadata
    with pytest.raises(SlimsdError, match="--prediction-type"):
        load_single_file(str(file))
    ours = load_single_file(str(file), prediction_type="v_prediction")
    assert ours.scheduler.config.prediction_type == "v_prediction"
    ours.text_encoder.config.num_attention_heads = pipe.text_encoder.config.num_attention_heads
    _assert_same_tensors(pipe, ours, ("text_encoder", "vae"))
    # diffusers' OpenCLIP converter agrees on the text encoder
    folder = tmp_path / "sd2"
    pipe.save_pretrained(folder)
    theirs = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    _assert_same_tensors(pipe, theirs, ("text_encoder",))


def test_v_prediction_is_marked_for_other_tools(exported, tmp_path):
    _, file = exported["micro-sd"]
    out = tmp_path / "v.safetensors"
    export_single_file(str(file), out, dtype="fp32", prediction_type="v_prediction")
    assert "v_pred" in load_file(out)
    meta = {k: v for k, v in (safe_open(str(out), framework="pt").metadata() or {}).items()}
    assert meta["slimsd.prediction_type"] == "v_prediction"
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(out), bare)  # the header gone: the v_pred marker still tells
    assert load_single_file(str(bare)).scheduler.config.prediction_type == "v_prediction"


def test_pickle_checkpoint_needs_allow_pickle(exported, tmp_path, capsys):
    folder, file = exported["bk-tiny"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(file)}, ckpt)
    code, _, err = run_cli(["generate", str(ckpt), "x", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    pipe = load(str(ckpt), device="cpu", dtype="fp32", optimize=False, allow_pickle=True)
    _assert_same_tensors(_folder(folder), pipe, ("unet", "vae"))


def test_bad_files_are_one_line(tmp_path, capsys):
    odd = tmp_path / "odd.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, odd)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    cases = [
        (["generate", str(odd), "x", "--out", str(tmp_path / "o")], "layout not recognised"),
        (["generate", str(junk), "x", "--out", str(tmp_path / "o")], "not a readable safetensors"),
        (["inspect", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["export", "micro-sd", "--to", "single-file", "--out", str(tmp_path / "x.ckpt")], ".safetensors"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


@pytest.mark.slow
def test_cli_export_then_inspect(tmp_path, capsys):
    out = tmp_path / "micro.safetensors"
    code, _, err = run_cli(["export", "micro-sdxl", "--to", "single-file", "--out", str(out)], capsys)
    assert code == 0, err
    assert load_file(out)["model.diffusion_model.out.2.weight"].dtype == torch.float16  # default fp16
    code, _, err = run_cli(["export", "micro-sdxl", "--to", "single-file", "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    code, a, _ = run_cli(["inspect", str(out), "--json"], capsys)
    code_ref, b, _ = run_cli(["inspect", "micro-sdxl", "--json"], capsys)
    assert code == code_ref == 0
    for key in ("unet_params", "unet_macs", "text_encoder_params", "vae_params"):
        assert json.loads(a)[key] == json.loads(b)[key]


def test_export_keeps_the_provenance(exported, tmp_path):
    from slimsd.models.loading import read_slimsd_info

    folder, file = exported["bk-tiny"]
    want = json.loads((folder / "slimsd.json").read_text())
    again = export_single_file(str(file), tmp_path / "again.safetensors", dtype="fp32")  # a file re-exported
    for path in (file, again):
        got = read_slimsd_info(path)
        assert (got["teacher"], got["recipe"], got["weight_map"]) == (
            want["teacher"],
            want["recipe"],
            want["weight_map"],
        )


def test_distill_from_files_equals_distill_from_folders(exported, tmp_path):
    """Teacher and student given as single files train exactly as their folders do."""
    from slimsd.train.config import DistillConfig
    from slimsd.train.distill import train

    def first_losses(teacher, student, name):
        cfg = {**FAST_DISTILL, "teacher": str(teacher), "student": str(student), "max_steps": 1}
        return train(DistillConfig(**cfg, output_dir=str(tmp_path / name)))["losses"]

    (t_folder, t_file), (s_folder, s_file) = exported["micro-sd"], exported["bk-small"]
    files, folders = first_losses(t_file, s_file, "files"), first_losses(t_folder, s_folder, "folders")
    # equal up to float rounding: the same weights at another memory alignment take other CPU kernels
    assert [row.keys() for row in files] == [row.keys() for row in folders]
    assert files == [pytest.approx(row, rel=1e-6) for row in folders]


def test_prediction_type_choices_match():
    from slimsd.commands.options import PREDICTION_TYPES as OPTION
    from slimsd.models.single_file import PREDICTION_TYPES

    assert OPTION == PREDICTION_TYPES


@pytest.mark.parametrize(
    "drop", ["model.diffusion_model.out.2.bias", "first_stage_model.encoder.conv_in.weight"]
)
def test_incomplete_file_is_one_error(exported, tmp_path, drop):
    _, file = exported["micro-sd"]
    state = load_file(file)
    state.pop(drop)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(SlimsdError, match="incomplete or inconsistent sd1 checkpoint"):
        load_single_file(str(bad))


def test_export_with_a_tiny_decoder_writes_it_beside_the_model(tmp_path, capsys):
    """export MODEL --vae DIR: the model file holds the very tensors of the export without --vae (its own VAE
    under first_stage_model: every tool loads it, img2img still works); the decoder is written beside it as
    NAME.taesd_decoder.safetensors, the file `export DIR` writes (TAESD's layout; tests/models/test_decoders.py);
    the model's header names it with its sha256; the model file alone decodes with its own VAE."""
    from diffusers import AutoencoderKL

    from slimsd.models.decoders import build_tiny_decoder

    from helpers import tiny_decoder_folder

    folder = tiny_decoder_folder(tmp_path, "micro-sd")
    plain, model = tmp_path / "plain.safetensors", tmp_path / "m.safetensors"
    companion = tmp_path / "m.taesd_decoder.safetensors"
    alone = tmp_path / "alone.safetensors"
    assert run_cli(["export", "micro-sd", "--to", "single-file", "--out", str(plain)], capsys)[0] == 0
    assert run_cli(["export", str(folder), "--to", "single-file", "--out", str(alone)], capsys)[0] == 0
    args = ["export", "micro-sd", "--to", "single-file", "--vae", str(folder), "--out", str(model)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert out.splitlines() == [
        f"wrote {companion} (fp16, tiny decoder, TAESD layout)",
        f"wrote {model} (fp16, single-file original layout)",
    ]
    a, b = load_file(plain), load_file(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c, d = load_file(companion), load_file(alone)
    assert c.keys() == d.keys() and all(torch.equal(c[k], d[k]) for k in c)
    with safe_open(str(model), framework="pt") as f:
        record = json.loads(f.metadata()["slimsd.tiny_decoder"])
    assert record == {"file": companion.name, "sha256": hashlib.sha256(companion.read_bytes()).hexdigest()}
    assert isinstance(load(str(model), device="cpu", dtype="fp32", optimize=False).vae, AutoencoderKL)

    code, _, err = run_cli(args, capsys)  # both exist
    assert code == 2 and "exists; pass --overwrite" in err
    six = tmp_path / "six"
    vae = dict(load("micro-sd", device="cpu", dtype="fp32", optimize=False).vae.config)
    build_tiny_decoder("micro-tiny-decoder", vae | {"latent_channels": 6}).save_pretrained(six)
    other = tmp_path / "other.safetensors"
    code, _, err = run_cli([*args[:5], str(six), "--out", str(other)], capsys)
    assert code == 2 and "decodes 6-channel latents 8x up" in err and len(err.strip().splitlines()) == 1
    assert not other.exists() and not (tmp_path / "other.taesd_decoder.safetensors").exists()
    code, _, err = run_cli(
        ["export", str(folder), "--to", "single-file", "--vae", str(folder), "--out", str(other)], capsys
    )
    assert code == 2 and "is a tiny decoder folder, exported by itself" in err

"""slimsd.models.lora and `--lora`: LoRAs merged at load, checked against plain diffusers (unfused adapters),
against the merge formula W + scale * B @ A read straight from the files, and through the CLI and the UI."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.models.loading import load
from slimsd.models.lora import parse_lora_spec
from slimsd.models.micro import build_micro

from helpers import run_cli

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT = "a red circle"
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # a U-Net layer every LoRA here has
TEXT_Q = "encoder.layers.0.self_attn.q_proj"


def make_lora(path, model="micro-sd", seed=0, text=True, unet=None):
    """A LoRA made with peft (r=4, B non-zero) on MODEL's U-Net (or UNET) and text encoder(s), saved in
    diffusers' format by the pipeline class's own save_lora_weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = build_micro(model)
    unet = unet if unet is not None else pipe.unet
    torch.manual_seed(seed)
    layers = {}
    inject_adapter_in_model(LoraConfig(r=4, target_modules=UNET_TARGETS, init_lora_weights=False), unet)
    layers["unet_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    names = ("text_encoder", "text_encoder_2") if text else ()
    for name in names:
        if getattr(pipe, name, None) is not None:
            encoder = getattr(pipe, name)
            inject_adapter_in_model(
                LoraConfig(r=4, target_modules=TEXT_TARGETS, init_lora_weights=False), encoder
            )
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(encoder)
            )
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **layers)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(folder / "a.safetensors", seed=0),
        "b": make_lora(folder / "b.safetensors", seed=1),
        "xl": make_lora(folder / "xl.safetensors", model="micro-sdxl", seed=2),
    }


def diffusers_image(model, lora_files, scales, seed=1, steps=2):
    """The reference: plain diffusers with the adapters loaded and weighted, NOT fused."""
    pipe = build_micro(model)
    names = []
    for i, f in enumerate(lora_files):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"ref{i}")
        names.append(f"ref{i}")
    if names:
        pipe.set_adapters(names, scales)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def cli_image(tmp_path, capsys, model, *extra):
    """`slimsd generate MODEL PROMPT` at 2 steps, seed 1, fp32 on the CPU -> (pixels, PNG path, stderr)."""
    fixed = ["--steps", "2", "--seed", "1", "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path)]
    code, out, err = run_cli(["generate", model, PROMPT, *fixed, "--json", *extra], capsys)
    assert code == 0, err
    path = json.loads(out)["images"][0]["path"]
    return np.asarray(Image.open(path), dtype=np.int16), path, err


def lora_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def delta(path, layer: str, component="unet") -> torch.Tensor:
    """B @ A of LAYER, straight from a diffusers-format file (alpha = rank: scale 1)."""
    t = lora_tensors(path)
    key = (
        f"{component}.{layer}.lora.{{}}.weight"
        if component == "unet"
        else f"{component}.{layer}.lora_linear_layer.{{}}.weight"
    )
    return t[key.format("up")].float() @ t[key.format("down")].float()


@pytest.mark.parametrize("optimize", ["--no-optimize", "--optimize"])
def test_merged_lora_image_equals_plain_diffusers_unfused(loras, tmp_path, capsys, optimize):
    ours, _, err = cli_image(tmp_path, capsys, "micro-sd", "--lora", f"{loras['a']}:0.7", optimize)
    assert err == ""
    reference = diffusers_image("micro-sd", [loras["a"]], [0.7])
    without = diffusers_image("micro-sd", [], [])
    assert np.abs(ours - without).max() > 20  # the LoRA changes the image a lot ...
    # ... and the merged model gives diffusers' unfused result (fused QKV: float summation order only)
    assert np.abs(ours - reference).max() <= (0 if optimize == "--no-optimize" else 2)


def test_scale_zero_is_no_lora_and_two_loras_add_up(loras):
    plain = load("micro-sd", device="cpu", dtype="fp32", optimize=False)
    zero = load("micro-sd", device="cpu", dtype="fp32", optimize=False, loras=[f"{loras['a']}:0"])
    for name, tensor in plain.unet.state_dict().items():
        assert torch.equal(tensor, zero.unet.state_dict()[name]), name
    both = load(
        "micro-sd",
        device="cpu",
        dtype="fp32",
        optimize=False,
        loras=[f"{loras['a']}:0.5", (str(loras["b"]), -0.25)],
    )
    w0, w = plain.unet.get_submodule(Q).weight, both.unet.get_submodule(Q).weight
    expected = w0 + 0.5 * delta(loras["a"], Q) - 0.25 * delta(loras["b"], Q)
    assert torch.allclose(w, expected, atol=1e-6)
    t0, t = plain.text_encoder.get_submodule(TEXT_Q).weight, both.text_encoder.get_submodule(TEXT_Q).weight
    expected = (
        t0
        + 0.5 * delta(loras["a"], TEXT_Q, "text_encoder")
        - 0.25 * delta(loras["b"], TEXT_Q, "text_encoder")
    )
    assert torch.allclose(t, expected, atol=1e-6)
    records = both._slimsd["loras"]
    assert [(r["name"], r["scale"], r["layers_applied"], r["layers_skipped"]) for r in records] == [
        ("a", 0.5, 136, 0),  # 16 transformer blocks x 2 attentions x 4 projections + 2 text layers x 4
        ("b", -0.25, 136, 0),
    ]
    assert records[0]["sha256"] == hashlib.sha256(loras["a"].read_bytes()).hexdigest()
    assert not any("lora" in n for n in both.unet.state_dict())  # merged: no adapter layers left


def test_same_file_stems_get_unique_adapter_names(loras, tmp_path):
    copy = tmp_path / "a.safetensors"
    shutil.copy(loras["b"], copy)
    pipe = load("micro-sd", device="cpu", dtype="fp32", optimize=False, loras=[str(loras["a"]), str(copy)])
    assert [r["name"] for r in pipe._slimsd["loras"]] == ["a", "a_2"]


def kohya_copy(src, dest, alpha=2.0):
    """SRC (diffusers format) rewritten by hand in kohya/A1111's layout: lora_unet_<module with _>.lora_down /
    .lora_up / .alpha, lora_te_text_model_<...>; lora_up is stored as B * rank / alpha, since kohya scales by
    alpha / rank."""
    from safetensors.torch import save_file

    out = {}
    for key, tensor in lora_tensors(src).items():
        if key.startswith("unet."):
            module, kind = re.fullmatch(r"unet\.(.+)\.lora\.(down|up)\.weight", key).groups()
            name = "lora_unet_" + module.replace(".", "_")
        else:
            module, kind = re.fullmatch(
                r"text_encoder\.(.+)\.lora_linear_layer\.(down|up)\.weight", key
            ).groups()
            name = "lora_te_text_model_" + module.replace(".", "_")
        rank = 4
        out[f"{name}.lora_{kind}.weight"] = tensor * (rank / alpha) if kind == "up" else tensor
        out[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(out, str(dest))
    return dest


def test_kohya_file_matches_the_same_lora_in_diffusers_format(loras, tmp_path, capsys):
    kohya = kohya_copy(loras["a"], tmp_path / "kohya.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora_tensors(kohya))
    a = load("micro-sd", device="cpu", dtype="fp32", optimize=False, loras=[f"{loras['a']}:0.7"])
    k = load("micro-sd", device="cpu", dtype="fp32", optimize=False, loras=[f"{kohya}:0.7"])
    assert k._slimsd["loras"][0]["layers_applied"] == 136
    for part in ("unet", "text_encoder"):
        ka = getattr(k, part).state_dict()
        for name, tensor in getattr(a, part).state_dict().items():
            assert torch.allclose(tensor, ka[name], atol=1e-5), name
    ours, _, _ = cli_image(tmp_path, capsys, "micro-sd", "--lora", f"{kohya}:0.7", "--no-optimize")
    assert (
        np.abs(ours - diffusers_image("micro-sd", [kohya], [0.7])).max() == 0
    )  # diffusers reads .alpha itself


def test_teacher_lora_on_a_bk_tiny_student_reaches_the_layers_copied_from_the_teacher(
    loras, tmp_path, capsys
):
    student = tmp_path / "tiny"
    code, _, err = run_cli(
        ["compress", "--teacher", "micro-sd", "--recipe", "bk-tiny", "--out", str(student)], capsys
    )
    assert code == 0, err
    plain, _, _ = cli_image(tmp_path / "plain", capsys, str(student))
    ours, png, err = cli_image(tmp_path / "lora", capsys, str(student), "--lora", str(loras["a"]))
    assert np.abs(ours - plain).max() > 5
    # bk-tiny keeps layer 0 of down stages 0-2 and layers 0 and 2 of up stages 1-3, and no mid block: the
    # teacher's down/up attentions.1 and mid-block layers have no counterpart (counted here from the file)
    unet_layers = {k.rsplit(".lora.", 1)[0] for k in lora_tensors(loras["a"]) if k.startswith("unet.")}
    gone = [
        m for m in unet_layers if re.match(r"unet\.((down|up)_blocks\.\d\.attentions\.1\.|mid_block\.)", m)
    ]
    (line,) = err.strip().splitlines()
    assert line.startswith(
        f"slimsd: warning: LoRA a (read as the teacher's LoRA): {len(gone)} of 136 layers skipped"
    )
    assert len(gone) == 56 and re.search(r"unet\.down_blocks\.0\.attentions\.1\.\S+", line)
    record = json.loads(Image.open(png).text["slimsd"])["loras"][0]
    assert (record["layers_applied"], record["layers_skipped"], record["read_as"]) == (80, 56, "teacher")
    # the student's up_blocks.0.attentions.1 is the teacher's up_blocks.1.attentions.2 (by name it would get
    # the LoRA of the teacher's up_blocks.0.attentions.1, which does not exist, or of another layer)
    s_layer = "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
    t_layer = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"
    base = load(str(student), device="cpu", dtype="fp32", optimize=False)
    merged = load(
        str(student),
        device="cpu",
        dtype="fp32",
        optimize=False,
        loras=[str(loras["a"])],
        on_warning=lambda m: None,
    )
    expected = base.unet.get_submodule(s_layer).weight + delta(loras["a"], t_layer)
    assert torch.allclose(merged.unet.get_submodule(s_layer).weight, expected, atol=1e-6)


def test_a_students_own_lora_applies_by_name(tmp_path):
    from slimsd.models.compress import compress

    student = tmp_path / "small"
    compress("micro-sd", "bk-small", student)
    own = make_lora(
        tmp_path / "own.safetensors",
        text=False,
        unet=load(str(student), optimize=False, device="cpu", dtype="fp32").unet,
    )
    warnings = []
    pipe = load(
        str(student), device="cpu", dtype="fp32", optimize=False, loras=[str(own)], on_warning=warnings.append
    )
    assert warnings == [] and pipe._slimsd["loras"][0]["read_as"] == "own"
    base = load(str(student), device="cpu", dtype="fp32", optimize=False)
    layer = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"  # by name, not via the teacher's map
    expected = base.unet.get_submodule(layer).weight + delta(own, layer)
    assert torch.allclose(pipe.unet.get_submodule(layer).weight, expected, atol=1e-6)


def test_from_png_reapplies_the_lora_and_refuses_a_changed_file(loras, tmp_path, capsys):
    lora = tmp_path / "mine.safetensors"
    shutil.copy(loras["a"], lora)
    first, png, _ = cli_image(tmp_path / "a", capsys, "micro-sd", "--lora", f"{lora}:0.6")
    sha = hashlib.sha256(lora.read_bytes()).hexdigest()
    text = Image.open(png).text
    assert f'Lora hashes: "mine: {sha[:10]}", Version:' in text["parameters"]
    assert [(r["path"], r["scale"], r["sha256"]) for r in json.loads(text["slimsd"])["loras"]] == [
        (str(lora.resolve()), 0.6, sha)
    ]
    code, out, err = run_cli(
        ["generate", "--from-png", png, "--dtype", "fp32", "--out", str(tmp_path / "b"), "--json"], capsys
    )
    assert code == 0, err
    again = np.asarray(Image.open(json.loads(out)["images"][0]["path"]), dtype=np.int16)
    assert np.array_equal(first, again)
    shutil.copy(loras["b"], lora)  # the same path, another LoRA
    code, out, err = run_cli(["generate", "--from-png", png, "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "has changed" in err and str(lora) in err and sha[:10] in err
    lora.unlink()
    code, _, err = run_cli(["generate", "--from-png", png, "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_bad_lora_specs_are_one_line_errors(loras, tmp_path, capsys):
    from safetensors.torch import save_file

    pickled = tmp_path / "x.bin"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickled)
    other = tmp_path / "x.txt"
    other.write_text("x")
    xl_unet = make_lora(tmp_path / "xlu.safetensors", model="micro-sdxl", text=False)
    nowhere = tmp_path / "nowhere.safetensors"
    save_file(
        {
            "unet.no.such.layer.lora.down.weight": torch.ones(4, 8),
            "unet.no.such.layer.lora.up.weight": torch.ones(8, 4),
        },
        str(nowhere),
    )
    cases = [
        (f"{loras['a']}:abc", "'abc' is not a number"),
        (f"{loras['a']}:11", "out of range; allowed: -10 to 10"),
        (str(tmp_path / "missing.safetensors"), "does not exist"),
        (str(pickled), "--allow-pickle"),
        (str(other), "allowed: .safetensors"),
        (str(tmp_path), "is a folder"),
        (str(loras["xl"]), "made for another model family: it has layers for 'text_encoder_2'"),
        (str(xl_unet), "its cross-attention reads 64-wide text embeddings, this model's 32-wide"),
        (str(nowhere), "fits nothing in this model: none of its 1 layers"),
    ]
    for spec, message in cases:
        code, out, err = run_cli(
            ["generate", "micro-sd", PROMPT, "--steps", "1", "--lora", spec, "--out", str(tmp_path / "o")],
            capsys,
        )
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (spec, err)
        assert message in err, (spec, err)
    assert not (tmp_path / "o").exists()


def test_parse_lora_spec_paths_and_scales(loras, tmp_path):
    assert parse_lora_spec(str(loras["a"])) == (str(loras["a"]), 1.0)
    assert parse_lora_spec(f"{loras['a']}:-0.5") == (str(loras["a"]), -0.5)
    colon = tmp_path / "with:colon.safetensors"
    shutil.copy(loras["a"], colon)
    assert parse_lora_spec(str(colon)) == (str(colon), 1.0)
    assert parse_lora_spec(f"{colon}:2") == (str(colon), 2.0)
    with pytest.raises(SlimsdError, match=r"LoRA file 'C:\\\\x\.safetensors' does not exist"):
        parse_lora_spec("C:\\x.safetensors")  # a Windows path: the colon is the drive's, not a scale


def test_sdxl_lora_matches_plain_diffusers(loras, tmp_path, capsys):
    ours, _, err = cli_image(tmp_path, capsys, "micro-sdxl", "--lora", f"{loras['xl']}:0.8", "--no-optimize")
    assert err == ""
    reference = diffusers_image("micro-sdxl", [loras["xl"]], [0.8])
    assert np.abs(ours - diffusers_image("micro-sdxl", [], [])).max() > 5
    assert np.abs(ours - reference).max() <= 1


def test_ui_serves_its_models_with_the_loras_and_shows_them(loras, tmp_path, monkeypatch, capsys):
    import slimsd.run.ui
    from slimsd.run.ui import ModelCache, UIConfig, run_generate

    cache = ModelCache(
        UIConfig(
            models=["micro-sd"], out_dir=tmp_path, dtype="fp32", device="cpu", loras=[(str(loras["a"]), 0.7)]
        )
    )
    items, info = run_generate(cache, "micro-sd", PROMPT, "", 2, 7.5, 0, 0, 1, False, 1, "model default")
    assert "LoRA: a ×0.7 (136 layers)" in info
    assert json.loads(Image.open(items[0][0]).text["slimsd"])["loras"][0]["scale"] == 0.7
    calls = []
    monkeypatch.setattr(slimsd.run.ui, "launch", lambda config, **kw: calls.append(config))
    code, _, err = run_cli(
        ["ui", "--models", "micro-sd", "--lora", f"{loras['a']}:0.5", "--out", str(tmp_path)], capsys
    )
    assert code == 0 and calls[0].loras == [(str(loras["a"]), 0.5)] and f"LoRAs: {loras['a']}:0.5" in err
    code, _, err = run_cli(["ui", "--models", "micro-sd", "--lora", "nope.safetensors"], capsys)
    assert code == 2 and len(calls) == 1 and "'nope.safetensors' does not exist" in err


def test_eval_with_a_lora_keeps_its_images_apart_and_reuses_them(loras, tmp_path, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,caption\nr,a red circle\ng,a green square\n")
    out = tmp_path / "out"
    args = ["eval", "-m", "micro-sd", "--prompts", str(prompts), "--out", str(out), "--steps", "2"]
    args += ["--fid-extractor", "stand-in", "--clip-model", "none", "--is-splits", "1", "--json"]

    def run(*extra):
        code, stdout, err = run_cli([*args, *extra], capsys)
        assert code == 0, err
        return json.loads(stdout)

    plain = run()
    with_lora = run("--lora", f"{loras['a']}:0.7")
    assert with_lora["generation"]["micro-sd"]["generated"] == 2  # nothing taken from the plain run
    folders = sorted(p.name for p in (out / "images").iterdir())
    assert len(folders) == 2 and with_lora["models"][0]["images"] != plain["models"][0]["images"]
    png = out / with_lora["models"][0]["images"] / "r.png"
    sha = hashlib.sha256(loras["a"].read_bytes()).hexdigest()
    assert json.loads(Image.open(png).text["slimsd"])["loras"][0]["sha256"] == sha
    assert with_lora["settings"]["loras"] == [
        {"path": str(loras["a"].resolve()), "scale": 0.7, "sha256": sha}
    ]
    assert with_lora["models"][0]["inception_score"] != plain["models"][0]["inception_score"]
    assert run("--lora", f"{loras['a']}:0.7")["generation"]["micro-sd"]["reused"] == 2
    assert run("--lora", f"{loras['a']}:0.5")["generation"]["micro-sd"]["generated"] == 2  # another scale


def test_a_student_preset_maps_teacher_layers_by_its_recipe():
    from diffusers import UNet2DConditionModel

    from slimsd.models.counting import preset_architecture
    from slimsd.models.lora import student_weight_map
    from slimsd.models.sources import resolve_model

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(preset_architecture("bk-sdm-small")[0])
    mapping = student_weight_map(resolve_model("bk-sdm-small"), unet)
    # BK-SDM-Small keeps the teacher's up-stage layers 0 and 2 (its paper's Fig. 2): the student's layer 1 is
    # the teacher's layer 2; the down stages keep layer 0
    block = "transformer_blocks.0.attn1.to_q.weight"
    assert mapping[f"up_blocks.1.attentions.1.{block}"] == f"up_blocks.1.attentions.2.{block}"
    assert mapping[f"down_blocks.2.attentions.0.{block}"] == f"down_blocks.2.attentions.0.{block}"
    assert student_weight_map(resolve_model("sd-v1.4"), unet) is None
    assert student_weight_map(resolve_model("micro-sd"), unet) is None


def peft_lora(folder, model="micro-sd", rank=4, alpha=8.0):
    """A LoRA as `slimsd finetune` writes it (peft's keys, peft's config with alpha != rank in the header),
    with random B so that it changes the model."""
    from slimsd.train.adapters import add_lora, write_adapters

    pipe = build_micro(model)
    unet = add_lora(pipe.unet, rank, alpha, UNET_TARGETS)
    torch.manual_seed(3)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    write_adapters(folder, type(pipe), unet, unet.state_dict())
    return folder / "pytorch_lora_weights.safetensors"


def unfused_unet_output(model, lora_file) -> torch.Tensor:
    """Plain diffusers: the U-Net's output with LORA_FILE loaded by load_lora_weights (not fused)."""
    pipe = build_micro(model)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    torch.manual_seed(0)
    c = pipe.unet.config
    x = torch.randn(1, c.in_channels, 8, 8)
    text = torch.randn(1, 77, c.cross_attention_dim)
    extra = {}
    if c.addition_embed_type == "text_time":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.ones(1, 6)}}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), text, **extra).sample


@pytest.mark.parametrize("model", ["micro-sd", pytest.param("micro-sdxl", marks=pytest.mark.slow)])
def test_a1111_export_round_trips_and_plain_diffusers_reads_it_as_the_peft_file(model, tmp_path, capsys):
    """`slimsd export FINETUNE_DIR --to a1111-lora`: kohya keys (lora_unet_..., alpha with the scale of peft's
    alpha/rank); slimsd's reader gives the same layers as from the peft file, and diffusers' own kohya
    conversion (load_lora_weights, unfused) the same U-Net output."""
    from slimsd.models.lora import lora_layers

    source = peft_lora(tmp_path / "final", model)
    out = tmp_path / "a1111.safetensors"
    code, stdout, err = run_cli(
        ["export", str(tmp_path / "final"), "--to", "a1111-lora", "--out", str(out)], capsys
    )
    assert code == 0, err
    kohya = lora_tensors(out)
    first = next(iter(lora_tensors(source))).removeprefix("unet.").rsplit(".lora_", 1)[0]
    q = "lora_unet_" + first.replace(".", "_")
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"} <= kohya.keys()
    assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in kohya)
    assert kohya[f"{q}.alpha"].item() == 8.0 and stdout.startswith(f"wrote {out} (")
    pipe = build_micro(model)
    ours, theirs = lora_layers(pipe, str(source)), lora_layers(pipe, str(out))
    assert ours.keys() == theirs.keys() and ours["unet"].keys() == theirs["unet"].keys()
    for module, tensors in ours["unet"].items():  # B carries alpha/rank = 2 in both
        for name, tensor in tensors.items():
            assert torch.equal(tensor, theirs["unet"][module][name]), (module, name)
    reference = unfused_unet_output(model, source)
    assert not torch.allclose(reference, unfused_unet_output(model, None), atol=1e-3)  # the LoRA matters
    assert torch.allclose(unfused_unet_output(model, out), reference, atol=1e-5)


def test_a1111_export_of_a_lora_with_text_encoder_layers_matches_plain_diffusers(loras, tmp_path, capsys):
    """A diffusers-format LoRA with U-Net and text-encoder layers: the kohya file gives plain diffusers the
    same image as the original."""
    out = tmp_path / "a.safetensors"
    code, _, err = run_cli(["export", str(loras["a"]), "--to", "a1111-lora", "--out", str(out)], capsys)
    assert code == 0, err
    keys = lora_tensors(out)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert (
        np.abs(
            diffusers_image("micro-sd", [out], [1.0]) - diffusers_image("micro-sd", [loras["a"]], [1.0])
        ).max()
        == 0
    )


def test_bad_exports_are_one_line_errors(loras, tmp_path, capsys):
    kohya = kohya_copy(loras["a"], tmp_path / "kohya.safetensors")
    cases = [
        (
            [str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")],
            "is neither a LoRA file nor a folder",
        ),
        ([str(loras["a"]), "--out", str(tmp_path / "x.ckpt")], "the file name must end in .safetensors"),
        ([str(kohya), "--out", str(tmp_path / "x.safetensors")], "is not a diffusers/peft LoRA layer"),
        ([str(loras["a"]), "--out", str(kohya)], "exists; pass --overwrite to replace it"),
    ]
    for args, message in cases:
        code, out, err = run_cli(["export", args[0], "--to", "a1111-lora", *args[1:]], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and out == "", err
    code, _, err = run_cli(
        ["export", str(loras["a"]), "--to", "ckpt", "--out", str(tmp_path / "y.safetensors")], capsys
    )
    assert code == 2 and "'ckpt' is not one of 'single-file', 'a1111-lora'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kohya.safetensors"]  # nothing half-written

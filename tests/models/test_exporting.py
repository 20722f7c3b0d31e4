"""ONNX / OpenVINO export (slimsd export --to onnx|openvino) and the exported folders in slimsd.load: the folder
is optimum's layout with optimum's input names (read back with onnx / openvino themselves), an fp32 export gives
the torch image to within float rounding (the reference: the same model in plain diffusers, torch), per family,
and an exported folder runs through `slimsd generate` with PNG info and --from-png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimsd.errors import SlimsdError
from slimsd.models.exporting import export_runtime, parse_resolution
from slimsd.models.loading import load

from helpers import run_cli, tiny_decoder_folder

# fp32 through another runtime's kernels: a different summation order per op. Measured on these micro models:
# at most ~2e-6 per U-Net call (ORT and OpenVINO against torch), so over a few steps and a VAE decode 1e-4 is
# float rounding while a wrong input (a timestep, a missing condition, a swapped output) moves pixels by > 1e-2.
ROUNDING = 1e-4


def lcm_student(folder: Path) -> Path:
    """A micro LCM student without a mid block (random weights): a guidance-embedding input (timestep_cond),
    LCMScheduler, and the `sampling` record slimsd's LCM distillation writes."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from slimsd.models.micro import build_micro

    base = build_micro("micro-sd")
    config = {
        k: v for k, v in base.unet.config.items() if k != "_use_default_values"
    }  # else reset to defaults
    config.update(mid_block_type=None, time_cond_proj_dim=8)
    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(config)
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=LCMScheduler.from_config(base.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    assert unet.mid_block is None and unet.time_embedding.cond_proj is not None
    pipe.save_pretrained(folder)
    sampling = {"kind": "lcm", "scheduler": "lcm", "steps": 4, "guidance": 3.0, "guidance_range": [2.0, 4.0]}
    (folder / "slimsd.json").write_text(json.dumps({"teacher": "micro-sd", "sampling": sampling}))
    return folder


def images(pipe, steps: int = 2, guidance: float | None = None) -> np.ndarray:
    """The pipeline's float image (no uint8 rounding), seed fixed; an LCM student at its own guidance."""
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    out = pipe(
        "a red circle",
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        **kwargs,
    )
    return out.images


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    return lcm_student(tmp_path_factory.mktemp("lcm") / "student")


CASES = [
    ("micro-sd", "onnx", 15),
    ("micro-sd", "openvino", 45),
    ("micro-sdxl", "onnx", 25),
    ("micro-sdxl", "openvino", 80),
]


@pytest.mark.parametrize(
    ("model", "to"),
    [pytest.param(m, t, marks=pytest.mark.slow(seconds=s)) for m, t, s in CASES],
)
def test_fp32_export_gives_the_torch_image(model, to, tmp_path):
    out = tmp_path / "exported"
    record = export_runtime(model, out, to)
    assert record["backend"] == to and record["family"] == ("sdxl" if model == "micro-sdxl" else "sd")
    exported = load(str(out))
    assert exported._slimsd["runtime"]["backend"] == to
    assert exported._slimsd["runtime"]["precision"] == "fp32"
    reference = load(model, dtype="fp32", optimize=False)
    ours, theirs = images(exported), images(reference)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=ROUNDING, rtol=0)
    check_layout(out, to, sdxl=model == "micro-sdxl")


def graph_inputs(folder: Path, part: str, to: str) -> set[str]:
    """The input names of a part, read by the runtime's own library."""
    if to == "onnx":
        import onnx

        return {
            i.name for i in onnx.load(str(folder / part / "model.onnx"), load_external_data=False).graph.input
        }
    import openvino as ov

    model = ov.Core().read_model(str(folder / part / "openvino_model.xml"))
    return {n for i in model.inputs for n in i.get_names() if not n.startswith("/")}


def check_layout(folder: Path, to: str, sdxl: bool) -> None:
    """optimum's folder layout and input names (optimum.intel's OVModelUnet / OVModelVaeDecoder feed these)."""
    parts = ["unet", "text_encoder", "vae_decoder", "vae_encoder"] + (["text_encoder_2"] if sdxl else [])
    name = "model.onnx" if to == "onnx" else "openvino_model.xml"
    for part in parts:
        assert (folder / part / name).is_file() and (folder / part / "config.json").is_file(), part
    for extra in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer_config.json",
        "slimsd.json",
    ]:
        assert (folder / extra).is_file(), extra
    unet = {"sample", "timestep", "encoder_hidden_states"} | ({"text_embeds", "time_ids"} if sdxl else set())
    assert graph_inputs(folder, "unet", to) == unet
    assert graph_inputs(folder, "vae_decoder", to) == {"latent_sample"}
    assert graph_inputs(folder, "text_encoder", to) == {"input_ids"}


@pytest.mark.parametrize(
    "to",
    [
        pytest.param("onnx", marks=pytest.mark.slow(seconds=25)),
        pytest.param("openvino", marks=pytest.mark.slow(seconds=45)),
    ],
)
def test_lcm_student_without_mid_block_exports_with_its_guidance_input(lcm_folder, to, tmp_path):
    """The guidance embedding (timestep_cond) is a graph input of both runtimes' U-Net, and the fp32 export
    gives the torch student's image (plain diffusers, at its own 4 steps and guidance) to float rounding."""
    out = tmp_path / f"lcm-{to}"
    export_runtime(str(lcm_folder), out, to)
    assert graph_inputs(out, "unet", to) == {
        "sample",
        "timestep",
        "encoder_hidden_states",
        "timestep_cond",
    }
    exported = load(str(out))
    assert exported._slimsd["sampling"]["steps"] == 4  # the student's own sampling travels with the export
    reference = load(str(lcm_folder), dtype="fp32", optimize=False)
    np.testing.assert_allclose(images(exported, 4, 3.0), images(reference, 4, 3.0), atol=ROUNDING, rtol=0)


@pytest.mark.slow(seconds=30)
def test_static_export_through_generate_with_png_info_and_from_png(tmp_path, capsys):
    out = tmp_path / "static"
    code, _, err = run_cli(
        ["export", "micro-sd", "--to", "onnx", "--out", str(out), "--resolution", "64x64"], capsys
    )
    assert code == 0, err
    assert json.loads((out / "slimsd.json").read_text())["export"]["resolution"] == [64, 64]
    args = ["generate", str(out), "a blue square", "--steps", "2", "--seed", "3", "--json"]
    code, stdout, err = run_cli([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["runtime"]["backend"] == "onnx" and report["runtime"]["precision"] == "fp32"
    png = report["images"][0]["path"]
    from PIL import Image

    first = Image.open(png)
    assert json.loads(first.text["slimsd"])["model_source"] == str(out.resolve())
    assert "Seed: 3" in first.text["parameters"]
    code, stdout, err = run_cli(
        ["generate", "--from-png", png, "--out", str(tmp_path / "b"), "--json"], capsys
    )
    assert code == 0, err
    again = Image.open(json.loads(stdout)["images"][0]["path"])
    assert np.array_equal(np.asarray(first), np.asarray(again))
    # another size than the fixed one: one line, exit 2, nothing written
    code, _, err = run_cli([*args, "--width", "128", "--height", "128", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "fixed shapes: 64x64 px only, 128x128" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "tensorrt"], "tensorrt"),
        (["--to", "onnx", "--resolution", "65x64"], "multiples of 8"),
        (["--to", "onnx", "--resolution", "big"], "not WxH"),
        (["--to", "onnx", "--dtype", "bf16"], "ONNX exports are fp32"),
        (["--to", "onnx", "--batch", "0"], "batch 0"),
        (["--to", "single-file", "--resolution", "64"], "--resolution and --batch apply to"),
        (
            ["--to", "a1111-lora", "--vae", "."],
            "--vae applies to --to single-file / onnx / openvino, not a1111",
        ),
        (["--to", "onnx", "--vae", "nowhere"], "decoder 'nowhere' does not exist"),
    ],
)
def test_bad_export_options_are_one_line_and_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "x"
    code, _, err = run_cli(["export", "micro-sd", "--out", str(out), *args], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_resolution_parsing_known_values():
    assert parse_resolution("512x768") == (512, 768)
    assert parse_resolution("64") == (64, 64)
    assert parse_resolution(None) is None
    with pytest.raises(SlimsdError, match="multiples of 8"):
        parse_resolution("100x64")


def test_a_missing_runtime_package_is_one_line_naming_it_and_the_extra(monkeypatch):
    import sys

    from slimsd.models import runtimes

    monkeypatch.setitem(sys.modules, "openvino", None)  # what Python does for a package that is not there
    with pytest.raises(SlimsdError, match=r"^openvino is not installed.*slimsd\[deploy\]") as e:
        runtimes.require_backend("openvino")
    assert "\n" not in str(e.value)


def img2img(pipe, init) -> np.ndarray:
    """Plain diffusers img2img on PIPE's own components (torch or exported), float image, seed fixed."""
    import diffusers

    task = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    task.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    return task(
        "a red circle", image=init, strength=0.6, num_inference_steps=4, generator=g, output_type="np"
    ).images


@pytest.mark.parametrize(
    ("recipe", "to"),
    [
        pytest.param("ssd-1b", "onnx", marks=pytest.mark.slow(seconds=40)),
        pytest.param("vega", "openvino", marks=pytest.mark.slow(seconds=70)),
    ],
)
def test_sdxl_students_export_static_and_img2img_gives_the_torch_image(recipe, to, tmp_path, capsys):
    """micro-sdxl compressed with SSD-1B's and Vega's recipes (the students openvino#26545 failed to convert)
    exported with static shapes: text-to-image and img2img (through the exported VAE encoder) give the torch
    student's images (plain diffusers on its own components) to float rounding; an init image of another size
    than the fixed one is refused by `slimsd generate` with one line, exit 2."""
    from PIL import Image

    from slimsd.models.compress import compress

    student = tmp_path / recipe
    compress("micro-sdxl", recipe, student)
    out = tmp_path / f"{recipe}-{to}"
    code, _, err = run_cli(
        ["export", str(student), "--to", to, "--out", str(out), "--resolution", "64"], capsys
    )
    assert code == 0, err
    check_layout(out, to, sdxl=True)
    exported, reference = load(str(out)), load(str(student), dtype="fp32", optimize=False)
    assert exported.unet.config["down_block_types"] == list(reference.unet.config.down_block_types)
    np.testing.assert_allclose(images(exported), images(reference), atol=ROUNDING, rtol=0)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ours, theirs = img2img(exported, init), img2img(reference, init)
    assert np.abs(theirs - img2img(reference, init.rotate(90))).max() > 0.05  # the init image matters
    np.testing.assert_allclose(ours, theirs, atol=ROUNDING, rtol=0)
    # an init image of another size: the output size defaults to it, and this export takes 64x64 only
    big = tmp_path / "big.png"
    init.resize((96, 96)).save(big)
    args = ["generate", str(out), "a red circle", "--init-image", str(big), "--steps", "2"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "gen")], capsys)
    assert code == 2 and "fixed shapes: 64x64 px only, 96x96" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("model", "to"),
    [
        pytest.param("micro-sd", "openvino", marks=pytest.mark.slow(seconds=45)),
        pytest.param("micro-sdxl", "onnx", marks=pytest.mark.slow(seconds=30)),
    ],
)
def test_export_with_a_tiny_decoder_gives_plain_diffusers_image_with_it(model, to, tmp_path, capsys):
    """`slimsd export --vae DIR`: vae_decoder/ is the tiny decoder (its config, its weights: the graph's weight
    count is torch's count of the decoder's parameters), the metadata names it, and the folder's image equals a
    plain diffusers pipeline with `pipe.vae = AutoencoderTiny.from_pretrained(DIR)` to float rounding, not the
    full VAE's image; the export decodes only: img2img is one line, exit 2."""
    import hashlib

    import diffusers
    from diffusers import AutoencoderTiny
    from PIL import Image

    from slimsd.models.micro import build_micro

    tiny = tiny_decoder_folder(tmp_path, model)
    out = tmp_path / "exported"
    code, stdout, err = run_cli(["export", model, "--to", to, "--out", str(out), "--vae", str(tiny)], capsys)
    assert code == 0 and "tiny decoder" in stdout, err
    record = json.loads((out / "slimsd.json").read_text())["export"]["vae"]
    weights = tiny / "diffusion_pytorch_model.safetensors"
    assert record == {
        "kind": "tiny-decoder",
        "path": str(tiny.resolve()),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    config = json.loads((out / "vae_decoder" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and config["scaling_factor"] == 1.0
    assert not (out / "vae_encoder").exists()
    reference = AutoencoderTiny.from_pretrained(tiny)
    assert graph_weights(out, "vae_decoder", to) == sum(p.numel() for p in reference.decoder.parameters())

    plain = getattr(
        diffusers, "StableDiffusionXLPipeline" if model == "micro-sdxl" else "StableDiffusionPipeline"
    )(**build_micro(model).components)
    plain.set_progress_bar_config(disable=True)
    full = images(plain)
    plain.vae = reference
    ours, theirs = images(load(str(out))), images(plain)
    np.testing.assert_allclose(ours, theirs, atol=ROUNDING, rtol=0)
    assert np.abs(theirs - full).mean() > 0.01  # the tiny decoder's image, not the full VAE's

    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(init)
    args = ["generate", str(out), "a red circle", "--init-image", str(init), "--steps", "2"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "gen")], capsys)
    assert code == 2 and "no VAE encoder" in err and "--vae" in err, err
    assert len(err.strip().splitlines()) == 1


def graph_weights(folder: Path, part: str, to: str) -> int:
    """Elements of a part's weights (float constants / initializers of more than one element), read by onnx /
    openvino."""
    if to == "onnx":
        import onnx

        dims = [i.dims for i in onnx.load(str(folder / part / "model.onnx")).graph.initializer]
    else:
        import openvino as ov

        model = ov.Core().read_model(str(folder / part / "openvino_model.xml"))
        dims = [  # float constants but the upsampling's scales
            op.get_output_shape(0)
            for op in model.get_ops()
            if op.get_type_name() == "Constant"
            and op.get_element_type().is_real()
            and all(t.get_node().get_type_name() != "Interpolate" for t in op.output(0).get_target_inputs())
        ]
    return sum(int(np.prod(d)) for d in dims if int(np.prod(d)) > 1)


@pytest.mark.slow(seconds=30)
def test_openvino_ports_carry_only_their_own_names_for_optimum(lcm_folder, tmp_path):
    """optimum-intel names each input by get_any_name() (its static reshape); with static batch 1 conversion merges
    an LCM student's timestep with an internal tensor (/unet/Expand_output_0), which optimum then cannot place."""
    import openvino as ov

    export_runtime(str(lcm_folder), tmp_path / "ov", "openvino", resolution="64x64", batch=1)
    for part in ("unet", "text_encoder", "vae_decoder"):
        model = ov.Core().read_model(str(tmp_path / "ov" / part / "openvino_model.xml"))
        for port in (*model.inputs, *model.outputs):
            assert not any(n.startswith("/") for n in port.get_names()), (part, port.get_names())
    unet = ov.Core().read_model(str(tmp_path / "ov" / "unet" / "openvino_model.xml"))
    names = {"sample", "timestep", "encoder_hidden_states", "timestep_cond"}
    assert {i.get_any_name() for i in unet.inputs} == names

"""Post-training int8 (slimsd quantize): calibration on the model's own trajectory (every timestep its scheduler
samples at, both halves of a guided batch: checked against the scheduler's own timesteps), the int8 folder through
`slimsd generate` with PNG info and --from-png, weights on disk, the sensitivity table against a hand-made
fake-quantisation, and bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimsd.run import quantize as Q

from helpers import run_cli, tiny_decoder_folder


def test_prompt_file_rules(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    assert Q.read_prompts(good, None) == ["a red circle", "a blue square"]
    assert Q.read_prompts(good, 3) == ["a red circle", "a blue square", "a red circle"]
    assert len(Q.read_prompts(None, None)) == len(Q.DEFAULT_PROMPTS)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "holds no prompt"), (b"\n  \n", "holds no prompt"), (b"caf\xe9 au lait\n", "not UTF-8")],
)
def test_bad_prompt_files_are_one_line_exit_2_and_write_nothing(content, message, tmp_path, capsys):
    bad = tmp_path / "p.txt"
    bad.write_bytes(content)
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", "micro-sd", "--out", str(out), "--prompts", str(bad)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "tensorrt"], "unknown quantisation target 'tensorrt'"),
        (["--resolution", "60x64"], "multiples of 8"),
        (["--method", "int4"], "unknown method 'int4'"),
        (["--weight-only", "unet"], "unknown part 'unet'"),
        (["--keep", "conv_in("], "not a regular expression"),
        (["--calibration-prompts", "0"], "calibration-prompts 0"),
        (["--vae", "nowhere"], "decoder 'nowhere' does not exist"),
    ],
)
def test_bad_quantize_options_are_one_line_exit_2(args, message, tmp_path, capsys):
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", "micro-sd", "--out", str(out), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.slow(seconds=15)
def test_calibration_follows_the_models_own_trajectory(micro_sd):
    """Every call of the sampler is collected: steps x images calls, at exactly the scheduler's timesteps
    (diffusers' PNDM for micro-sd, read from a fresh scheduler), batch 2 (guided: unconditional + conditional)."""
    from slimsd.models.loading import load

    pipe = load("micro-sd", dtype="fp32", optimize=False)
    calls, record = Q.collect_unet_inputs(pipe, ["a red circle", "a blue square"], 64, 64, seed=0)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(record["steps"])
    expected = scheduler.timesteps.tolist()
    assert len(calls) == 2 * len(expected)
    assert [float(c["timestep"][0]) for c in calls[: len(expected)]] == [float(t) for t in expected]
    assert record["batch_per_call"] == 2 and all(c["sample"].shape[0] == 2 for c in calls)
    # the two halves are the unconditional and conditional embeddings of the pipeline's own text encoder
    ids = pipe.tokenizer(["", "a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0].numpy()
    np.testing.assert_allclose(calls[0]["encoder_hidden_states"], embeds, atol=1e-5)
    assert record["timesteps"] == sorted(set(map(float, expected)), reverse=True)  # PNDM repeats one
    naive, naive_record = Q.collect_unet_inputs(pipe, ["a red circle"], 64, 64, first_only=True)
    assert len(naive) == 1 and float(naive[0]["timestep"][0]) == float(expected[0])
    # the record names the timestep the naive inputs were taken at, not every one the model sampled at
    assert naive_record["timesteps"] == [float(expected[0])]
    assert naive_record["sampled_timesteps"] == len(set(expected)) > 1


def test_fake_quantisers_known_values():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.1, 0.2, -0.4]])
    q = Q._fake_weight(w)
    assert torch.allclose(q[0], torch.round(w[0] / (1 / 127)) * (1 / 127))
    assert q[1, 2].item() == pytest.approx(-0.4) and q.abs().max() <= 1.0
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    assert torch.allclose(Q._fake_act(x, -1.0, 1.0), torch.tensor([-1.0, 0.0, 0.5, 1.0]), atol=1 / 255)


@pytest.mark.slow(seconds=100)
@pytest.mark.parametrize("to", ["openvino", "onnx"])
def test_int8_through_generate_with_png_info_and_from_png(to, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / f"int8-{to}"
    code, stdout, err = run_cli(
        [
            "quantize",
            "micro-sd",
            "--out",
            str(out),
            "--to",
            to,
            "--prompts",
            str(prompts),
            "--sensitivity-layers",
            "12",
        ],
        capsys,
    )
    assert code == 0, err
    info = json.loads((out / "slimsd.json").read_text())["export"]
    q = info["quantization"]
    assert (
        info["precision"] == "int8"
        and q["calibration"]["count"] == 2
        and q["calibration"]["prompts"][1] == "a blue square"
    )
    assert "conv_in" in q["kept_layers"] and "conv_out" in q["kept_layers"]
    table = json.loads((out / "sensitivity.json").read_text())["layers"]
    assert len(table) == 12 and table[0]["rel_error"] >= table[-1]["rel_error"]
    args = ["generate", str(out), "a green star", "--steps", "3", "--seed", "4", "--json"]
    code, stdout, err = run_cli([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["runtime"]["backend"] == to and report["runtime"]["precision"] == "int8"
    from PIL import Image

    first = Image.open(report["images"][0]["path"])
    assert json.loads(first.text["slimsd"])["model_source"] == str(out.resolve())
    code, stdout, err = run_cli(
        ["generate", "--from-png", first.filename, "--out", str(tmp_path / "b"), "--json"], capsys
    )
    assert code == 0, err
    assert np.array_equal(np.asarray(first), np.asarray(Image.open(json.loads(stdout)["images"][0]["path"])))
    # int8 weights: the int8 U-Net's weight file against the fp32 export's (the ratio is recorded from the files)
    assert q["unet_bytes"] == sum(
        f.stat().st_size for f in (out / "unet").iterdir() if f.suffix in (".bin", ".onnx")
    )


def test_kept_weights_are_stored_fp16_and_computed_in_f32(tmp_path):
    """A MatMul with a kept (float) weight: saved as fp16, the file shrinks by the weight's half and the output
    is x @ fp16(W) computed in f32 (numpy), not x @ W."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    param = ops.parameter([2, 64], np.float32, name="x")
    model = ov.Model([ops.matmul(param, ops.constant(w), False, False)], [param])
    ov.save_model(model, str(tmp_path / "fp32.xml"), compress_to_fp16=False)
    assert Q.kept_weights_fp16(model) == 1
    ov.save_model(model, str(tmp_path / "fp16.xml"), compress_to_fp16=False)
    size = {n: (tmp_path / f"{n}.bin").stat().st_size for n in ("fp32", "fp16")}
    assert size["fp32"] - size["fp16"] == w.size * 2
    compiled = ov.Core().compile_model(str(tmp_path / "fp16.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled([x])[0]
    np.testing.assert_allclose(out, x @ w.astype(np.float16).astype(np.float32), rtol=1e-5, atol=1e-5)
    assert np.abs(out - x @ w).max() > 1e-4  # the fp16 rounding is really there


def eight_bit_share(folder, part: str, to: str) -> tuple[int, int]:
    """(8-bit weight elements, all weight elements) of a part, read from the saved graph by the runtime's own
    library: OpenVINO's constants / ONNX's initializers of at least 1024 elements (weights, not scales)."""
    if to == "openvino":
        import openvino as ov

        sizes = [
            (op.get_element_type().get_type_name(), int(np.prod(op.get_output_shape(0))))
            for op in ov.Core().read_model(str(folder / part / "openvino_model.xml")).get_ops()
            if op.get_type_name() == "Constant"
        ]
        eight = ("i8", "u8")
    else:
        import onnx

        graph = onnx.load(str(folder / part / "model.onnx")).graph
        sizes = [(i.data_type, int(np.prod(i.dims))) for i in graph.initializer]
        eight = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    sizes = [(kind, n) for kind, n in sizes if n >= 1024]
    return sum(n for kind, n in sizes if kind in eight), sum(n for _, n in sizes)


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("to", ["openvino", "onnx"])
def test_int8_weights_with_weight_only_parts_are_int8_on_disk_and_close_to_fp32(to, tmp_path, capsys):
    """--method int8-weights with --weight-only text_encoder and vae_decoder: the U-Net's, the text encoder's
    and the VAE decoder's weights are 8-bit in the saved graphs (read by openvino / onnx themselves, counted
    against torch's own parameter count), the VAE encoder stays float, and the image is far closer to the
    fp32 torch image (plain diffusers) than another seed's image is; quantisation really happened (it is not
    the fp32 image to rounding)."""
    from slimsd.models.loading import load

    out = tmp_path / f"w8-{to}"
    args = ["quantize", "micro-sd", "--out", str(out), "--to", to, "--method", "int8-weights"]
    args += ["--weight-only", "text_encoder", "--weight-only", "vae_decoder", "--calibration-prompts", "2"]
    code, _, err = run_cli([*args, "--sensitivity-layers", "4"], capsys)
    assert code == 0, err
    record = json.loads((out / "slimsd.json").read_text())["export"]
    assert record["precision"] == "int8-weights"
    assert record["quantization"]["weight_only_parts"] == ["text_encoder", "vae_decoder"]
    reference = load("micro-sd", dtype="fp32", optimize=False)
    params = {
        "unet": sum(p.numel() for p in reference.unet.parameters()),
        "text_encoder": sum(p.numel() for p in reference.text_encoder.parameters()),
        "vae_decoder": sum(p.numel() for p in reference.vae.decoder.parameters())
        + sum(p.numel() for p in reference.vae.post_quant_conv.parameters()),
    }
    for part, total in params.items():
        eight, weights = eight_bit_share(out, part, to)
        # the U-Net's kept layers (conv_in, conv_out, time embedding, shortcuts: ~8% of micro-sd's) stay float
        assert eight >= (0.85 if part == "unet" else 0.95) * weights, (part, eight, weights)
        assert eight >= 0.6 * total, (part, eight, total)  # most of the part's parameters, counted by torch
    assert eight_bit_share(out, "vae_encoder", to)[0] == 0  # not asked for: float

    def image(pipe, seed):
        g = torch.Generator().manual_seed(seed)
        return pipe("a red circle", num_inference_steps=2, generator=g, output_type="np").images

    ours, fp32, other_seed = image(load(str(out)), 7), image(reference, 7), image(reference, 8)
    error, scale = np.abs(ours - fp32).mean(), np.abs(other_seed - fp32).mean()
    assert 1e-4 < error < 0.1 * scale, (error, scale)  # measured: error 0.003 (openvino) / 0.007 (onnx)


@pytest.mark.slow(seconds=40)
def test_int8_with_a_tiny_decoder_decodes_as_plain_diffusers_does(tmp_path, capsys):
    """`slimsd quantize --vae DIR` (ONNX): the int8 folder's vae_decoder/ is the tiny decoder: on random U-Net
    latents its session gives what diffusers' AutoencoderTiny.from_pretrained(DIR).decode gives, to rounding;
    the record names it, and the folder generates through `slimsd generate`."""
    from diffusers import AutoencoderTiny

    from slimsd.models.loading import load

    tiny = tiny_decoder_folder(tmp_path, "micro-sd")
    out = tmp_path / "int8-tiny"
    args = ["quantize", "micro-sd", "--out", str(out), "--to", "onnx", "--vae", str(tiny)]
    code, _, err = run_cli([*args, "--calibration-prompts", "1", "--sensitivity-layers", "2"], capsys)
    assert code == 0, err
    record = json.loads((out / "slimsd.json").read_text())["export"]
    assert record["precision"] == "int8" and record["vae"]["path"] == str(tiny.resolve())
    assert not (out / "vae_encoder").exists()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoencoderTiny.from_pretrained(tiny).decode(latents).sample
    ours = load(str(out)).vae.decode(latents).sample
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, rtol=0)
    code, _, err = run_cli(
        ["generate", str(out), "a red circle", "--steps", "2", "--out", str(tmp_path / "g")], capsys
    )
    assert code == 0, err

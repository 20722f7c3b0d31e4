"""`slimsd demo` end to end at a reduced size, through the CLI."""

from __future__ import annotations

import json
import shlex
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.toy.demo import MODELS, QUANTISED, TINY_DECODER_ROW, DemoConfig, run_demo
from slimsd.toy.teacher import TOY_SAMPLING

from helpers import SMALL_DEMO, html_tables, run_cli

KD_VS_TEACHER = 0.7  # seed 3 keeps about 70% (69% on 3 x 24 captions: toy_settings/toy_fresh_seeds.md)
LCM_VS_TEACHER = 0.8  # measured at seed 3: 0.854 / 0.896 = 95%
# the target for the int8 student; measured at seed 3: 0.854 / 0.854 = 100% (held-out 0.500 / 0.542),
# its image 1.31x faster than the fp32 student's on the loaded 2-core dev machine
INT8_VS_LCM = 0.97


def plain_samples(folder, captions: list[str], first_seed: int, steps: int, vae=None) -> list:
    """The demo's sampling redone with plain diffusers from the folder on disk: caption i, seed first_seed + i;
    VAE: a tiny decoder folder put in as ``pipe.vae = AutoencoderTiny.from_pretrained(VAE)``."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    if vae is not None:
        pipe.vae = AutoencoderTiny.from_pretrained(str(vae))
    pipe.set_progress_bar_config(disable=True)
    return toy_images(pipe, captions, first_seed, steps)


def toy_images(pipe, captions: list[str], first_seed: int, steps: int) -> list:
    """PIPE called as the demo samples: caption i with seed first_seed + i, the toy's guidance, 64 px."""
    generators = [torch.Generator("cpu").manual_seed(first_seed + i) for i in range(len(captions))]
    return pipe(
        captions,
        generator=generators,
        num_inference_steps=steps,
        guidance_scale=TOY_SAMPLING["guidance_scale"],
        height=64,
        width=64,
    ).images


def exported_samples(folder, captions: list[str], first_seed: int, steps: int) -> list:
    """The same for an exported folder: its pipeline (slimsd.load: diffusers' pipeline on OpenVINO sessions)
    called directly, not through slimsd's generate()."""
    from slimsd.models.loading import load

    return toy_images(load(str(folder)), captions, first_seed, steps)


def check_int8_row(out, summary: dict) -> None:
    """The quantised row is the LCM student in int8: slimsd.json says so, calibrated on the 16 toy captions of
    seed stream 5_000_003 along the student's own trajectory, and most of its U-Net's weights are 8-bit in the
    saved graph (read by openvino itself, against torch's count of the LCM student's U-Net parameters)."""
    import openvino as ov

    from slimsd.toy.shapes import make_captions

    folder = out / QUANTISED
    assert summary[QUANTISED]["folder"] == str(folder)
    record = json.loads((folder / "slimsd.json").read_text())
    q = record["export"]["quantization"]
    assert record["export"]["backend"] == "openvino" and q["method"] == "int8"
    assert q["calibration"]["kind"] == "trajectory" and q["calibration"]["prompts"] == make_captions(
        16, seed=5_000_003
    )
    assert "conv_in" in q["kept_layers"] and record["sampling"]["steps"] == summary["lcm_student"]["steps"]
    eight = sum(
        int(np.prod(op.get_output_shape(0)))
        for op in ov.Core().read_model(str(folder / "unet" / "openvino_model.xml")).get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8")
    )
    assert eight >= 0.8 * summary["lcm_student"]["unet_params"], eight
    assert summary[QUANTISED]["unet_params"] == summary["lcm_student"]["unet_params"]
    assert summary[QUANTISED]["steps"] == summary["lcm_student"]["steps"]


def table_numbers(table: str, summary: dict) -> dict[str, list[float]]:
    """The numbers of each model's row of the printed table, found by the model's label in results.json."""
    rows = {}
    for name in summary["models"]:
        label = summary[name]["label"]
        line = next(line for line in table.splitlines() if line.startswith(label))
        rows[name] = [float(x.replace(",", "")) for x in line.removeprefix(label).split()]
    return rows


@pytest.mark.slow(seconds=90)
def test_demo_end_to_end_checked_independently_and_rerun(tmp_path, capsys):
    """Two small demo runs into one folder (~1.5 min); the numbers checked against plain diffusers (the int8 row:
    its exported pipeline called directly, and its graph read by openvino), the meta-device parameter count and
    the printed table; the second run replaces the first."""
    from slimsd.models.counting import summarize
    from slimsd.toy.shapes import caption_fidelity, make_captions
    from slimsd.toy.teacher import TOY_DIR

    out = tmp_path / "demo"
    # --no-optimize: the demo samples with plain diffusers modules, so plain diffusers must give the same pixels
    code, stdout, stderr = run_cli(
        ["demo", "--out", str(out), "--json", "--no-optimize", *SMALL_DEMO], capsys
    )
    assert code == 0, stderr
    summary = json.loads(stdout)  # stdout holds the JSON object alone
    assert json.loads((out / "results.json").read_text()) == summary
    assert summary["kind"] == "slimsd-demo"
    torch_models = [m for m in MODELS if m != QUANTISED]
    folders = {"teacher": TOY_DIR, **{m: out / m / "final" for m in torch_models[1:]}}
    check_int8_row(out, summary)
    rows = [*torch_models, TINY_DECODER_ROW, QUANTISED]
    # each row sampled again outside slimsd: plain diffusers from its folder; the tiny-decoder row: the LCM
    # student's folder decoding with the demo's tiny decoder; the int8 row: its exported pipeline called directly
    decoder = out / "tiny_decoder" / "final"
    samplers = {m: partial(plain_samples, f) for m, f in folders.items()}
    samplers[TINY_DECODER_ROW] = partial(plain_samples, out / "lcm_student" / "final", vae=decoder)
    samplers[QUANTISED] = partial(exported_samples, out / QUANTISED)

    # U-Net parameters: the meta-device count of each saved model (bk-small drops ~40% of micro-sd)
    for name, folder in folders.items():
        assert summary[name]["unet_params"] == summarize(str(folder))["unet_params"], name
    assert summary["kd_student"]["unet_params"] < 0.65 * summary["teacher"]["unet_params"]

    # caption fidelity: captions of seen combinations (seed stream 1_000_003 + eval seed) and of held-out ones
    # (2_000_003 + eval seed), sample seeds 10_000 x (eval seed + 1) + i, sampled again by plain diffusers from
    # the folders on disk and scored from the pixels
    for split, suffix, stream in (("seen", "", 1_000_003), ("held_out", "_held_out", 2_000_003)):
        captions = make_captions(2, seed=stream, split=split)
        for name, sampler in samplers.items():
            r = caption_fidelity(sampler(captions, 10_000, 2), captions, details=True)
            got = summary[name]
            assert got[f"caption_fidelity{suffix}_per_seed"] == [r["fidelity"]], name
            assert (
                got[f"caption_fidelity{suffix}"],
                got[f"colour_accuracy{suffix}"],
                got[f"shape_accuracy{suffix}"],
            ) == (r["fidelity"], r["colour_accuracy"], r["shape_accuracy"]), name
    # the rows: the demo's four torch models, the LCM student with the tiny decoder, the int8 LCM student, in order, each with its label
    assert summary["models"] == rows
    assert [summary[m]["label"] for m in rows] == [
        "teacher (toy-sd)",
        "KD student",
        "task-only student",
        "LCM student (KD+LCM)",
        "LCM student + tiny decoder",
        "LCM student int8 (OpenVINO)",
    ]
    # the tiny decoder: a plain diffusers AutoencoderTiny folder, its decoder's parameters counted by diffusers;
    # the row's U-Net and steps are the LCM student's
    from diffusers import AutoencoderTiny

    r = summary[TINY_DECODER_ROW]
    assert r["decoder_dir"] == str(decoder) and r["decoder_train_steps"] == 2
    assert r["decoder_params"] == sum(
        p.numel() for p in AutoencoderTiny.from_pretrained(decoder).decoder.parameters()
    )
    assert (r["unet_params"], r["steps"]) == (summary["lcm_student"]["unet_params"], 2)
    assert summary["tiny_decoder_image_speedup"] == summary["teacher"]["image_ms"] / r["image_ms"]
    # the sheet: 8 captions, the last 2 of held-out combinations, seeds 1234 + i; its images sampled again by
    # plain diffusers and drawn into the sheet (whose layout tests/toy/test_demo_report.py checks) give sheet.png
    from slimsd.toy.report import draw_sheet
    from slimsd.toy.shapes import HELD_OUT, parse_caption

    sheet = summary["sheet"]
    assert (sheet["file"], sheet["first_seed"], sheet["held_out"]) == (
        "sheet.png",
        1234,
        [False] * 6 + [True] * 2,
    )
    combos = [(s.colour, s.shape) for s in map(parse_caption, sheet["captions"])]
    assert [c in HELD_OUT for c in combos] == sheet["held_out"]
    images = {name: sampler(sheet["captions"], 1234, 2) for name, sampler in samplers.items()}
    drawn = np.asarray(Image.open(out / "sheet.png").convert("RGB"))
    assert np.array_equal(drawn, np.asarray(draw_sheet(summary, images)))
    # the page: the table's cells are results.json's values, the sheet beside it by a relative name
    page = html_tables((out / "index.html").read_text())
    assert page.images == ["sheet.png"]
    for name, cells in zip(rows, page.tables["results"], strict=True):
        r = summary[name]
        assert (cells["label"], cells["steps"], cells["caption_fidelity"], cells["image_ms"]) == (
            r["label"],
            str(r["steps"]),
            f"{r['caption_fidelity']:.3f}",
            f"{r['image_ms']:.1f}",
        )
    for name in torch_models[1:]:
        assert list((out / name / "final" / "unet").glob("*.safetensors"))

    # a rerun into the same folder replaces the demo's own output (here with another seed), printing the table
    code, stdout, stderr = run_cli(["demo", "--out", str(out), "--seed", "1", *SMALL_DEMO], capsys)
    assert code == 0, stderr
    again = json.loads((out / "results.json").read_text())
    assert again["config"]["seed"] == 1 and summary["config"]["seed"] == 0
    for name, folder in folders.items():  # this run used the fast runtime: its fused QKV adds no parameters
        assert again[name]["unet_params"] == summarize(str(folder))["unet_params"], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary or old copy left behind
    numbers = table_numbers(stdout, again)
    assert stdout.strip().splitlines()[-1].endswith(str(out / "index.html"))  # the last line names the page
    words = shlex.split(again["command"])  # the options as typed, in the command's own order
    typed = ["--out", str(out), "--seed", "1", *SMALL_DEMO]
    assert words[:2] == ["slimsd", "demo"] and len(words) == 2 + len(typed)
    assert dict(zip(words[2::2], words[3::2], strict=True)) == dict(zip(typed[::2], typed[1::2], strict=True))
    for name in rows:
        r = again[name]
        want = [
            r["steps"],
            r["caption_fidelity"],
            r["caption_fidelity_held_out"],
            r["colour_accuracy"],
            r["shape_accuracy"],
            r["unet_params"],
        ]
        assert numbers[name][:6] == pytest.approx(want, abs=5e-4), name
        assert numbers[name][6] == pytest.approx(r["step_latency_ms"], abs=0.0051), name
        assert numbers[name][7] == pytest.approx(r["image_ms"], abs=0.051), name

    # a folder the demo did not write is refused (one line, exit 2) and left alone, even with demo files in it
    (out / "notes.txt").write_text("mine\n")
    code, _, stderr = run_cli(["demo", "--out", str(out), *SMALL_DEMO], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert str(out) in stderr and "--overwrite" in stderr
    assert (out / "notes.txt").read_text() == "mine\n" and json.loads(
        (out / "results.json").read_text()
    ) == again


def test_only_the_demos_own_output_is_replaced_without_overwrite(tmp_path):
    """What a rerun may replace: a folder whose results.json the demo wrote and that holds nothing else."""
    from slimsd.errors import SlimsdError
    from slimsd.toy.demo import check_out

    cfg = DemoConfig(out=str(tmp_path / "demo"))
    assert check_out(cfg) is False  # nothing there: nothing to replace
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "grid-teacher.png").write_bytes(b"")  # what demos wrote before the sheet
    results = tmp_path / "demo" / "results.json"
    for not_the_demos in (None, {"kind": "something-else"}, ["slimsd-demo"], "{"):
        if not_the_demos is not None:
            results.write_text(not_the_demos if isinstance(not_the_demos, str) else json.dumps(not_the_demos))
        with pytest.raises(SlimsdError, match="not an earlier demo output; pass --overwrite"):
            check_out(cfg)
    results.write_text(json.dumps({"kind": "slimsd-demo"}))
    assert check_out(cfg) is True
    (tmp_path / "demo" / "mine.txt").write_text(
        ""
    )  # a file the demo does not write: not the demo's folder now
    with pytest.raises(SlimsdError, match="not an earlier demo output"):
        check_out(cfg)
    assert check_out(DemoConfig(out=cfg.out, overwrite=True)) is True


def test_demo_rejects_bad_options(tmp_path, capsys):
    code, _, stderr = run_cli(["demo", "--out", str(tmp_path / "x"), "--steps", "0"], capsys)
    assert code == 2 and "--steps" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(["demo", "--out", str(tmp_path / "x"), "--feat-norm", "l2"], capsys)
    assert code == 2 and "--feat-norm" in stderr and "'l2'" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow(seconds=380)
def test_kd_student_follows_captions_better_than_task_only(tmp_path):
    """The demo's claim at its default training settings, on a training seed no setting was chosen with (3; the
    ablation and the settings were chosen on 0, 1, 2), scored on 2 x 24 captions of seen and of held-out
    combinations (~5 min)."""
    cfg = DemoConfig(
        out=str(tmp_path / "demo"),
        seed=3,
        eval_seeds=(0, 1),
        grid_prompts=1,
        latency_repeats=5,
        decoder_steps=2,  # the tiny-decoder row is not this test's claim
        log=lambda _msg: None,
    )
    summary = run_demo(cfg)
    teacher, kd, task_only, lcm, int8 = (summary[m] for m in MODELS)
    print({m: (summary[m]["caption_fidelity"], summary[m]["caption_fidelity_held_out"]) for m in MODELS})
    assert teacher["caption_fidelity"] >= 0.8, summary
    assert kd["caption_fidelity"] >= task_only["caption_fidelity"] + 0.05, summary
    assert summary["kd_vs_teacher"] >= KD_VS_TEACHER, summary
    # held-out combinations: the teacher composes them far above chance (1/24), and the KD student inherits
    # more of that than the task-only twin
    assert teacher["caption_fidelity_held_out"] >= 0.5, summary
    assert kd["caption_fidelity_held_out"] > task_only["caption_fidelity_held_out"], summary
    # the KD student step-distilled by LCM: 4 steps without a doubled guidance batch against the teacher's 25
    # with it, timed end to end in the same run
    assert lcm["steps"] == 4 and teacher["steps"] == 25
    assert summary["lcm_vs_teacher"] >= LCM_VS_TEACHER, summary
    # measured 9.1x-9.5x on the 2-core dev machine under load (the goal is 10x: the 4-step image's
    # text encoding and VAE decode, ~45 ms, are a third of it); 4 steps with a doubled CFG batch would be ~5x
    assert summary["lcm_image_speedup"] >= 7, summary
    # the LCM student in int8 (OpenVINO, slimsd quantize's defaults) keeps the fp32 student's caption fidelity
    assert int8["steps"] == lcm["steps"] and summary["int8_vs_lcm"] >= INT8_VS_LCM, summary


def test_cli_defaults_match_demo_config():
    """The CLI writes its defaults as literals (so that `--help` does not import torch); they must stay the
    DemoConfig's, and --feat-norm's choices the trainer's."""
    from dataclasses import fields

    from slimsd.commands.demo import demo
    from slimsd.train.config import CHOICES

    config = {f.name: f.default for f in fields(DemoConfig)}
    renamed = {"guidance": "guidance_scale"}
    params = {p.name: p for p in demo.params}
    for name in (
        "steps",
        "batch_size",
        "learning_rate",
        "data_images",
        "lambda_out",
        "lambda_feat",
        "feat_norm",
        "seed",
        "eval_prompts",
        "inference_steps",
        "lcm_steps",
        "lcm_learning_rate",
        "lcm_inference_steps",
        "decoder_steps",
        "guidance",
    ):
        assert params[name].default == config[renamed.get(name, name)], name
    assert params["eval_seeds"].default == len(config["eval_seeds"])
    assert tuple(params["feat_norm"].type.choices) == CHOICES["feat_norm"]

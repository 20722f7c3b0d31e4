"""`slimsd compress`: folders that plain diffusers loads and runs, and bad input refused cleanly."""

import json
import subprocess

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from slimsd.models.compress import compress

from helpers import run_cli


@pytest.mark.parametrize(
    ("teacher", "recipe"),
    [
        ("micro-sd", "bk-base"),
        ("micro-sd", "bk-small"),
        ("micro-sd", "bk-tiny"),
        ("micro-sdxl", "ssd-1b"),
        ("micro-sdxl", "vega"),
    ],
)
def test_compressed_folder_loads_in_plain_diffusers_and_runs(teacher, recipe, tmp_path, request):
    teacher_pipe = request.getfixturevalue(teacher.replace("-", "_"))
    out = tmp_path / "student"
    result = compress(teacher, recipe, out)
    pipe = DiffusionPipeline.from_pretrained(out)  # plain diffusers: no slimsd code involved
    assert type(pipe).__name__ == type(teacher_pipe).__name__
    assert sum(p.numel() for p in pipe.unet.parameters()) == result.student_unet_params
    images = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(images)).all()
    # every tensor on disk equals the teacher tensor the map names
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    info = json.loads((out / "slimsd.json").read_text())
    teacher_sd = teacher_pipe.unet.state_dict()
    assert set(saved) == set(info["weight_map"])
    for s, t in info["weight_map"].items():
        assert torch.equal(saved[s], teacher_sd[t])
    assert info["recipe"]["name"] == recipe
    # the other components are the teacher's, unchanged
    te = load_file(out / "text_encoder" / "model.safetensors")
    assert all(torch.equal(v, teacher_pipe.text_encoder.state_dict()[k]) for k, v in te.items())
    assert not list(tmp_path.glob(".student.tmp-*"))


def test_identity_compress_gives_the_teachers_output(tmp_path, micro_sd):
    compress("micro-sd", "identity", tmp_path / "same")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "same")
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.unet.config) == public(micro_sd.unet.config)
    loaded, teacher = pipe.unet.state_dict(), micro_sd.unet.state_dict()
    assert set(loaded) == set(teacher) and all(torch.equal(loaded[k], teacher[k]) for k in teacher)
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    a = pipe("a blue square", generator=torch.Generator().manual_seed(3), **kwargs).images
    b = micro_sd("a blue square", generator=torch.Generator().manual_seed(3), **kwargs).images
    # Same weights, same config: the outputs agree to float rounding (the in-memory student is bit-exact, see
    # test_architecture; tensors loaded from disk sit at other addresses, so CPU kernels may sum in another order).
    assert abs(a - b).max() < 1e-5


def test_cli_compress_and_show_map(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, _ = run_cli(
        [
            "compress",
            "--teacher",
            "micro-sd",
            "--recipe",
            "bk-tiny",
            "--out",
            str(out),
            "--show-map",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    assert "up_blocks.0.resnets.1.conv1.weight <- up_blocks.1.resnets.2.conv1.weight" in stdout
    summary = json.loads(stdout[stdout.index("{") :])
    assert summary["student_unet_params"] < summary["teacher_unet_params"]
    assert (out / "model_index.json").is_file()


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--teacher", "no-such-model", "--recipe", "bk-small"], ["no-such-model", "preset"]),
        (["--teacher", "micro-sd", "--recipe", "bk-huge"], ["bk-huge", "bk-small"]),
        (["--teacher", "micro-sdxl", "--recipe", "bk-small"], ["bk-small", "does not fit"]),
        (["--teacher", "micro-sd", "--recipe", "missing.yaml"], ["missing.yaml", "does not exist"]),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(args, needles, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["compress", *args, "--out", str(out)], capsys)
    _assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_is_refused_unless_overwrite_and_a_folder_not_its_own_is_never_replaced(tmp_path, capsys):
    cmd = ["compress", "--teacher", "micro-sd", "--recipe", "bk-small", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    for extra in ([], ["--overwrite"]):  # not a compress output: never deleted, even with --overwrite
        code, _, err = run_cli([*cmd, str(mine), *extra], capsys)
        _assert_one_line_error(code, err, str(mine), "is not a `slimsd compress` output", "'notes.txt'")
    assert (mine / "notes.txt").read_text() == "user data"

    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".out.tmp-{dead.pid}-abcd").mkdir()  # left by a compress that was killed while writing
    assert run_cli([*cmd, str(out)], capsys)[0] == 0
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # the killed run's folder is gone

    code, _, err = run_cli([*cmd, str(out)], capsys)  # the same command again: its own output
    _assert_one_line_error(code, err, str(out), "holds an earlier `slimsd compress` output", "--overwrite")
    before = (out / "slimsd.json").stat().st_ino
    code, _, _ = run_cli([*cmd, str(out), "--overwrite", "--recipe", "bk-tiny"], capsys)
    assert code == 0 and json.loads((out / "slimsd.json").read_text())["recipe"]["name"] == "bk-tiny"
    assert (out / "slimsd.json").stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_pickle_only_teacher_is_refused_unless_allowed(tmp_path, micro_sd, capsys):
    teacher = tmp_path / "pickled"
    micro_sd.save_pretrained(teacher, safe_serialization=False)
    for f in teacher.rglob(
        "*.safetensors"
    ):  # transformers 5 writes safetensors regardless: convert to pickle
        torch.save(load_file(f), f.with_name("pytorch_model.bin"))
        f.unlink()
    assert not list(teacher.rglob("*.safetensors"))
    code, _, err = run_cli(
        ["compress", "--teacher", str(teacher), "--recipe", "bk-small", "--out", str(tmp_path / "s")], capsys
    )
    _assert_one_line_error(code, err, ".bin", "--allow-pickle")
    assert not (tmp_path / "s").exists()
    code, _, _ = run_cli(
        [
            "compress",
            "--teacher",
            str(teacher),
            "--recipe",
            "bk-small",
            "--out",
            str(tmp_path / "s"),
            "--allow-pickle",
        ],
        capsys,
    )
    assert code == 0
    assert list((tmp_path / "s").rglob("*.safetensors")) and not list((tmp_path / "s").rglob("*.bin"))


def test_a_failure_while_saving_leaves_nothing_half_written(tmp_path, monkeypatch):
    from slimsd.models import compress as compress_module

    def boom(self, folder, **kwargs):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr("diffusers.DiffusionPipeline.save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        compress_module.compress("micro-sd", "bk-small", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["compress", "--teacher", "nota-ai/bk-sdm-small", "--recipe", "bk-small"],
        ["compress", "--teacher", "sd-v1.4", "--recipe", "bk-small"],
    ],
)
def test_hub_models_offline_are_a_clear_error(args, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli([*args, "--out", str(tmp_path / "s")], capsys)
    _assert_one_line_error(code, err, "HF_HUB_OFFLINE")
    assert not (tmp_path / "s").exists()


def test_random_init_is_diffusers_default_init_under_the_seed_and_inherits_nothing(tmp_path, capsys):
    """--init random (BK-SDM's ablation baseline): the student's architecture with the weights a fresh
    UNet2DConditionModel gets under torch.manual_seed(seed), none of the teacher's; the global RNG is untouched."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = tmp_path / "random"
    args = [
        "compress",
        "--teacher",
        "micro-sd",
        "--recipe",
        "bk-small",
        "--init",
        "random",
        "--seed",
        "7",
        "--json",
        "--out",
    ]
    code, stdout, _ = run_cli([*args, str(out)], capsys)
    assert code == 0
    assert torch.equal(torch.get_rng_state(), before)
    summary = json.loads(stdout)
    assert summary["init"] == "random" and summary["tensors_inherited"] == 0
    info = json.loads((out / "slimsd.json").read_text())
    assert info["init"] == "random" and info["weight_map"] == {}

    got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    config = UNet2DConditionModel.load_config(out / "unet")
    torch.manual_seed(7)
    want = UNet2DConditionModel.from_config(config).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    inherited = tmp_path / "teacher-init"
    compress("micro-sd", "bk-small", inherited)
    teacher_init = load_file(inherited / "unet" / "diffusion_pytorch_model.safetensors")
    # conv_in is copied from the teacher under --init teacher and not under --init random
    assert not torch.equal(got["conv_in.weight"], teacher_init["conv_in.weight"])
    assert sum(v.numel() for v in got.values()) == sum(v.numel() for v in teacher_init.values())


def test_cli_init_choices_are_the_librarys():
    """The CLI spells --init's choices as literals (no torch on --help); they must stay compress's INITS."""
    from slimsd.commands.compress import compress as command
    from slimsd.models.compress import INITS

    init = next(p for p in command.params if p.name == "init")
    assert tuple(init.type.choices) == INITS and init.default == INITS[0]

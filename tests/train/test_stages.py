"""Staged plans (stages.py) on micro-sd: bk-small for 3 steps, then bk-tiny from its trained student for 3.

The stage-2 student starts from the stage-1 student's tensors (checked by name, through the recipes' maps
written out by hand); ``teacher: previous`` teaches with that student (the first output-KD term by hand); a
plan stopped inside stage 1 or at the boundary and resumed ends bit-identical; bad plans are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimsd.train.config import DistillConfig
from slimsd.train.distill import train

from helpers import FAST_DISTILL, launch_distill, max_diff, run_cli

STAGES = [
    {"recipe": "bk-small", "max_steps": 3},
    {"recipe": "bk-tiny", "max_steps": 3, "teacher": "previous"},
]
# bk-tiny tensor <- teacher tensor <- bk-small tensor, from the recipes' YAML: bk-small keeps layer 0 of every
# down stage and up layers [0, 2]; bk-tiny drops the innermost stage, so its up block i is the teacher's i + 1.
BY_HAND = {
    "conv_in.weight": "conv_in.weight",
    "down_blocks.2.attentions.0.proj_out.weight": "down_blocks.2.attentions.0.proj_out.weight",
    "down_blocks.1.resnets.0.conv1.weight": "down_blocks.1.resnets.0.conv1.weight",
    "up_blocks.0.resnets.1.conv1.weight": "up_blocks.1.resnets.1.conv1.weight",  # teacher up_blocks.1.resnets.2
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight": (
        "up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    ),
}
TEACHER_OF_BK_TINY = {
    "up_blocks.0.resnets.1.conv1.weight": "up_blocks.1.resnets.2.conv1.weight",
    "down_blocks.2.attentions.0.proj_out.weight": "down_blocks.2.attentions.0.proj_out.weight",
}


def plan_keys(out: Path, **kw) -> dict:
    base = {k: v for k, v in FAST_DISTILL.items() if k != "student"}
    fixed = {"data": "shapes:8", "batch_size": 2, "checkpoint_every": 2, "output_dir": str(out)}
    return {**base, **fixed, "stages": [dict(s) for s in STAGES], **kw}


def plan_cfg(out: Path, **kw) -> DistillConfig:
    return DistillConfig(**plan_keys(out, **kw))


def unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "whole"
    return out, train(plan_cfg(out))


def test_stage_two_starts_from_the_trained_stage_one_student(whole):
    from slimsd.models.micro import build_micro

    out, result = whole
    assert result["final_dir"] == str(out / "final") and result["steps"] == 6
    init, trained = unet(out / "stage-2-init"), unet(out / "stage-1" / "final")
    teacher = build_micro("micro-sd").unet.state_dict()
    for tiny, small in BY_HAND.items():
        assert torch.equal(init[tiny], trained[small]), tiny
    for tiny, t in TEACHER_OF_BK_TINY.items():
        assert not torch.equal(init[tiny], teacher[t])  # stage 1 trained it: not the teacher's tensor
    # The final student's map still says teacher -> final student (a teacher LoRA maps onto it).
    info = json.loads((out / "final" / "slimsd.json").read_text())
    assert info["teacher"] == "micro-sd" and info["recipe"]["name"] == "bk-tiny"
    for tiny, t in TEACHER_OF_BK_TINY.items():
        assert info["weight_map"][tiny] == t
    final, last = unet(out / "final"), unet(out / "stage-2" / "final")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    # checkpoint_every counts the plan's steps: stage 2 (global steps 4-6) saved global step 4 = its step 1
    saved = sorted(p.name for p in (out / "stage-2" / "checkpoints").iterdir())
    assert saved == ["step-00000001", "step-00000003"]


def test_teacher_previous_teaches_with_the_stage_one_student(whole):
    """The output-KD term of the plan's step 4 (stage 2's first), by hand: the stage-2 student at its start
    against the stage-1 student, on stage 2's first examples, noise and timesteps."""
    from slimsd.models.loading import load
    from slimsd.models.micro import build_micro
    from slimsd.train.data import Examples, collate, epoch_order, open_source

    out, result = whole
    got = result["losses"][3]
    assert got["step"] == 4
    micro = build_micro("micro-sd")
    previous = load(str(out / "stage-1" / "final"), device="cpu", dtype="fp32").unet
    student = load(str(out / "stage-2-init"), device="cpu", dtype="fp32").unet
    examples = Examples(open_source("shapes:8", seed=1), 64, seed=1)  # stage 2 draws with seed + 1
    batch = collate([examples[(i, 0)] for i in epoch_order(8, 1, 0)[:2]])
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (2,), generator=gen)
    with torch.no_grad():
        dist = micro.vae.encode(batch["pixels"]).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen)
        latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * 0.18215
        ac = micro.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        ids = micro.tokenizer(
            batch["caption"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        text = micro.text_encoder(ids)[0]
        s_out = student(noisy, t, text).sample
        by_previous = ((s_out - previous(noisy, t, text).sample) ** 2).mean().item()
        by_teacher = ((s_out - micro.unet(noisy, t, text).sample) ** 2).mean().item()
    assert got["out"] == pytest.approx(by_previous, rel=1e-4)
    assert got["out"] != pytest.approx(by_teacher, rel=1e-2)  # the original teacher would give another term


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 3])  # inside stage 1; right at the boundary (stage 1 finished)
def test_a_stopped_plan_resumed_ends_bit_identical(whole, tmp_path, stop):
    out, _ = whole
    first = train(plan_cfg(tmp_path / "split", stop_at_step=stop))
    assert first["final_dir"] is None and first["steps"] == stop
    assert not (tmp_path / "split" / "stage-2").exists()
    resumed = train(plan_cfg(tmp_path / "split", resume="latest"))
    assert resumed["final_dir"] == str(tmp_path / "split" / "final") and resumed["steps"] == 6
    for part in ("stage-1/final", "stage-2-init", "final"):
        a, b = unet(out / part), unet(tmp_path / "split" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.slow(seconds=60)
@pytest.mark.xdist_group("processes")  # one multi-process test at a time (tests/conftest.py)
def test_a_plan_under_two_processes_stopped_at_the_boundary_and_resumed_equals_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (DDP, gloo): the main process does the folder work
    (stage-K-init, final), the other waits. A two-process plan at batch 1 per process, stopped at the stage
    boundary and resumed, ends where the one-process plan at batch 2 ends (1e-5; adam_epsilon=1e-3 keeps Adam
    from amplifying float rounding). (Resuming bit for bit is tested in one process above: a third launch for
    it here would cost the suite ~25 s.)"""
    kw = {"adam_epsilon": 1e-3}
    one = train(plan_cfg(tmp_path / "one", **kw))
    split = tmp_path / "split"
    first = launch_distill(plan_keys(split, batch_size=1, stop_at_step=3, **kw), tmp_path)
    assert first["num_processes"] == 2 and first["steps"] == 3 and first["final_dir"] is None
    assert not (split / "stage-2").exists()
    assert max_diff(unet(tmp_path / "one" / "stage-1/final"), unet(split / "stage-1/final")) <= 1e-5
    resumed = launch_distill(plan_keys(split, batch_size=1, resume="latest", **kw), tmp_path)
    assert resumed["num_processes"] == 2 and resumed["steps"] == 6
    assert resumed["final_dir"] == str(split / "final")
    assert resumed["last"]["loss"] == pytest.approx(one["losses"][-1]["loss"], rel=1e-5)
    for part in ("stage-1/final", "stage-2-init", "final"):
        assert max_diff(unet(tmp_path / "one" / part), unet(split / part)) <= 1e-5, part


def test_dry_run_lists_each_stage_with_the_counts_of_inspect(whole, tmp_path, capsys):
    out, _ = whole
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"teacher": "micro-sd", "output_dir": str(tmp_path / "o"), "stages": STAGES}))
    code, printed, _ = run_cli(["distill", "--config", str(path), "--dry-run"], capsys)
    assert code == 0
    lines = [line for line in printed.splitlines() if line.startswith("stage ")]
    assert len(lines) == 2 and "recipe bk-small" in lines[0] and "recipe bk-tiny" in lines[1]
    assert printed.count("# estimate: 1 processes") == 2  # the memory estimate of each stage
    code, shown, _ = run_cli(["distill", "--config", str(path), "--dry-run", "--json"], capsys)
    estimates = json.loads(shown)["estimate"]
    folders = (out / "stage-1" / "final", out / "stage-2-init")
    for line, folder, est in zip(lines, folders, estimates, strict=True):
        code, shown, _ = run_cli(["inspect", str(folder), "--json"], capsys)
        s = json.loads(shown)
        assert f"U-Net {s['unet_params']:,} params" in line
        assert f"{s['unet_macs']:,} MACs" in line
        assert est["student_params"] == s["unet_params"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "stages, needle",
    [
        (
            [{"recipe": "bk-tiny", "max_steps": 1}, {"recipe": "bk-small", "max_steps": 1}],
            "stage 2 (bk-small) keeps teacher layer down_blocks.2.downsamplers.0, which the stage before dropped",
        ),
        ([{"recipe": "bk-small", "max_steps": 1, "nope": 2}], "stage 1: unknown key 'nope'; allowed: recipe"),
        ([{"recipe": "ssd-1b", "max_steps": 1}], "stage 1 (ssd-1b): recipe 'ssd-1b'"),
        ([{"recipe": "bk-small"}], "stage 1: expected a mapping with at least recipe and max_steps"),
        ([{"recipe": "bk-small", "max_steps": 0}], "stage 1: config key 'max_steps': 0 is out of range"),
        ([{"recipe": "bk-small", "max_steps": 1, "teacher": "previous"}], "stage 1: teacher 'previous'"),
        (
            [
                {"recipe": "bk-small", "max_steps": 1},
                {"recipe": "bk-tiny", "max_steps": 1, "teacher": "micro-sdxl"},
            ],
            "stage 2 (bk-tiny): teacher 'micro-sdxl' is not of the original teacher's U-Net architecture",
        ),
    ],
)
def test_bad_plans_are_one_line_and_exit_2(tmp_path, capsys, stages, needle):
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"teacher": "micro-sd", "output_dir": str(tmp_path / "o"), "stages": stages}))
    code, _, err = run_cli(["distill", "--config", str(path), "data=shapes:4", "batch_size=2"], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_plan_keys_beside_stages_and_a_foreign_plan_are_refused(whole, tmp_path, capsys):
    out, _ = whole
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"teacher": "micro-sd", "stages": STAGES}))
    for args, needle in [
        (["max_steps=6"], "config key 'max_steps' is not allowed beside 'stages'"),
        (["student=bk-small"], "config key 'student' is not allowed beside 'stages'"),
        ([f"output_dir={out}", "data=shapes:8"], "holds another plan; choose resume=latest"),
        ([f"output_dir={out}", "overwrite=true", "resume=latest"], "overwrite=true starts a new run"),
        (
            [f"output_dir={out}", "resume=latest", "stages=[{recipe: bk-small, max_steps: 4}]"],
            "holds a plan with other stages",
        ),
    ]:
        code, _, err = run_cli(["distill", "--config", str(path), *args], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_another_teacher_teaches_a_student_compressed_from_the_original(tmp_path):
    """A stage taught by another model of the teacher's architecture (an expert teacher): the student still
    starts from the original teacher's weights (stage-1-init), and the other model is the one teaching."""
    from slimsd.models.compress import compress
    from slimsd.models.micro import build_micro

    expert = tmp_path / "expert"
    compress("micro-sd", "identity", expert, init="random", seed=3)  # same architecture, other weights
    out = tmp_path / "plan"
    cfg = plan_cfg(out, checkpoint_every=0)
    cfg.stages = [{"recipe": "bk-small", "max_steps": 1, "teacher": str(expert)}]
    train(cfg)
    original = build_micro("micro-sd").unet.state_dict()
    init = unet(out / "stage-1-init")
    assert torch.equal(
        init["up_blocks.1.resnets.1.conv1.weight"], original["up_blocks.1.resnets.2.conv1.weight"]
    )
    run = json.loads((out / "stage-1" / "run.json").read_text())
    assert run["config"]["teacher"] == str(expert)
    info = json.loads((out / "final" / "slimsd.json").read_text())
    assert info["teacher"] == "micro-sd" and info["stage_teacher"] == str(expert)


def test_a_plan_runs_through_the_command_with_its_summary(tmp_path, capsys):
    """`slimsd distill --config PLAN --json`: the plan's summary in global steps (one step per stage here)."""
    path = tmp_path / "plan.yaml"
    stages = [{"recipe": "bk-small", "max_steps": 1}, {"recipe": "bk-tiny", "max_steps": 1}]
    plan = {"teacher": "micro-sd", "data": "shapes:4", "batch_size": 2, "output_dir": str(tmp_path / "o")}
    path.write_text(json.dumps(plan | {"stages": stages}))
    code, printed, err = run_cli(["distill", "--config", str(path), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(printed[printed.index("{") :])
    assert summary["steps"] == 2 and summary["final_dir"] == str(tmp_path / "o" / "final")
    assert summary["engine"] == "single" and (tmp_path / "o" / "final" / "unet").is_dir()

"""Guided progressive distillation (objective=progressive): the schedules and the one-step target against
diffusers' DDIMScheduler, both stages' first steps recomputed by hand, the round teacher and exact resume across
a round boundary, the result loading in plain diffusers (DDIM, trailing) with generate using its defaults, and
one-line errors for a bad schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimsd.errors import SlimsdError
from slimsd.train import progressive as P
from slimsd.train.config import make_config
from slimsd.train.distill import train

from helpers import (
    FAST_DISTILL,
    assert_generate_uses_own_sampling,
    encode_prompts,
    guided_step_draws,
    run_cli,
)
from helpers import sd_ddim as ddim

FAST = {
    **FAST_DISTILL,
    "objective": "progressive",
    "guidance_min": 2.0,
    "guidance_max": 4.0,
    "progressive_steps": [8, 4],
}


def prog_cfg(tmp_path, name="run", **kw):
    return make_config({**FAST, "output_dir": str(tmp_path / name), **kw})


def ckpt(tmp_path, step: int, name: str, run: str = "run") -> dict:
    return load_file(str(tmp_path / run / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))


def guided_unet(state: dict):
    """The student's U-Net (micro-sd's bk-small with a 256-wide guidance embedding) with ``state``."""
    from diffusers import UNet2DConditionModel

    from slimsd.models.compress import compress_pipeline
    from slimsd.models.micro import build_micro

    config = dict(compress_pipeline(build_micro("micro-sd"), "bk-small").pipeline.unet.config)
    net = UNet2DConditionModel.from_config(config, time_cond_proj_dim=256)
    net.load_state_dict(state)
    return net


def test_schedules_are_ddims_trailing_timesteps_and_nest():
    for n in (1, 3, 4, 8, 16, 32):
        ours = P.schedule(1000, n)
        assert ours[:-1].tolist() == ddim(n).timesteps.tolist() and ours[-1].item() == -1, n
        assert P.schedule(1000, 2 * n)[::2].tolist() == ours.tolist(), n  # the 2N schedule holds the N one


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_student_step_with_the_target_lands_on_two_teacher_steps(prediction_type):
    """Two DDIM steps of a teacher (diffusers' DDIMScheduler at 8 steps), then one DDIM step at 4 steps whose
    model output is made from x̃: it lands on z''. Also at the last step, which ends at ᾱ = 1."""
    from slimsd.models.micro import build_micro

    unet = build_micro("micro-sd").unet
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    fine, coarse = ddim(8, prediction_type), ddim(4, prediction_type)
    ac = P.alphas_with_end(coarse.alphas_cumprod)

    def teacher(x, t):
        return unet(x, t, text).sample

    for start in (999, 749, 249):
        t, mid, s = (torch.tensor([v, v]) for v in (start, start - 125, start - 250))
        with torch.no_grad():
            z_mid = fine.step(teacher(z, t), start, z).prev_sample
            z2 = fine.step(teacher(z_mid, mid), start - 125, z_mid).prev_sample
            ours = P.two_ddim_steps(teacher, z, t, mid, s, ac, prediction_type)
        torch.testing.assert_close(ours, z2, rtol=1e-4, atol=1e-5)
        x = P.one_step_target(z, z2, t, s, ac)
        a = coarse.alphas_cumprod[start]
        eps = (z - a.sqrt() * x) / (1 - a).sqrt()
        out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x
        landed = coarse.step(out, start, z).prev_sample
        torch.testing.assert_close(landed, z2, rtol=1e-4, atol=1e-4)


def test_first_steps_of_both_stages_equal_the_formula(tmp_path):
    """Schedule [8, 4], one step per round. Step 1 (stage 1): the student's x̂₀ against the guided teacher's, at
    a timestep of DDIM's 8-step schedule, the teacher run twice (classic CFG ε_u + s·(ε_c − ε_u)), x̂₀ from
    DDIMScheduler. Step 2 (stage 2): the round teacher's two DDIM steps at 8 steps, the x̃ that one 4-step
    DDIM step takes to where they land. Both weighted by max(SNR, 1). A learning rate of 1e-10 leaves the
    student saved after step 1 equal (to 1e-9) to the one step 1 started from."""
    from diffusers import StableDiffusionPipeline

    from slimsd.models.micro import build_micro
    from slimsd.train.data import Examples, collate, epoch_order, open_source

    result = train(
        prog_cfg(tmp_path, max_steps=2, seed=5, learning_rate=1e-10, weight_decay=0.0, checkpoint_every=1)
    )
    got = [r["loss"] for r in result["losses"]]
    assert [r["round"] for r in result["losses"]] == [0, 1]
    student = guided_unet(ckpt(tmp_path, 1, "student"))
    round_teacher = guided_unet(ckpt(tmp_path, 1, "target"))

    teacher = build_micro("micro-sd")
    examples = Examples(open_source("shapes:16", seed=5), 64, seed=5)
    order = epoch_order(16, 5, 0)
    gen = torch.Generator().manual_seed(5)
    fine, coarse = ddim(8), ddim(4)
    ac = teacher.scheduler.alphas_cumprod

    def weighted(x, target, t):
        snr = ac[t] / (1 - ac[t])
        return max(snr.item(), 1.0) * (x - target) ** 2

    want = []
    for step, sched in ((1, fine), (2, coarse)):
        batch = collate([examples[(i, 0)] for i in order[4 * (step - 1) : 4 * step]])
        sq = []
        with torch.no_grad():
            index, noise, latents, scale = guided_step_draws(teacher, batch, gen, 8 if step == 1 else 4)
            text, empty = encode_prompts(teacher, batch["caption"]), encode_prompts(teacher, [""])
            emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, scale - 1, embedding_dim=256)
            for i in range(4):
                t = int(sched.timesteps[index[i]])
                a = ac[t]
                z = a.sqrt() * latents[i : i + 1] + (1 - a).sqrt() * noise[i : i + 1]
                c = {"encoder_hidden_states": text[i : i + 1], "timestep_cond": emb[i : i + 1]}
                x = sched.step(student(z, t, **c).sample, t, z).pred_original_sample
                if step == 1:
                    eps_c = teacher.unet(z, t, text[i : i + 1]).sample
                    eps_u = teacher.unet(z, t, empty).sample
                    target = fine.step(eps_u + scale[i] * (eps_c - eps_u), t, z).pred_original_sample
                else:
                    z_mid = fine.step(round_teacher(z, t, **c).sample, t, z).prev_sample
                    z2 = fine.step(round_teacher(z_mid, t - 125, **c).sample, t - 125, z_mid).prev_sample
                    ts = torch.tensor([t])
                    target = P.one_step_target(z, z2, ts, ts - 250, P.alphas_with_end(ac))
                sq.append(weighted(x, target, t))
        want.append(torch.cat(sq).mean().item())
    assert got == pytest.approx(want, rel=1e-4)


def test_resume_across_a_round_boundary_is_exact_and_the_round_teacher_is_the_last_rounds_student(tmp_path):
    """Schedule [8, 4, 2], 2 steps per round: a run stopped inside round 1 (step 3) and resumed ends as an
    uninterrupted one (losses, student, round teacher); the round teacher of steps 3-4 is the student as step
    2 left it, that of steps 5-6 the student of step 4, frozen while the student trains."""
    common = {"batch_size": 2, "progressive_steps": [8, 4, 2], "steps_per_round": 2, "max_steps": 6}
    whole = train(prog_cfg(tmp_path, "whole", checkpoint_every=1, keep_last=10, **common))
    assert [r["round"] for r in whole["losses"]] == [0, 0, 1, 1, 2, 2]
    train(prog_cfg(tmp_path, "split", stop_at_step=3, **common))
    resumed = train(prog_cfg(tmp_path, "split", resume="latest", **common))
    assert resumed["resumed_from"].endswith("step-00000003")
    assert [r["loss"] for r in resumed["losses"]] == pytest.approx(
        [r["loss"] for r in whole["losses"]], abs=1e-7
    )
    for name in ("student", "target"):
        a, b = ckpt(tmp_path, 6, name, "whole"), ckpt(tmp_path, 6, name, "split")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7, name

    def diff(x, y):
        return max((x[k] - y[k]).abs().max().item() for k in x)

    # The checkpoint of a round's last step holds the next round's teacher: the student as that step left it.
    for step, teacher_from in ((3, 2), (4, 4), (5, 4)):
        assert (
            diff(ckpt(tmp_path, step, "target", "whole"), ckpt(tmp_path, teacher_from, "student", "whole"))
            == 0
        )
    assert diff(ckpt(tmp_path, 5, "student", "whole"), ckpt(tmp_path, 4, "student", "whole")) > 1e-4


def test_result_loads_in_plain_diffusers_with_ddim_and_generate_uses_its_own_sampling(tmp_path, capsys):
    """final/ is a plain diffusers pipeline with DDIMScheduler (trailing, ending at ᾱ = 1: the trained
    timesteps) and the guidance embedding; slimsd generate, given no steps or guidance, samples it as its
    slimsd.json says (the last round's 2 steps, guidance 2.5), pixel for pixel what plain diffusers gives."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    result = train(prog_cfg(tmp_path, progressive_steps=[4, 2], max_steps=2, sample_guidance=2.5))
    pipe = DiffusionPipeline.from_pretrained(result["final_dir"])
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    assert (pipe.scheduler.config.timestep_spacing, pipe.scheduler.config.set_alpha_to_one) == (
        "trailing",
        True,
    )
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    info = json.loads((Path(result["final_dir"]) / "slimsd.json").read_text())["sampling"]
    assert (info["kind"], info["scheduler"], info["steps"], info["guidance"]) == (
        "progressive",
        "ddim",
        2,
        2.5,
    )
    assert_generate_uses_own_sampling(pipe, result["final_dir"], (2, 2.5, "ddim"), tmp_path / "o", capsys)


def test_bad_schedules_are_one_line_errors(tmp_path, capsys):
    for values, needle in [
        ({"progressive_steps": [32, 15, 8]}, r"\[32, 15, 8\] does not halve at each round \(32 -> 15\)"),
        ({"progressive_steps": []}, r"'progressive_steps': \[\] is not allowed"),
        ({"progressive_steps": [8, 4.5]}, "expected a list of whole numbers"),
        (
            {"max_steps": 100, "steps_per_round": 30},
            r"'max_steps': 100 is not 2 rounds .* allowed: max_steps=60",
        ),
        ({"max_steps": 5}, "'max_steps': 5 does not split into the 2 rounds"),
        ({"max_steps": 4, "ema": True}, "'ema': true is not allowed with objective progressive"),
    ]:
        with pytest.raises(SlimsdError, match=needle):
            make_config({**FAST, **values})
    # Only the teacher knows its timesteps: 1000 / 3 is no DDIM schedule diffusers samples exactly.
    overrides = [f"{k}={v}" for k, v in {**FAST, "output_dir": tmp_path / "bad", "max_steps": 2}.items()]
    code, _, err = run_cli(["distill", *overrides, "progressive_steps=[6, 3]"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "progressive_steps': [6, 3] does not fit a teacher with 1000 timesteps" in err

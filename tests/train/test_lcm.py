"""Latent consistency distillation (objective=lcm / lcm-lora): each formula against diffusers' own
implementation, the first step's loss recomputed by hand, exact resume, and the results loading in plain
diffusers (LCMScheduler; LoRA through load_lora_weights) with generate picking their steps and guidance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimsd.errors import SlimsdError
from slimsd.train import consistency as C
from slimsd.train.config import make_config
from slimsd.train.distill import train

from helpers import (
    FAST_DISTILL,
    assert_generate_uses_own_sampling,
    encode_prompts,
    guided_step_draws,
    run_cli,
    sd_ddim,
)

FAST = {**FAST_DISTILL, "objective": "lcm", "guidance_min": 2.0, "guidance_max": 4.0}


def lcm_cfg(tmp_path, name="run", **kw):
    return make_config({**FAST, "output_dir": str(tmp_path / name), **kw})


def test_boundary_scalings_equal_lcm_schedulers():
    from diffusers import LCMScheduler

    sched = LCMScheduler(timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 500, 999])
    c_skip, c_out = C.boundary_scalings(t, 10.0)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(float(ref_skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(ref_out), rel=1e-6, abs=1e-12)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)  # f(z, 0) = z: the boundary condition


def test_guidance_embedding_equals_the_pipelines():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 1.0, 6.5])
    for dim in (256, 7):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(C.guidance_embedding(w, dim), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_ddim_step_equals_ddim_schedulers(prediction_type):
    """x̂₀/ε̂ from a guided teacher output, one DDIM step to t − 20: diffusers' DDIMScheduler (trailing
    spacing, 50 steps: the solver's own timesteps) on the classic CFG formula ε_u + s·(ε_c − ε_u)."""
    ddim = sd_ddim(50, prediction_type, set_alpha_to_one=False)
    assert ddim.timesteps.flip(0).tolist() == C.solver_timesteps(1000, 50).tolist()
    g = torch.Generator().manual_seed(0)
    z, out_c, out_u = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    ac = ddim.alphas_cumprod
    for start, scale in ((999, 1.5), (519, 3.0), (19, 2.0)):
        t = torch.tensor([start])
        x0_c, eps_c = C.predicted_x0_eps(out_c, t, z, ac, prediction_type)
        x0_u, eps_u = C.predicted_x0_eps(out_u, t, z, ac, prediction_type)
        w = scale - 1
        prev = torch.tensor([max(start - 20, 0)])
        ours = C.ddim_step(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), prev, ac)
        ref = ddim.step(out_u + scale * (out_c - out_u), start, z).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_consistency_distance_known_values():
    a, b = torch.full((2, 2), 3.0), torch.zeros(2, 2)
    assert C.consistency_distance(a, b, "l2").item() == pytest.approx(9.0)
    assert C.consistency_distance(a, b, "huber", huber_c=4.0).item() == pytest.approx(1.0)  # √(9+16) − 4
    assert C.consistency_distance(b, b, "huber", huber_c=0.5).item() == pytest.approx(0.0)


def test_config_errors_name_the_value():
    with pytest.raises(SlimsdError, match=r"'objective': 'lcd' is not allowed; allowed: kd, lcm, lcm-lora"):
        make_config({"objective": "lcd"})
    with pytest.raises(SlimsdError, match="guidance_min 5 > guidance_max 3"):
        make_config({"objective": "lcm", "guidance_min": 5, "guidance_max": 3})
    with pytest.raises(SlimsdError, match=r"sample_guidance.*outside the trained range 6 to 16"):
        make_config({"objective": "lcm", "sample_guidance": 3})
    with pytest.raises(SlimsdError, match=r"'guidance_min': 0\.5 is out of range"):
        make_config({"objective": "lcm", "guidance_min": 0.5})


def test_first_lcm_step_equals_the_formula(tmp_path):
    """Recompute step 1's loss by hand with plain diffusers pieces: the DDIM scheduler for the teacher's guided
    step, the pipeline's guidance embedding, LCMScheduler's boundary scalings. A learning rate of 1e-10 leaves
    the saved student and target equal (to 1e-9) to those the step started from."""
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from slimsd.models.micro import build_micro
    from slimsd.train.data import Examples, collate, epoch_order, open_source

    result = train(lcm_cfg(tmp_path, max_steps=1, seed=5, learning_rate=1e-10, weight_decay=0.0))
    got = result["losses"][0]["loss"]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    config = UNet2DConditionModel.load_config(Path(result["final_dir"]) / "unet")
    assert config["time_cond_proj_dim"] == 256
    nets = {}
    for name in ("student", "target"):
        nets[name] = UNet2DConditionModel.from_config(config)
        nets[name].load_state_dict(load_file(str(ckpt / f"{name}.safetensors")))

    teacher = build_micro("micro-sd")
    examples = Examples(open_source("shapes:16", seed=5), 64, seed=5)
    batch = collate([examples[(i, 0)] for i in epoch_order(16, 5, 0)[:4]])
    gen = torch.Generator().manual_seed(5)
    ddim = DDIMScheduler.from_config(
        teacher.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    ddim.set_timesteps(50)
    lcm = LCMScheduler.from_config(teacher.scheduler.config, timestep_scaling=10.0)
    ac = teacher.scheduler.alphas_cumprod
    with torch.no_grad():
        index, noise, latents, scale = guided_step_draws(teacher, batch, gen, 50)
        text, empty = encode_prompts(teacher, batch["caption"]), encode_prompts(teacher, [""])
        emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, scale - 1, embedding_dim=256)
        sq = []
        for i in range(4):
            start = int(ddim.timesteps.flip(0)[index[i]])
            prev = max(start - 20, 0)
            a = ac[start]
            z = a.sqrt() * latents[i : i + 1] + (1 - a).sqrt() * noise[i : i + 1]
            eps = nets["student"](z, start, text[i : i + 1], timestep_cond=emb[i : i + 1]).sample
            skip, out = lcm.get_scalings_for_boundary_condition_discrete(start)
            online = skip * z + out * (z - (1 - a).sqrt() * eps) / a.sqrt()
            eps_c = teacher.unet(z, start, text[i : i + 1]).sample
            eps_u = teacher.unet(z, start, empty).sample
            x_prev = ddim.step(eps_u + scale[i] * (eps_c - eps_u), start, z).prev_sample
            ap = ac[prev]
            t_eps = nets["target"](x_prev, prev, text[i : i + 1], timestep_cond=emb[i : i + 1]).sample
            skip, out = lcm.get_scalings_for_boundary_condition_discrete(prev)
            target = skip * x_prev + out * (x_prev - (1 - ap).sqrt() * t_eps) / ap.sqrt()
            sq.append((online - target) ** 2)
    assert got == pytest.approx(torch.cat(sq).mean().item(), rel=1e-4)


@pytest.mark.parametrize("objective", ["lcm", "lcm-lora"])
def test_lcm_resume_is_exact(tmp_path, objective):
    common = {
        "batch_size": 2,
        "checkpoint_every": 2,
        "lcm_loss": "huber",
        "huber_c": 0.01,
        "objective": objective,
    }
    if objective == "lcm-lora":
        common |= {"lora_rank": 4, "learning_rate": 1e-2}
    whole = train(lcm_cfg(tmp_path, "whole", max_steps=4, **common))
    train(lcm_cfg(tmp_path, "split", max_steps=4, stop_at_step=2, **common))
    resumed = train(lcm_cfg(tmp_path, "split", max_steps=4, resume="latest", **common))
    assert [r["loss"] for r in resumed["losses"]] == pytest.approx(
        [r["loss"] for r in whole["losses"]], abs=1e-7
    )
    for name in ("student", "target") if objective == "lcm" else ("student",):  # lcm-lora: its own target
        a, b = (
            load_file(str(tmp_path / d / "checkpoints" / "step-00000004" / f"{name}.safetensors"))
            for d in ("whole", "split")
        )
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7, name


def test_lcm_student_loads_in_plain_diffusers_and_generate_uses_its_own_sampling(tmp_path, capsys):
    """final/ is a plain diffusers pipeline with LCMScheduler; slimsd generate, given no steps or guidance,
    samples it as its slimsd.json says (3 steps, guidance 2.5 through the embedding), pixel for pixel what
    plain diffusers gives with those settings."""
    from diffusers import DiffusionPipeline, LCMScheduler

    result = train(lcm_cfg(tmp_path, max_steps=2, sample_steps=3, sample_guidance=2.5))
    pipe = DiffusionPipeline.from_pretrained(result["final_dir"])
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 50
    assert_generate_uses_own_sampling(pipe, result["final_dir"], (3, 2.5, "lcm"), tmp_path / "o", capsys)


def test_lcm_lora_saves_adapters_plain_diffusers_loads(tmp_path):
    """lcm-lora trains only LoRA adapters; final/ holds the student's own weights unchanged and the adapters
    in diffusers' LoRA format: plain diffusers' load_lora_weights reproduces the trained student's output."""
    from diffusers import DiffusionPipeline

    from slimsd.models.compress import compress_pipeline
    from slimsd.models.micro import build_micro
    from slimsd.train.adapters import add_lora

    result = train(lcm_cfg(tmp_path, objective="lcm-lora", max_steps=2, lora_rank=4, learning_rate=1e-2))
    final = Path(result["final_dir"])
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    init = compress_pipeline(build_micro("micro-sd"), "bk-small").pipeline.unet
    saved = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((saved[k] - v).abs().max().item() for k, v in init.state_dict().items()) == 0

    trained = add_lora(init, 4, None)
    trained.load_state_dict(
        load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "student.safetensors"))
    )
    pipe = DiffusionPipeline.from_pretrained(final)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        before = pipe.unet(x, 500, text).sample
        pipe.load_lora_weights(final)
        after = pipe.unet(x, 500, text).sample
        want = trained(x, 500, text).sample
    assert (after - before).abs().max().item() > 1e-4  # the adapters trained
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("objective", ["lcm", "lcm-lora"])
def test_sdxl_ssd1b_student_step_distils_and_loads_with_lcm_scheduler(tmp_path, objective):
    """micro-sdxl -> ssd-1b student (KD) -> lcm / lcm-lora: the loss falls; the result loads in plain diffusers
    with LCMScheduler and samples in 4 steps."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    base = {**FAST, "teacher": "micro-sdxl", "batch_size": 4, "data": "shapes:8"}
    kd = train(
        make_config(
            {
                **base,
                "objective": "kd",
                "student": "ssd-1b",
                "max_steps": 2,
                "output_dir": str(tmp_path / "kd"),
            }
        )
    )
    result = train(
        make_config(
            {
                **base,
                "objective": objective,
                "student": kd["final_dir"],
                "max_steps": 8,
                "learning_rate": 3e-3,
                "lora_rank": 4,
                "output_dir": str(tmp_path / objective),
            }
        )
    )
    losses = [r["loss"] for r in result["losses"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    pipe = StableDiffusionXLPipeline.from_pretrained(result["final_dir"])
    assert isinstance(pipe.scheduler, LCMScheduler)
    if objective == "lcm-lora":
        pipe.load_lora_weights(result["final_dir"])
    else:
        assert pipe.unet.config.time_cond_proj_dim == 256
    image = pipe("a red circle", num_inference_steps=4, guidance_scale=2.0, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_eval_and_bench_run_a_step_distilled_model_at_its_own_steps(tmp_path, capsys):
    """Left open, steps and guidance are each model's own: the LCM student's 3 steps at guidance 2.5 (its
    slimsd.json), micro-sd's 25 at 7.5, in one eval; bench's end-to-end row likewise."""
    import json

    from slimsd.measure import bench
    from slimsd.run.pnginfo import settings_from_png

    final = train(lcm_cfg(tmp_path, max_steps=1, sample_steps=3, sample_guidance=2.5))["final_dir"]
    prompts = tmp_path / "p.csv"
    prompts.write_text("caption\na red circle\na blue square\n")
    args = ["eval", "-m", "micro-sd", "-m", final, "--prompts", str(prompts), "--out", str(tmp_path / "e")]
    args += ["--fid-extractor", "stand-in", "--clip-model", "stand-in", "--is-splits", "2", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    rows = {r["model"]: r for r in json.loads(out)["models"]}
    assert (rows["micro-sd"]["steps"], rows["micro-sd"]["guidance"]) == (25, 7.5)
    assert (rows[final]["steps"], rows[final]["guidance"]) == (3, 2.5)
    png = next((tmp_path / "e").glob("images/*final*/*.png"))
    stored = settings_from_png(png)
    assert (stored["steps"], stored["guidance"], stored["scheduler"]) == (3, 2.5, "lcm")

    (row,) = bench.run(bench.BenchConfig(models=[final], device="cpu", dtype="fp32", warmup=0, repeats=1))
    assert (row["steps"], row["guidance"]) == (3, 2.5)


def test_an_lcm_lora_student_loads_with_its_adapters_merged(tmp_path, capsys):
    """slimsd.load of an lcm-lora final/ merges its adapters (once, also when --from-png lists them) and
    samples at its own steps: the same pixels as plain diffusers with load_lora_weights."""
    import json

    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    final = train(
        lcm_cfg(tmp_path, objective="lcm-lora", max_steps=2, lora_rank=4, learning_rate=1e-2, sample_steps=3)
    )["final_dir"]
    pipe = DiffusionPipeline.from_pretrained(final)
    pipe.load_lora_weights(final)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    ref = np.round(ref * 255).astype(int)
    args = ["generate", final, "a red circle", "--seed", "3", "--no-optimize", "--json"]
    code, out, err = run_cli([*args, "--dtype", "fp32", "--out", str(tmp_path / "a")], capsys)  # as diffusers
    assert code == 0, err
    first = json.loads(out)["images"][0]["path"]
    assert np.abs(np.asarray(Image.open(first)).astype(int) - ref).max() <= 1
    code, out, err = run_cli(
        ["generate", "--from-png", first, "--no-optimize", "--json", "--out", str(tmp_path / "b")], capsys
    )
    assert code == 0, err
    again = np.asarray(Image.open(json.loads(out)["images"][0]["path"])).astype(int)
    assert np.array_equal(again, np.asarray(Image.open(first)).astype(int))


def test_ui_compares_a_step_distilled_student_at_its_own_steps(tmp_path):
    """The UI's Compare tab runs the LCM student at its own 3 steps and guidance 2.5 beside micro-sd at the
    sliders' 2 steps; unticked, both at the sliders'. The Generate tab's sliders follow the chosen model."""
    from slimsd.run.pnginfo import settings_from_png
    from slimsd.run.ui import ModelCache, UIConfig, own_sampling, run_compare

    final = train(lcm_cfg(tmp_path, max_steps=1, sample_steps=3, sample_guidance=2.5))["final_dir"]
    cache = ModelCache(UIConfig(models=["micro-sd", final], out_dir=tmp_path / "ui", device="cpu"))
    assert own_sampling(cache, final) == (3, 2.5) and own_sampling(cache, "micro-sd") == (25, 7.5)
    for own, want in ((True, [(2, 7.5), (3, 2.5)]), (False, [(2, 7.5), (2, 7.5)])):
        items, rows = run_compare(
            cache, ["micro-sd", final], "a red circle", "", 2, 7.5, 1, "model default", own
        )
        got = [(s["steps"], s["guidance"]) for s in (settings_from_png(path) for path, _ in items)]
        assert got == want and [r[1] for r in rows] == [w[0] for w in want]

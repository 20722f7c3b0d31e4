"""`slimsd finetune` (objective=finetune): LoRA adapters on any model with the task loss, checked through plain
diffusers (``load_lora_weights`` of the result), exact resume, DreamBooth prior preservation against a value
computed by hand from diffusers' own parts, and the result applied to a student with ``--lora``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimsd.errors import SlimsdError
from slimsd.models.loading import load
from slimsd.train.config import finetune_config
from slimsd.train.distill import train

from helpers import run_cli

FAST = {
    "data": "shapes:4",  # one batch: the same 4 images every step
    "batch_size": 4,
    "learning_rate": 1e-2,
    "checkpoint_every": 0,
    "progress": False,
    "tensorboard": False,
    "resolution": 64,
}


def finetune(tmp_path, **keys) -> dict:
    return train(finetune_config({**FAST, "output_dir": str(tmp_path / "run"), **keys}))


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    from slimsd.models.compress import compress

    folder = tmp_path_factory.mktemp("tiny") / "bk-tiny"
    compress("micro-sd", "bk-tiny", folder)
    return str(folder)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A LoRA fine-tuned on micro-sd (module-wide: several tests read it)."""
    out = tmp_path_factory.mktemp("tuned")
    return finetune(out, model="micro-sd", max_steps=8)["final_dir"]


@torch.no_grad()
def denoising_loss(pipe) -> float:
    """The plain task loss ||ε − ε_θ(z_t, y, t)||² of PIPE on the training images at fixed noise and timesteps,
    from diffusers' own parts (VAE, encode_prompt, DDPM's add_noise): independent of the trainer's code."""
    from diffusers import DDPMScheduler

    from slimsd.train import data as D

    assert pipe.scheduler.config.prediction_type == "epsilon"
    examples = D.Examples(D.open_source("shapes:4", 0), 64)
    rows = [examples[(i, 0)] for i in range(4)]
    pixels = torch.stack([r["pixels"] for r in rows])
    captions = [r["caption"] for r in rows]
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(123))
    t = torch.tensor([100, 300, 500, 700])
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
    extra = {}
    if "text_encoder_2" in pipe.components:
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(4, 6)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    else:
        embeds = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    pred = pipe.unet(noisy, t, embeds, **extra).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(1)
    )
    return np.asarray(out.images[0], dtype=np.int16)


def base(model: str):
    return load(model, device="cpu", dtype="fp32", optimize=False)


# attention and the residual blocks' convolutions: enough capacity on a micro model to learn in a few steps
LEARN = {
    "max_steps": 8,
    "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"],
}


def check_learned(model: str, final_dir: str) -> None:
    """Plain diffusers with the LoRA loaded (not merged): the denoising loss on the training images falls
    (measured 1.06 -> 0.76 on micro-sd) and the image changes."""
    plain, tuned = base(model), base(model)
    tuned.load_lora_weights(final_dir)  # finds pytorch_lora_weights.safetensors, reads peft's keys
    before, after = denoising_loss(plain), denoising_loss(tuned)
    assert after < 0.85 * before, (before, after)
    assert np.abs(image(tuned) - image(plain)).max() > 5


@pytest.mark.slow
def test_finetune_micro_sd_learns(tmp_path):
    check_learned("micro-sd", finetune(tmp_path, model="micro-sd", **LEARN)["final_dir"])


@pytest.mark.slow
def test_finetune_micro_sdxl_learns(tmp_path):
    check_learned("micro-sdxl", finetune(tmp_path, model="micro-sdxl", **LEARN)["final_dir"])


@pytest.mark.slow
def test_finetune_a_bk_tiny_student_learns(tmp_path, tiny_student):
    check_learned(tiny_student, finetune(tmp_path, model=tiny_student, **LEARN)["final_dir"])


def test_final_holds_only_the_adapters_on_the_attention_projections(tuned):
    """final/: the LoRA file (peft's layout, the default targets) and slimsd.json naming the base model."""
    from pathlib import Path

    files = sorted(p.name for p in Path(tuned).iterdir())
    assert files == ["pytorch_lora_weights.safetensors", "slimsd.json"]
    info = json.loads((Path(tuned) / "slimsd.json").read_text())
    assert (info["kind"], info["base_model"], info["step"]) == ("lora", "micro-sd", 8)
    keys = load_file(str(Path(tuned) / "pytorch_lora_weights.safetensors"))
    assert {re.sub(r".*\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight$", r"\1", k) for k in keys} == {
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
    }
    plain, with_lora = base("micro-sd"), base("micro-sd")
    with_lora.load_lora_weights(tuned)
    assert np.abs(image(with_lora) - image(plain)).max() > 5


PRIOR = {"class_prompt": "a shape", "num_class_images": 3, "class_steps": 2}


def test_resume_is_exact_and_reuses_the_class_images(tmp_path):
    """Stopped at step 2 and resumed: adapters bit-identical to an uninterrupted run (with the prior's class
    images, which the resume reads back, not samples again)."""
    keys = {"model": "micro-sd", "max_steps": 4, "checkpoint_every": 2, "batch_size": 2, **PRIOR}
    whole = finetune(tmp_path / "whole", **keys)
    finetune(tmp_path / "parts", **keys, stop_at_step=2)
    first = tmp_path / "parts" / "run" / "class_images" / "class-00000.png"
    stamp = first.stat().st_mtime_ns
    resumed = finetune(tmp_path / "parts", **keys, resume="latest")
    assert resumed["resumed_from"] and first.stat().st_mtime_ns == stamp
    a = load_file(f"{whole['final_dir']}/pytorch_lora_weights.safetensors")
    b = load_file(f"{resumed['final_dir']}/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in whole["losses"]] == [r["loss"] for r in resumed["losses"]]


def test_overwrite_starts_over_a_run_with_class_images(tmp_path):
    """class_images/ belongs to the run: overwrite=true removes it with the rest (not refused as foreign)."""
    keys = {"model": "micro-sd", "max_steps": 1, "batch_size": 2, **PRIOR}
    finetune(tmp_path, **keys)
    again = finetune(tmp_path, **keys, overwrite=True)
    assert again["steps"] == 1 and len(list((tmp_path / "run" / "class_images").glob("class-*.png"))) == 3


def test_finetune_loss_known_values():
    from slimsd.train.losses import finetune_loss

    pred = torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, 2.0]])
    target = torch.zeros(3, 2)
    plain = finetune_loss(pred[:2], target[:2], instances=2)
    assert plain.keys() == {"loss", "task"} and plain["loss"].item() == pytest.approx(5.0)  # (1+1+9+9)/4
    terms = finetune_loss(pred, target, instances=2, prior_weight=0.5)
    assert terms["prior"].item() == pytest.approx(2.0)  # (0+4)/2
    assert terms["loss"].item() == pytest.approx(5.0 + 0.5 * 2.0)


def test_prior_preservation_adds_the_weighted_class_term(tmp_path):
    """Step 1 with class images: the instance term is the run without them; the class term is the frozen
    model's task loss on the class images, computed here from diffusers' parts with the trainer's draws; the
    loss is task + prior_loss_weight x class term."""
    from diffusers import DDPMScheduler
    from PIL import Image

    from slimsd.train.data import preprocess

    keys = {"model": "micro-sd", "max_steps": 1, "batch_size": 2, "data": "shapes:2"}
    plain = finetune(tmp_path / "plain", **keys)["losses"][0]
    run = finetune(tmp_path / "prior", **keys, **PRIOR, prior_loss_weight=0.5)["losses"][0]
    assert run["task"] == pytest.approx(plain["task"], rel=1e-6)  # the same rows, in a batch of 4 not 2
    pipe = base("micro-sd")
    folder = tmp_path / "prior" / "run" / "class_images"
    assert len(list(folder.glob("class-*.png"))) == 3
    # The trainer's draws from (seed 0): the instance rows' timesteps, noise, VAE samples and caption
    # dropout, then the class rows' picks, timesteps, noise and VAE samples.
    gen = torch.Generator().manual_seed(0)
    shape = (2, 4, 8, 8)
    torch.randint(0, 1000, (2,), generator=gen), torch.randn(shape, generator=gen)
    torch.randn(shape, generator=gen), torch.rand(2, generator=gen)
    pick = torch.randint(0, 3, (2,), generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    noise, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    pixels = torch.stack(
        [preprocess(Image.open(folder / f"class-{i:05d}.png").convert("RGB"), 64)["pixels"] for i in pick]
    )
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
        latents = (dist.mean + dist.std * eps) * pipe.vae.config.scaling_factor
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
        embeds = pipe.encode_prompt(["a shape"] * 2, "cpu", 1, False)[0]
        by_hand = torch.nn.functional.mse_loss(pipe.unet(noisy, t, embeds).sample, noise).item()
    assert run["prior"] == pytest.approx(by_hand, rel=1e-4)
    assert run["loss"] == pytest.approx(run["task"] + 0.5 * by_hand, rel=1e-5)


def test_class_images_are_the_frozen_models_seeded_samples(tmp_path):
    """Class image i is what the base pipeline samples from seed + i."""
    from PIL import Image

    finetune(tmp_path, model="micro-sd", max_steps=1, seed=7, **PRIOR)
    pipe = base("micro-sd")
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        "a shape", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(8)
    )
    got = Image.open(tmp_path / "run" / "class_images" / "class-00001.png")
    assert np.abs(np.asarray(got, np.int16) - np.asarray(want.images[0], np.int16)).max() <= 1


def test_a_micro_sd_lora_on_a_bk_tiny_student_skips_the_layers_it_lacks(
    tuned, tiny_student, tmp_path, capsys
):
    lora = f"{tuned}/pytorch_lora_weights.safetensors"
    fixed = ["--steps", "2", "--seed", "1", "--dtype", "fp32", "--device", "cpu", "--no-optimize"]
    code, out, err = run_cli(
        ["generate", tiny_student, "a red circle", *fixed, "--out", str(tmp_path), "--json", "--lora", lora],
        capsys,
    )
    assert code == 0, err
    layers = {k.rsplit(".lora_", 1)[0] for k in load_file(lora)}
    # bk-tiny has no mid block and keeps one attention of each teacher down/up stage pair: the LoRA's
    # layers in attentions.1 of down/up blocks and in the mid block have no counterpart
    gone = [m for m in layers if re.match(r"unet\.((down|up)_blocks\.\d\.attentions\.1\.|mid_block\.)", m)]
    (line,) = err.strip().splitlines()
    assert line.startswith(
        f"slimsd: warning: LoRA pytorch_lora_weights (read as the teacher's LoRA): {len(gone)} of "
        f"{len(layers)} layers skipped"
    )
    assert 0 < len(gone) < len(layers) and json.loads(out)["images"][0]["path"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=micro-sd", "rank=0"], "config key 'rank': 0 is out of range; allowed: >= 1"),
        (["model=micro-sd", "teacher=micro-sd"], "unknown config key 'teacher'; allowed: model, rank"),
        (["data=shapes:4"], "config key 'model' is required"),
        (
            ["model=micro-sd", "target_modules=[]"],
            "config key 'target_modules': an empty list is not allowed",
        ),
        (["model=micro-sd", "prior_loss_weight=-1"], "config key 'prior_loss_weight': -1.0 is out of range"),
        (["model=micro-sd", "alpha=abc"], "config key 'alpha': expected float, got 'abc'"),
    ],
)
def test_bad_keys_are_one_line_errors(args, message, capsys):
    code, out, err = run_cli(["finetune", "--dry-run", *args], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_target_modules_that_name_no_layer_are_refused(tmp_path, capsys):
    code, _, err = run_cli(
        ["finetune", "model=micro-sd", "target_modules=[nope]", f"output_dir={tmp_path}", "progress=false"],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "LoRA target modules ['nope'] name no layer of this U-Net" in err


def test_class_prompt_is_for_finetune_only(tmp_path):
    from slimsd.train.config import make_config

    with pytest.raises(SlimsdError, match="'class_prompt' is for objective finetune, not 'kd'"):
        make_config({"class_prompt": "a dog"})


def test_dry_run_prints_the_config_in_finetunes_names(capsys):
    import yaml

    code, out, err = run_cli(
        ["finetune", "--dry-run", "model=micro-sd", "rank=8", "target_modules=to_q"], capsys
    )
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert (shown["model"], shown["rank"], shown["target_modules"], shown["learning_rate"]) == (
        "micro-sd",
        8,
        ["to_q"],
        1e-4,
    )
    assert "teacher" not in shown and "lambda_out" not in shown

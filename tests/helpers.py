"""Test helpers: run the CLI in-process and capture its exit code and output."""

from __future__ import annotations


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``slimsd ARGS``, run in this process."""
    from slimsd.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


# A distillation config that trains in seconds on micro-sd (tests of the trainer and its objectives).
FAST_DISTILL = {
    "teacher": "micro-sd",
    "student": "bk-small",
    "data": "shapes:16",
    "batch_size": 4,
    "learning_rate": 1e-3,
    "checkpoint_every": 0,
    "progress": False,
    "tensorboard": False,
    "resolution": 64,
}


def sd_ddim(steps: int, prediction_type: str = "epsilon", set_alpha_to_one: bool = True):
    """diffusers' DDIMScheduler on SD's noise schedule with trailing spacing and no clipping, set to ``steps``
    (the reference the step-distillation objectives are checked against)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=False,
    )
    sched.set_timesteps(steps)
    return sched


def assert_generate_uses_own_sampling(pipe, final_dir, want: tuple, out_dir, capsys) -> None:
    """`slimsd generate FINAL PROMPT` with no steps or guidance samples with ``want`` = (steps, guidance,
    scheduler name), pixel for pixel what plain diffusers' ``pipe`` gives with those settings."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a red circle",
        num_inference_steps=want[0],
        guidance_scale=want[1],
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]
    args = ["generate", str(final_dir), "a red circle", "--seed", "7", "--no-optimize"]
    code, out, err = run_cli([*args, "--out", str(out_dir), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert (info["settings"]["steps"], info["settings"]["guidance"], info["settings"]["scheduler"]) == want
    ours = np.asarray(Image.open(info["images"][0]["path"])).astype(int)
    assert np.abs(ours - np.round(ref * 255).astype(int)).max() <= 1


def guided_step_draws(teacher, batch, gen, high: int, guidance: tuple[float, float] = (2.0, 4.0)):
    """What the trainer draws for one micro-batch of a guided step-distilling objective, in its order, and the
    latents it makes: (schedule indices in [0, high), noise, latents, CFG scales), caption dropout 0."""
    import torch

    n = len(batch["caption"])
    index = torch.randint(0, high, (n,), generator=gen)
    dist = teacher.vae.encode(batch["pixels"]).latent_dist
    noise = torch.randn(dist.mean.shape, generator=gen)
    latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * 0.18215
    torch.rand(n, generator=gen)  # the caption-dropout draw
    scale = guidance[0] + (guidance[1] - guidance[0]) * torch.rand(
        n, generator=gen
    )  # guidance_min + span · U
    return index, noise, latents, scale


def encode_prompts(pipe, texts: list[str]):
    """CLIP text embeddings as SD's pipeline computes them."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]

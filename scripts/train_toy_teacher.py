"""Trains the toy teacher: micro-sd taught the shapes world (slimsd.toy.shapes), written to src/slimsd/toy/assets/toy-sd.

Two stages, both plain and seeded, on the CPU:
1. the micro VAE (random in micro-sd) learns to reconstruct shapes images: L2 + a tiny KL term, as in
   Rombach et al. 2022 (LDM) without the perceptual and GAN terms, which 64 px flat shapes do not need;
   its ``scaling_factor`` is then set to 1/std of the latents, as SD does;
2. the micro U-Net learns the plain task loss: epsilon prediction under the DDPM schedule of the pipeline's
   scheduler config (Ho et al. 2020), with 10% of captions dropped to "" for classifier-free guidance
   (Ho & Salimans 2022). The text encoder learns with it (see train_unet for why it cannot stay frozen).

Latents are computed once (the VAE is frozen in stage 2). Stage 1 stops once reconstructed training images
pass the caption-fidelity checker (VAE_TARGET) and is also saved as OUT-vae/, so that stage 2 alone can be
rerun on it with --vae-from OUT-vae; --unet-from continues stage 2 from an earlier run's U-Net and text encoder.
Run:  .venv/bin/python scripts/train_toy_teacher.py  [--out DIR] [--quick] [--vae-from DIR] [--unet-from DIR]
On the 2-core dev machine stage 1 took 24 min (0.6 s/step) and stage 2 runs at about 1.0 s/step; the committed
weights had 3,700 stage-2 steps over three chained runs (their commands are in training.json's history).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --- settings ------------------------------------------------------------------------------------------
SEED = 0
# torch threads per stage, measured on the 2-core dev machine: the VAE's convolutions gain from both cores
# (0.49 vs 0.82 s/step), the micro U-Net's small kernels do not (0.93 s/step with one thread, 1.05 with two).
VAE_THREADS = 2
UNET_THREADS = 1
N_IMAGES = 4096  # shapes images (seeded by SEED)
VAE_STEPS = 2400  # at most: stage 1 stops early once reconstructions reach VAE_TARGET
VAE_TARGET = 0.95  # caption fidelity of reconstructed training images (checked every 200 steps)
VAE_BATCH = 16
VAE_CROP = 32  # the VAE is convolutional: random 32 px crops (on the 8 px latent grid) cost a quarter
VAE_LR = 2e-3
VAE_KL_WEIGHT = 1e-6
VAE_FG_WEIGHT = 5.0  # extra L2 weight on shape pixels: a small shape's colour is most of what matters
UNET_STEPS = 1500
UNET_BATCH = 32
UNET_LR = 1e-3
TEXT_LR = 1e-3
UNET_WARMUP = 100
P_UNCOND = 0.1  # caption dropout, for classifier-free guidance
EVAL_PROMPTS = 48
EVAL_STEPS = 25
EVAL_GUIDANCE = 5.0
OUT = Path(__file__).resolve().parents[1] / "src" / "slimsd" / "toy" / "assets" / "toy-sd"
# ---------------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_vae(vae, pixels: torch.Tensor, steps: int, gen: torch.Generator, check=None) -> None:
    # Start the posterior nearly deterministic (log-variance -12): with the random init's unit variance the
    # sampling noise drowns the encoder's small means and the decoder learns nothing for hundreds of steps.
    # Trainers sample latents as mean + std * eps, so a small std also keeps their latents clean.
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(-12.0)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, VAE_LR, 50)
        idx = torch.randint(0, len(pixels), (VAE_BATCH,), generator=gen)
        x = pixels[idx]
        if x.shape[-1] > VAE_CROP:
            cells = (x.shape[-1] - VAE_CROP) // 8 + 1
            i, j = (8 * int(torch.randint(0, cells, (1,), generator=gen)) for _ in range(2))
            x = x[..., i : i + VAE_CROP, j : j + VAE_CROP]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # Shape pixels (far from the white background) weigh more: with plain L2 the decoder spends hundreds
        # of steps on the background and on grey blobs before it learns colour.
        weight = 1.0 + VAE_FG_WEIGHT * ((x - 1.0).abs().amax(dim=1, keepdim=True) > 0.1).float()
        loss = (weight * (recon - x) ** 2).mean() + VAE_KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if check is not None and (step + 1) % 200 == 0:
            fid = check()
            log(f"vae step {step + 1}: reconstruction fidelity {fid:.3f}")
            if fid >= VAE_TARGET:
                break
        if step % 50 == 0 or step == steps - 1:
            log(
                f"vae step {step}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1):.2f} s/step)"
            )
    vae.eval()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i : i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)])


def token_ids(pipe, captions: list[str]) -> torch.Tensor:
    return pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_text(pipe, captions: list[str]) -> torch.Tensor:
    return pipe.text_encoder(token_ids(pipe, captions))[0]


def check_captions_distinguishable(pipe) -> None:
    """The frozen random text encoder must map captions that differ in one word to clearly different states."""
    pairs = [
        ("a red circle", "a blue circle"),
        ("a red circle", "a red square"),
        ("a small red circle", "a large red circle"),
        ("a red circle on the left", "a red circle on the right"),
    ]
    for a, b in pairs:
        ea, eb = encode_text(pipe, [a, b])
        rel = ((ea - eb).norm() / ea.norm()).item()
        assert rel > 0.05, f"text encoder hardly separates {a!r} and {b!r} (relative difference {rel:.3f})"
    log("text encoder separates captions that differ in one word")


def train_unet(pipe, latents, ids, uncond_ids, steps: int, gen: torch.Generator, check=None) -> None:
    """Epsilon-prediction task loss; the text encoder learns with the U-Net (TEXT_LR).

    A frozen *random* text encoder separates captions only by a few percent (its position embeddings dominate),
    and a U-Net trained on it for 1500 steps drew clean shapes of random colour (caption fidelity 0.06, colour
    accuracy below chance): it never found the caption in the states. Trained jointly, the encoder carries
    the colour and shape words to the cross-attention (SD's CLIP arrives pretrained; ours learns here).
    """
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    unet.train()
    text_encoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": UNET_LR},
            {"params": text_encoder.parameters(), "lr": TEXT_LR},
        ],
        weight_decay=0.01,
    )
    params = [*unet.parameters(), *text_encoder.parameters()]
    alphas = scheduler.alphas_cumprod.float()
    t0 = time.time()
    ema = None
    for step in range(steps):
        for g, base in zip(opt.param_groups, (UNET_LR, TEXT_LR), strict=True):
            g["lr"] = lr_at(step, steps, base, UNET_WARMUP)
        idx = torch.randint(0, len(latents), (UNET_BATCH,), generator=gen)
        z0 = latents[idx]
        batch_ids = ids[idx].clone()
        drop = torch.rand(UNET_BATCH, generator=gen) < P_UNCOND
        batch_ids[drop] = uncond_ids
        cond = text_encoder(batch_ids)[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (UNET_BATCH,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"unet step {step}/{steps} loss(ema) {ema:.4f} ({(time.time() - t0) / (step + 1):.2f} s/step)"
            )
        if check is not None and (step + 1) % 250 == 0:
            unet.eval()
            text_encoder.eval()
            log(f"unet step {step + 1}: quick caption fidelity {check():.3f}")
            unet.train()
            text_encoder.train()
    unet.eval()
    text_encoder.eval().requires_grad_(False)


def evaluate(pipe, n: int, seed: int, steps: int = EVAL_STEPS) -> dict:
    """Caption fidelity of ``n`` samples of held-out captions (seed S+i per image, as `slimsd generate`)."""
    from slimsd.toy.shapes import caption_fidelity, make_captions

    captions = make_captions(n, seed=10_000 + seed)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    images = pipe(
        captions,
        num_inference_steps=steps,
        guidance_scale=EVAL_GUIDANCE,
        generator=gens,
        height=64,
        width=64,
    ).images
    r = caption_fidelity(images, captions, details=True)
    return {k: r[k] for k in ("fidelity", "colour_accuracy", "shape_accuracy", "n")}


def main() -> None:
    global VAE_STEPS, UNET_STEPS, N_IMAGES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test)")
    ap.add_argument("--overwrite", action="store_true", default=True)
    ap.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    ap.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    ap.add_argument("--vae-from", type=Path, help="reuse the VAE of an earlier run's folder (skips stage 1)")
    ap.add_argument(
        "--unet-from", type=Path, help="start stage 2 from an earlier run's U-Net and text encoder"
    )
    args = ap.parse_args()
    VAE_STEPS, UNET_STEPS = args.vae_steps, args.unet_steps
    if args.quick:
        VAE_STEPS, UNET_STEPS, N_IMAGES = 5, 5, 64

    from slimsd.atomic import atomic_dir
    from slimsd.models.micro import build_micro
    from slimsd.toy.shapes import caption_fidelity, make_dataset

    torch.set_num_threads(VAE_THREADS)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    start = time.time()
    pipe = build_micro("micro-sd")
    pipe.set_progress_bar_config(disable=True)
    data = make_dataset(N_IMAGES, seed=SEED)
    pixels = to_tensor([im for im, _ in data])
    captions = [c for _, c in data]
    log(f"{N_IMAGES} shapes images, {len(set(captions))} distinct captions")
    check_captions_distinguishable(pipe)

    def reconstruction_fidelity() -> float:
        with torch.no_grad():
            recon = pipe.vae.decode(pipe.vae.encode(pixels[:64]).latent_dist.mean).sample
        return caption_fidelity(pipe.image_processor.postprocess(recon, output_type="pil"), captions[:64])

    if args.vae_from:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from / "vae", use_safetensors=True)
    else:
        train_vae(pipe.vae, pixels, VAE_STEPS, gen, check=reconstruction_fidelity)
        # Stage 1 is kept on its own, so that stage 2 can be rerun on it with --vae-from.
        with atomic_dir(args.out.with_name(args.out.name + "-vae"), overwrite=True) as tmp:
            pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    vae_fidelity = reconstruction_fidelity()
    log(f"VAE reconstruction fidelity {vae_fidelity:.3f}")
    latents = encode_latents(pipe.vae, pixels)
    scale = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    log(f"latent scaling factor {scale:.4f}")

    if args.unet_from:  # warm start: a U-Net and text encoder from an earlier run's folder
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        pipe.unet = UNet2DConditionModel.from_pretrained(args.unet_from / "unet", use_safetensors=True)
        pipe.text_encoder = CLIPTextModel.from_pretrained(
            args.unet_from / "text_encoder", use_safetensors=True
        )
    ids = token_ids(pipe, captions)
    uncond_ids = token_ids(pipe, [""])[0]
    torch.set_num_threads(UNET_THREADS)

    def quick_fidelity() -> float:  # 16 held-out captions at 10 steps: a trend, not the final score
        return evaluate(pipe, 16, seed=77, steps=10)["fidelity"]

    train_unet(pipe, latents, ids, uncond_ids, UNET_STEPS, gen, check=quick_fidelity)
    train_minutes = (time.time() - start) / 60
    log(f"trained in {train_minutes:.1f} min")

    metrics = {
        "vae_reconstruction_fidelity": vae_fidelity,
        "train_minutes": round(train_minutes, 1),
        "command": "scripts/train_toy_teacher.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in globals().items() if k.isupper() and isinstance(v, int | float)},
    }
    for seed in (0, 1000):
        metrics[f"fidelity_seed{seed}"] = evaluate(pipe, EVAL_PROMPTS if not args.quick else 4, seed)
        log(f"teacher fidelity (seed {seed}): {metrics[f'fidelity_seed{seed}']}")
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

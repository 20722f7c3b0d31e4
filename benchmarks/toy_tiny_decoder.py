"""The tiny decoder on the toy world (issue 24): trained from toy-sd's VAE decoder (objective vae-decoder) over
several training seeds, measured against the full decoder on the same latents (a paired comparison per seed).

For each training seed and each set of latents: PSNR and SSIM of the tiny decoder's image against the full
decoder's image (both as 8-bit images, what a user gets), the mean colour shift per channel in grey levels (tiny -
full, averaged over every pixel of every image; and per image, in absolute value, averaged over the images:
opposite shifts of two images do not cancel there), and on sampled sets the caption fidelity of the images through
each decoder (colour and shape read back from the pixels, slimsd.toy.shapes.caption_fidelity), their ratio and the
images only one decoder gets right. The evaluation's sets (latent_sets):
- reconstructions: 256 fresh shapes images of all 24 colour x shape combinations (their own image stream, none
  pixel-identical to a training image: data_checks), encoded by the teacher's VAE (posterior mean x scaling);
- teacher_seen / teacher_held_out: the teacher's latents (its 25 steps, guidance 2) for the demo's evaluation
  captions (its seeds 0, 1, 2, --prompts-per-seed each, the first 24 of each the demo's own, sample seeds as the
  demo draws them) of seen combinations and of held-out ones (in no training data: not the teacher's, not the
  decoder's, not the student's);
- student_seen / student_held_out: the same captions and seeds through the demo's 4-step LCM student (trained here
  as the demo trains it, once: demo_student).
The validation's sets (--sweep: the recipe is chosen there, never on the evaluation's): reconstructions of seen
combinations from another image stream, the teacher's and the student's latents for captions of seen combinations
whose texts no evaluation caption has, from other sample seeds.
Decoder parameters and MACs at 64 px; unless --no-timing, ms per decode of one 64 px latent (full and tiny
interleaved, median and sample std over --repeats, --threads threads) and ms per whole image (`slimsd generate`'s
path) of the teacher at 25 steps with guidance against a 4-step student of the demo's shape with the full and with
the tiny decoder (image_ms), and the parts of an image timed alone (one U-Net evaluation of each, one text
encoding, one decode of each: parts_ms).

The recipe (defaults): --steps 4000 of batch 16 (chosen by --sweep on the validation sets over the other CANDIDATES:
benchmarks/results/toy_tiny_decoder_sweep.json), AdamW 3e-3 with TAESD's betas (0.9, 0.9), no weight decay, cosine
decay after a 50-step warm-up, pixel loss only (--lambda-feat adds the teacher-encoder feature term, which doubles
a step's time), no latent noise (--latent-noise: config key latent_noise), bf16 (the teacher's decode in bf16, the student under autocast; --mixed-precision no: fp32). The
results file of 2026-12-06 was made with the earlier recipe: --steps 400 --learning-rate 1e-3 --adam-betas 0.9 0.99
--weight-decay 0.01 --lambda-feat 0.1 --mixed-precision no.

    python benchmarks/toy_tiny_decoder.py --work runs/toy-tiny-decoder --seeds 0 1 2 \
        [--out benchmarks/results/toy_tiny_decoder.json]
    python benchmarks/toy_tiny_decoder.py --work runs/toy-tiny-decoder --seeds 0 --threads 1 \
        --sweep base-1000 steps-2000 feat-0.1-1000 batch-32-1000 steps-4000 noise-0.1-2000 noise-0.3-2000 \
        --out benchmarks/results/toy_tiny_decoder_sweep.json

--timing-only (another --out): no training and no quality, the times and MACs with the preset in seeded random
weights (the time of a decode does not depend on its weights).

Training resumes (or skips) what --work already holds (--train-only: train and stop, e.g. one process per seed
in parallel after the cache is written); the results file is written whole at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TEACHER = "toy-sd"
# Streams of shapes images no training set draws from (training: shapes:N of seed 0, the decoder's 1,024 and the
# demo student's 2,048): the evaluation's reconstructions, the validation's
EVAL_IMAGE_SEED = 5_000_003
VALIDATION_IMAGE_SEED = 6_000_011
VALIDATION_CAPTION_SEED = 7_000_019
VALIDATION_SAMPLE_SEED = 70_000_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/toy-tiny-decoder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--decoder", default="micro-tiny-decoder")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.9], help="TAESD's (0.9, 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--mixed-precision",
        default="bf16",
        help="training's: bf16 (the teacher decodes in bf16, the student under autocast) or no (fp32)",
    )
    p.add_argument("--lambda-feat", type=float, default=0.0)
    p.add_argument(
        "--latent-noise",
        type=float,
        default=0.0,
        help="config key latent_noise: sigma x N(0, 1) added to the training latents (U-Net latent units)",
    )
    p.add_argument("--data-images", type=int, default=1024)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--image-repeats", type=int, default=5, help="whole images timed per row (image_ms)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-only", action="store_true", help="train (or finish) the seeds' decoders and stop")
    p.add_argument(
        "--no-timing",
        action="store_true",
        help="quality only (no ms: a run outside the benchmark lock); --timing-only gives the times",
    )
    p.add_argument(
        "--timing-only",
        action="store_true",
        help="no training: MACs and times with the preset's decoder in seeded random weights (another --out)",
    )
    p.add_argument(
        "--prompts-per-seed",
        type=int,
        default=64,
        help="evaluation captions per demo evaluation seed (0, 1, 2) and split (seen, held-out); the first 24 are "
        "the demo's",
    )
    p.add_argument(
        "--sweep",
        nargs="*",
        metavar="NAME",
        help="choose the recipe: train the named CANDIDATES (all when none is named) for --seeds and measure them "
        "on the validation sets only (never the evaluation's); --out names the sweep's results file",
    )
    p.add_argument("--out", default="benchmarks/results/toy_tiny_decoder.json")
    args = p.parse_args(argv)
    unknown = [n for n in args.sweep or [] if n not in CANDIDATES]
    if unknown:
        print(f"--sweep {unknown[0]!r}: allowed {', '.join(CANDIDATES)}", file=sys.stderr)
        sys.exit(2)
    return args


# Recipes the sweep (--sweep) compares on the validation sets: overrides of the command line's recipe (batch 16,
# pixel loss by default). Three ways to spend twice the base's compute (more steps, the feature term, which
# doubles a step's time, or twice the batch) against the base of 1000 steps, and four times the steps.
CANDIDATES: dict[str, dict] = {
    "base-1000": {"steps": 1000},
    "steps-2000": {"steps": 2000},
    "feat-0.1-1000": {"steps": 1000, "lambda_feat": 0.1},
    "batch-32-1000": {"steps": 1000, "batch_size": 32},
    "steps-4000": {"steps": 4000},
    # latent noise augmentation (config key latent_noise): the decoder also trains off the posterior's manifold,
    # where the student's latents lie; against steps-2000, the same compute
    "noise-0.1-2000": {"steps": 2000, "latent_noise": 0.1},
    "noise-0.3-2000": {"steps": 2000, "latent_noise": 0.3},
}
RECIPE_KEYS = (
    "steps",
    "batch_size",
    "learning_rate",
    "adam_betas",
    "weight_decay",
    "mixed_precision",
    "lambda_feat",
    "latent_noise",
)


def recipe_of(args, overrides: dict | None = None) -> dict:
    return {k: getattr(args, k) for k in RECIPE_KEYS} | (overrides or {})


def recipe_dir(work: Path, recipe: dict, seed: int) -> Path:
    """Where a recipe's decoder of SEED trains: one folder per recipe, shared by the sweep and the evaluation (a
    recipe's seed-0 decoder trained by the sweep is the evaluation's, the training does not see either's data)."""
    tag = "-".join(
        [
            f"steps{recipe['steps']}",
            f"b{recipe['batch_size']}",
            f"lr{recipe['learning_rate']:g}",
            "betas{:g}-{:g}".format(*recipe["adam_betas"]),
            f"wd{recipe['weight_decay']:g}",
            f"feat{recipe['lambda_feat']:g}",
            recipe["mixed_precision"],
        ]
        + ([f"noise{recipe['latent_noise']:g}"] if recipe["latent_noise"] else [])
    )
    return work / "decoders" / tag / f"seed-{seed}"


def train_seed(args, cache: Path, seed: int, recipe: dict) -> Path:
    from slimsd.train.config import make_config
    from slimsd.train.distill import train

    out = recipe_dir(Path(args.work), recipe, seed)
    if (out / "final" / "config.json").exists():
        return out / "final"
    cfg = make_config(
        {
            "objective": "vae-decoder",
            "teacher": TEACHER,
            "student": args.decoder,
            "data": str(cache),
            "output_dir": str(out),
            "max_steps": recipe["steps"],
            "batch_size": recipe["batch_size"],
            "learning_rate": recipe["learning_rate"],
            "adam_beta1": recipe["adam_betas"][0],
            "adam_beta2": recipe["adam_betas"][1],
            "weight_decay": recipe["weight_decay"],
            "lr_scheduler": "cosine",
            "lr_warmup_steps": min(50, recipe["steps"] // 10),
            "lambda_task": 0.0,
            "lambda_out": 1.0,
            "lambda_feat": recipe["lambda_feat"],
            "latent_noise": recipe["latent_noise"],
            "resolution": 64,
            "mixed_precision": recipe["mixed_precision"],
            "checkpoint_every": 200,
            "resume": "latest",
            "seed": seed,
            "progress": False,
            "tensorboard": False,
        }
    )
    return Path(train(cfg)["final_dir"] or Path(cfg.output_dir) / "final")


# --- image metrics, on uint8 images (N, H, W, 3) ------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """A decoder's [-1, 1] output as the 8-bit images a pipeline returns (diffusers' postprocess: clip, round)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return [float(10 * np.log10(255.0**2 / max(m, 1e-12))) for m in mse]


def ssim(a: np.ndarray, b: np.ndarray) -> list[float]:
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, per channel, valid region,
    mean over pixels and channels; one value per image."""
    x = torch.from_numpy(a).double().permute(0, 3, 1, 2) / 255
    y = torch.from_numpy(b).double().permute(0, 3, 1, 2) / 255
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :]) / g.sum() ** 2
    w = w.expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, w, groups=3)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).tolist()


def compare(full: np.ndarray, tiny: np.ndarray) -> dict:
    p, s = psnr(tiny, full), ssim(tiny, full)
    diff = tiny.astype(np.float64) - full.astype(np.float64)
    shift = diff.mean(axis=(0, 1, 2))
    per_image = np.abs(
        diff.mean(axis=(1, 2))
    )  # (images, channels): opposite errors of two images do not cancel
    return {
        "psnr_db": statistics.fmean(p),
        "psnr_db_min": min(p),
        "ssim": statistics.fmean(s),
        "colour_shift_rgb": [float(v) for v in shift],
        "colour_shift_max_abs": float(np.abs(shift).max()),
        "colour_shift_per_image_abs_rgb": [float(v) for v in per_image.mean(axis=0)],
        "colour_shift_per_image_abs_max": float(per_image.mean(axis=0).max()),
        "images": len(full),
    }


# --- latents -------------------------------------------------------------------------------------------------


def shapes_images(n: int, seed: int, split: str) -> list:
    from slimsd.toy.shapes import make_dataset

    return make_dataset(n, seed=seed, size=64, split=split)


def digest(image) -> str:
    import hashlib

    return hashlib.sha256(image.tobytes()).hexdigest()


def training_images(args) -> list:
    """Every training image's (image, caption): the decoder's (shapes:--data-images of seed 0) and the demo
    student's (shapes:2048 of seed 0): the smaller set is the larger's start."""
    from slimsd.toy.demo import DemoConfig

    return shapes_images(max(args.data_images, DemoConfig().data_images), 0, "seen")


def fresh_images(n: int, seed: int, split: str, exclude: set[str]) -> tuple[list, int]:
    """The first N images of SPLIT's stream SEED whose pixels no training image has (a shape's position is drawn
    continuously but drawn on a pixel grid, so a few fresh draws repeat a training image exactly), and how many
    were skipped."""
    kept, skipped = [], 0
    for im, _ in shapes_images(2 * n, seed, split):
        if len(kept) == n:
            break
        if digest(im) in exclude:
            skipped += 1
        else:
            kept.append(im)
    return kept, skipped


def reconstruction_latents(pipe, images: list) -> torch.Tensor:
    """IMAGES encoded by the teacher's VAE: posterior mean x scaling factor."""
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images]
    )
    with torch.no_grad():
        mean = pipe.vae.encode(pixels / 127.5 - 1).latent_dist.mean
    return mean * pipe.vae.config.scaling_factor


def evaluation_captions(per_seed: int, split: str) -> tuple[list[str], list[int]]:
    """The demo's evaluation captions of SPLIT, PER_SEED for each of its evaluation seeds (its first 24 are the
    demo's own), and their sample seeds as the demo draws them (caption i of seed s: 10_000 * (s + 1) + i)."""
    from dataclasses import replace

    from slimsd.toy.demo import DemoConfig, eval_captions

    cfg = replace(DemoConfig(), eval_prompts=per_seed)
    captions, seeds = [], []
    for s in cfg.eval_seeds:
        c = eval_captions(cfg, s, split)
        captions += c
        seeds += [10_000 * (s + 1) + i for i in range(len(c))]
    return captions, seeds


def validation_captions(n: int, exclude: set[str]) -> tuple[list[str], list[int]]:
    """N captions to choose the recipe on: draws of seen combinations (VALIDATION_CAPTION_SEED's stream) whose text
    no evaluation caption has, none of held-out ones; sample seeds VALIDATION_SAMPLE_SEED + i (the evaluation's are
    below 40_000)."""
    import random

    from slimsd.toy.shapes import sample_scene

    rng, out = random.Random(VALIDATION_CAPTION_SEED), []
    while len(out) < n:
        caption = sample_scene(rng, "seen").caption
        out += [caption] if caption not in exclude else []
    return out, [VALIDATION_SAMPLE_SEED + i for i in range(n)]


def sample_latents(pipe, captions: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    """PIPE's latents for CAPTIONS (caption i from generator seed SEEDS[i]) at STEPS and GUIDANCE (an LCM student:
    its guidance embedding, its own scheduler)."""
    out = []
    for i in range(0, len(captions), 64):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + 64]]
        with torch.no_grad():
            r = pipe(
                captions[i : i + 64],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                height=64,
                width=64,
                output_type="latent",
            )
        out.append(r.images)
    return torch.cat(out)


def latent_sets(args, pipe, student, which: str) -> dict[str, tuple[torch.Tensor, list[str] | None]]:
    """The latents each decoder decodes, and the captions of sampled sets (cached in --work).

    evaluation: reconstructions (256 fresh images of all 24 combinations, EVAL_IMAGE_SEED, none pixel-identical to
    a training image), the teacher's samples
    (25 steps, guidance 2) and the demo's 4-step LCM student's (guidance 2 through its embedding) for the demo's
    evaluation captions of seen and of held-out combinations (3 seeds x --prompts-per-seed each);
    validation (to choose the recipe on): reconstructions of seen combinations from another image stream, the
    teacher's and the student's samples for as many captions of seen combinations, other texts, other seeds."""
    from safetensors.torch import load_file, save_file

    from slimsd.toy.demo import DemoConfig

    cfg, work = DemoConfig(), Path(args.work)
    n = 3 * args.prompts_per_seed
    name = f"latents-{which}-{n}"
    tensors_file, captions_file = work / f"{name}.safetensors", work / f"{name}.json"
    if not tensors_file.exists():
        captions = {
            split: evaluation_captions(args.prompts_per_seed, split) for split in ("seen", "held_out")
        }
        if which == "validation":
            taken = {c for caps, _ in captions.values() for c in caps}
            captions = {"seen": validation_captions(n, taken)}
        tensors, named = {}, {}
        for split, (caps, seeds) in captions.items():
            tensors[f"teacher_{split}"] = sample_latents(
                pipe, caps, seeds, cfg.inference_steps, cfg.guidance_scale
            )
            tensors[f"student_{split}"] = sample_latents(
                student, caps, seeds, cfg.lcm_inference_steps, cfg.guidance_scale
            )
            named |= {f"teacher_{split}": caps, f"student_{split}": caps}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensors_file))
        captions_file.write_text(json.dumps(named), encoding="utf-8")
    images, _ = fresh_images(
        args.eval_images,
        EVAL_IMAGE_SEED if which == "evaluation" else VALIDATION_IMAGE_SEED,
        "all" if which == "evaluation" else "seen",
        {digest(im) for im, _ in training_images(args)},
    )
    sampled = {k: v for k, v in load_file(str(tensors_file)).items() if k != "reconstructions"}
    tensors = {"reconstructions": reconstruction_latents(pipe, images)} | sampled
    named = json.loads(captions_file.read_text(encoding="utf-8"))
    return {k: (tensors[k], named.get(k)) for k in tensors}


def decode_ms(pipe, decoder, repeats: int) -> dict:
    """ms per decode of one 64 px latent, full and tiny interleaved (after 3 warm-up rounds)."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"full": [], "tiny": []}
    calls = {
        "full": lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor),
        "tiny": lambda: decoder.decode(z),
    }
    with torch.inference_mode():
        for r in range(repeats + 3):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                if r >= 3:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {f"{k}_ms": statistics.median(v) for k, v in times.items()} | {
        f"{k}_ms_std": statistics.stdev(v) for k, v in times.items()
    }


def lcm_student(work: Path, cache: Path) -> Path:
    """A 4-step student of the demo's shape (bk-small of toy-sd step-distilled by LCM, guidance embedding) for
    timing only: one LCM step from the compressed teacher (the time of an image does not depend on the weights)."""
    from dataclasses import replace

    from slimsd.models.compress import compress
    from slimsd.toy.demo import DemoConfig, lcm_config
    from slimsd.train.distill import train

    cfg = DemoConfig()
    init, out = work / "student-init", work / "lcm-student"
    if not (init / "model_index.json").exists():
        compress(TEACHER, cfg.recipe, init)
    if not (out / "final" / "model_index.json").exists():
        train(replace(lcm_config(cfg, init, cache, out), max_steps=1, progress=False, tensorboard=False))
    return out / "final"


def image_ms(student: Path, decoder: Path, repeats: int) -> dict:
    """Median ms of one whole 64 px image as `slimsd generate` makes it (text encoding, every U-Net evaluation,
    decode; the fast runtime), round-robin: the teacher at its 25 steps with guidance 2 (two U-Net rows a step)
    and the 4-step student (guidance embedding, one row) with the full and with the tiny decoder."""
    from slimsd.measure.bench import time_round_robin
    from slimsd.models.loading import load
    from slimsd.run.generate import generate
    from slimsd.toy.demo import DemoConfig

    cfg = DemoConfig()
    rows = {
        "teacher_25_steps": (load(TEACHER, device="cpu", dtype="fp32"), cfg.inference_steps),
        "student_4_steps_full_decoder": (
            load(str(student), device="cpu", dtype="fp32"),
            cfg.lcm_inference_steps,
        ),
        "student_4_steps_tiny_decoder": (
            load(str(student), device="cpu", dtype="fp32", vae=str(decoder)),
            cfg.lcm_inference_steps,
        ),
    }
    fns = {
        name: lambda p=pipe, n=steps: generate(
            p, "a red circle", steps=n, guidance=cfg.guidance_scale, width=64, height=64, seed=0
        )
        for name, (pipe, steps) in rows.items()
    }
    timings = time_round_robin(fns, "cpu", warmup=1, repeats=repeats)
    ms = {name: t["median_ms"] for name, t in timings.items()}
    spread = {name: statistics.stdev(t["times_s"]) * 1e3 for name, t in timings.items()}
    teacher = ms["teacher_25_steps"]
    return {
        "image_ms": ms,
        "image_ms_std": spread,
        "speedup_vs_teacher": {name: teacher / v for name, v in ms.items() if name != "teacher_25_steps"},
        "student": "bk-small of toy-sd after 1 LCM step (timing only; the demo's student has this shape)",
        "parts_ms": parts_ms(rows["teacher_25_steps"][0], rows["student_4_steps_tiny_decoder"][0], repeats),
    }


def parts_ms(teacher, student, repeats: int) -> dict:
    """Median ms of the parts of an image, each called alone with the shapes generate gives it: one U-Net
    evaluation (the teacher's doubled batch for guidance, the student's single one with its guidance embedding),
    one text encoding, one decode through each decoder. What is left of an image is the pipeline's own work."""
    from slimsd.measure.bench import time_round_robin

    with torch.no_grad():
        cond = teacher.text_encoder(
            teacher.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
        )[0]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    w = torch.zeros(1, student.unet.config.time_cond_proj_dim)
    fns = {
        "teacher_unet_call_batch_2": lambda: teacher.unet(torch.cat([z, z]), t, torch.cat([cond, cond])),
        "student_unet_call_batch_1": lambda: student.unet(z, t, cond, timestep_cond=w),
        "text_encoding": lambda: student.text_encoder(
            student.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids
        ),
        "full_decode": lambda: teacher.vae.decode(z),
        "tiny_decode": lambda: student.vae.decode(z),
    }
    return {
        name: r["median_ms"]
        for name, r in time_round_robin(fns, "cpu", warmup=2, repeats=repeats * 4).items()
    }


def fidelity(images: np.ndarray, captions: list[str]) -> dict:
    """Caption fidelity (colour and shape read back from the pixels, slimsd.toy.shapes) of 8-bit images."""
    from PIL import Image

    from slimsd.toy.shapes import caption_fidelity

    r = caption_fidelity([Image.fromarray(x) for x in images], captions, details=True)
    right = np.array([p["colour_ok"] and p["shape_ok"] for p in r["per_image"]], dtype=bool)
    return {k: r[k] for k in ("fidelity", "colour_accuracy", "shape_accuracy")} | {"right": right}


def header(args, argv, load_start: tuple) -> dict:
    """What every results file of this script starts with: command, date, machine (load at start and end)."""
    from slimsd.measure.machine import run_record

    return run_record(argv, args.threads, load_start) | {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "teacher": TEACHER,
    }


def timing_only(args, argv, load_start: tuple, work: Path, cache: Path) -> dict:
    """--timing-only: no training, no quality: decoder MACs, ms per decode and ms per whole image with the
    preset's decoder in seeded random weights (time does not depend on the weights)."""
    from slimsd.atomic import atomic_write_text
    from slimsd.models.counting import decoder_counts
    from slimsd.models.decoders import build_tiny_decoder
    from slimsd.models.loading import load

    pipe = load(TEACHER, device="cpu", dtype="fp32", optimize=False)
    decoder = build_tiny_decoder(args.decoder, dict(pipe.vae.config)).eval()
    folder = work / f"untrained-{args.decoder}"
    decoder.save_pretrained(folder, safe_serialization=True)
    per_image = image_ms(lcm_student(work, cache), folder, args.image_repeats)
    full_params, full_macs = decoder_counts(pipe.vae, 64)
    tiny_params, tiny_macs = decoder_counts(decoder, 64)
    result = header(args, argv, load_start) | {
        "weights": f"{args.decoder} in seeded random weights: timing only",
        "decoder_params": {"full": full_params, "tiny": tiny_params},
        "decoder_macs_64px": {"full": full_macs, "tiny": tiny_macs, "ratio": full_macs / tiny_macs},
        "decode_ms": decode_ms(pipe, decoder, args.repeats),
        "per_image": per_image,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["per_image"]), flush=True)
    return result


def demo_student(work: Path) -> Path:
    """The demo's 4-step student, trained as `slimsd demo` trains it (DemoConfig's defaults): bk-small of toy-sd,
    KD (150 steps), then LCM (300 steps), on the demo's cache (shapes:2048 of seed 0); once, kept in --work."""
    from dataclasses import replace

    from slimsd.models.compress import compress
    from slimsd.toy.demo import DemoConfig, distill_config, lcm_config
    from slimsd.train.cache import write_cache
    from slimsd.train.distill import train

    cfg, root = DemoConfig(), work / "demo-student"
    final = root / "lcm_student" / "final"
    if (final / "model_index.json").exists():
        return final
    cache = root / "cache"
    if not (cache / "cache.json").exists():
        write_cache(TEACHER, f"shapes:{cfg.data_images}", cache, resolution=64, seed=cfg.seed)
    if not (root / "student-init" / "model_index.json").exists():
        compress(TEACHER, cfg.recipe, root / "student-init")
    kd = root / "kd_student"
    if not (kd / "final" / "model_index.json").exists():
        train(replace(distill_config(cfg, root / "student-init", cache, kd, kd=True), progress=False))
    train(replace(lcm_config(cfg, kd / "final", cache, root / "lcm_student"), progress=False))
    return final


def data_checks(args, sets: dict) -> dict:
    """What the measured sets share with the training data: reconstruction images pixel-identical to a training
    image (the decoder's and the demo student's; skipped by fresh_images: how many, and that none is left),
    held-out combinations in any training caption, and evaluation caption texts among the validation's."""
    from slimsd.toy.shapes import HELD_OUT, parse_caption

    training = training_images(args)
    trained = {digest(im) for im, _ in training}
    n = args.eval_images
    evaluation, skipped_eval = fresh_images(n, EVAL_IMAGE_SEED, "all", trained)
    validation, skipped_val = fresh_images(n, VALIDATION_IMAGE_SEED, "seen", trained)
    evaluation, validation = {digest(im) for im in evaluation}, {digest(im) for im in validation}
    combos = {(parse_caption(c).colour, parse_caption(c).shape) for _, c in training}
    held = [c for k, (_, caps) in sets["evaluation"].items() if k.endswith("held_out") for c in caps]
    val = {c for _, caps in sets["validation"].values() if caps for c in caps}
    ev = {c for _, caps in sets["evaluation"].values() if caps for c in caps}
    return {
        "training_images": len(training),
        "evaluation_reconstructions_skipped_as_training_images": skipped_eval,
        "validation_reconstructions_skipped_as_training_images": skipped_val,
        "evaluation_reconstructions_in_training": len(evaluation & trained),
        "validation_reconstructions_in_training": len(validation & trained),
        "validation_reconstructions_in_evaluation": len(validation & evaluation),
        "held_out_combinations_in_training": len(combos & HELD_OUT),
        "held_out_captions_not_held_out": sum(
            (parse_caption(c).colour, parse_caption(c).shape) not in HELD_OUT for c in held
        ),
        "validation_captions_in_evaluation": len(val & ev),
    }


def measure_decoder(decoder, full_images: dict, sets: dict) -> dict:
    """One trained decoder on every set: the images against the full decoder's (the same latents), and on sampled
    sets the caption fidelity of both and the paired count of images only one of them gets right."""
    row = {}
    for name, (z, captions) in sets.items():
        with torch.no_grad():
            tiny = to_uint8(decoder.decode(z).sample)
        row[name] = compare(full_images[name], tiny)
        if captions:
            full_fid, tiny_fid = fidelity(full_images[name], captions), fidelity(tiny, captions)
            row[name] |= {
                "fidelity_full": full_fid["fidelity"],
                "fidelity_tiny": tiny_fid["fidelity"],
                "fidelity_ratio": tiny_fid["fidelity"] / full_fid["fidelity"],
                "colour_accuracy_tiny": tiny_fid["colour_accuracy"],
                "shape_accuracy_tiny": tiny_fid["shape_accuracy"],
                "only_full_right": int(np.sum(full_fid["right"] & ~tiny_fid["right"])),
                "only_tiny_right": int(np.sum(tiny_fid["right"] & ~full_fid["right"])),
            }
    return row


def summarise(per_seed: list[dict], sets: dict) -> dict:
    """Mean +- sample std over the training seeds of each set's figures (worst seed for the colour shifts)."""

    def mean_sd(values):
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out = {}
    for name, (_, captions) in sets.items():
        rows = [r[name] for r in per_seed]
        out[name] = {
            "images": rows[0]["images"],
            "psnr_db": mean_sd([r["psnr_db"] for r in rows]),
            "ssim": mean_sd([r["ssim"] for r in rows]),
            "colour_shift_max_abs": max(r["colour_shift_max_abs"] for r in rows),
            "colour_shift_per_image_abs_max": max(r["colour_shift_per_image_abs_max"] for r in rows),
        }
        if captions:
            out[name] |= {
                "fidelity_full": rows[0]["fidelity_full"],
                "fidelity_tiny": mean_sd([r["fidelity_tiny"] for r in rows]),
                "fidelity_ratio": mean_sd([r["fidelity_ratio"] for r in rows]),
                "fidelity_ratio_min": min(r["fidelity_ratio"] for r in rows),
            }
    return out


def measure(args, seeds_dirs: dict, sets: dict) -> tuple[list[dict], dict]:
    from slimsd.models.decoders import load_decoder
    from slimsd.models.loading import load

    pipe = load(TEACHER, device="cpu", dtype="fp32", optimize=False)
    with torch.no_grad():
        full_images = {
            name: to_uint8(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample)
            for name, (z, _) in sets.items()
        }
    per_seed = []
    for seed, final in seeds_dirs.items():
        row = {"seed": seed, "final": str(final)} | measure_decoder(load_decoder(final), full_images, sets)
        per_seed.append(row)
        brief = {k: (v["psnr_db"], v.get("fidelity_ratio")) for k, v in row.items() if isinstance(v, dict)}
        print(f"seed {seed}: (PSNR, fidelity ratio) {json.dumps(brief)}", flush=True)
    return per_seed, summarise(per_seed, sets)


def all_sets(args) -> dict:
    """Evaluation and validation latent sets (sampled once, cached in --work)."""
    from slimsd.models.loading import load

    pipe = load(TEACHER, device="cpu", dtype="fp32", optimize=False)
    student = load(str(demo_student(Path(args.work))), device="cpu", dtype="fp32", optimize=False)
    return {which: latent_sets(args, pipe, student, which) for which in ("evaluation", "validation")}


def train_recipes(args, cache: Path, recipes: dict[str, dict]) -> dict[str, dict[int, Path]]:
    finals: dict[str, dict[int, Path]] = {}
    for name, recipe in recipes.items():
        finals[name] = {}
        for seed in args.seeds:
            t0 = time.perf_counter()
            finals[name][seed] = train_seed(args, cache, seed, recipe)
            print(f"{name} seed {seed}: {finals[name][seed]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return finals


CHOICE_RULE = (
    "the cheapest candidate (optimizer steps x batch x 2 with the feature term) that meets every target on every "
    "validation set (PSNR >= 28 dB, every channel's mean shift <= 2 grey levels, caption fidelity >= 97% of the full "
    "decoder's, means over the seeds); when none does, the one with the highest mean PSNR over the sampled sets"
)


def cost(recipe: dict) -> float:
    return recipe["steps"] * recipe["batch_size"] * (2 if recipe["lambda_feat"] else 1)


def meets(summary: dict) -> bool:
    return all(
        s["psnr_db"]["mean"] >= 28
        and s["colour_shift_max_abs"] <= 2
        and ("fidelity_ratio" not in s or s["fidelity_ratio"]["mean"] >= 0.97)
        for s in summary.values()
    )


def choose(candidates: dict) -> str:
    """CHOICE_RULE over the sweep's candidates."""
    passing = [n for n, c in candidates.items() if meets(c["summary"])]
    if passing:
        return min(passing, key=lambda n: cost(candidates[n]["recipe"]))

    def sampled_psnr(name):
        return statistics.fmean(
            s["psnr_db"]["mean"] for s in candidates[name]["summary"].values() if "fidelity_ratio" in s
        )

    return max(candidates, key=sampled_psnr)


def sweep(args, argv, load_start: tuple, cache: Path) -> dict:
    """--sweep: the candidates on the validation sets only; the recipe is chosen from this file."""
    from slimsd.atomic import atomic_write_text

    names = args.sweep or list(CANDIDATES)
    recipes = {n: recipe_of(args, CANDIDATES[n]) for n in names}
    finals = train_recipes(args, cache, recipes)
    if args.train_only:
        return {}
    sets = all_sets(args)
    result = header(args, argv, load_start) | {
        "what": "recipe candidates on the VALIDATION sets (other images, captions and seeds than the evaluation's)",
        "data_checks": data_checks(args, sets),
        "candidates": {},
    }
    for name, recipe in recipes.items():
        per_seed, summary = measure(args, finals[name], sets["validation"])
        result["candidates"][name] = {"recipe": recipe, "per_seed": per_seed, "summary": summary}
    result["rule"] = CHOICE_RULE
    result["chosen"] = choose(result["candidates"])
    result["machine"]["loadavg_end"] = os.getloadavg()
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    for name, c in result["candidates"].items():
        brief = {
            k: (round(v["psnr_db"]["mean"], 2), v.get("fidelity_ratio", {}).get("mean"))
            for k, v in c["summary"].items()
        }
        print(f"{name}: {json.dumps(brief)}", flush=True)
    return result


def main(argv=None) -> dict:
    from slimsd.atomic import atomic_write_text
    from slimsd.models.counting import decoder_counts
    from slimsd.models.decoders import load_decoder
    from slimsd.models.loading import load
    from slimsd.train.cache import write_cache

    args = parse_args(argv)
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cache = work / "cache"
    if not (cache / "cache.json").exists():
        write_cache(TEACHER, f"shapes:{args.data_images}", cache, resolution=64, seed=0)
    if args.timing_only:
        return timing_only(args, argv, load_start, work, cache)
    if args.sweep is not None:
        return sweep(args, argv, load_start, cache)
    finals = train_recipes(args, cache, {"recipe": recipe_of(args)})["recipe"]
    if args.train_only:
        return {}
    sets = all_sets(args)
    per_seed, summary = measure(args, finals, sets["evaluation"])
    pipe = load(TEACHER, device="cpu", dtype="fp32", optimize=False)
    if not args.no_timing:
        for row, final in zip(per_seed, finals.values(), strict=True):
            row |= decode_ms(pipe, load_decoder(final), args.repeats)
        summary["decode_speedup"] = {
            "mean": statistics.fmean(r["full_ms"] / r["tiny_ms"] for r in per_seed),
            "std": statistics.stdev(r["full_ms"] / r["tiny_ms"] for r in per_seed)
            if len(per_seed) > 1
            else 0.0,
        }
    per_image = None
    if not args.no_timing:
        per_image = image_ms(lcm_student(work, cache), finals[args.seeds[0]], args.image_repeats)
        print(json.dumps(per_image), flush=True)
    full_params, full_macs = decoder_counts(pipe.vae, 64)
    tiny_params, tiny_macs = decoder_counts(load_decoder(finals[args.seeds[0]]), 64)
    result = header(args, argv, load_start) | {
        "decoder_params": {"full": full_params, "tiny": tiny_params},
        "decoder_macs_64px": {"full": full_macs, "tiny": tiny_macs, "ratio": full_macs / tiny_macs},
        "student": "the demo's 4-step LCM student (DemoConfig defaults: bk-small, KD 150 steps, LCM 300 steps)",
        "data_checks": data_checks(args, sets),
        "per_image": per_image,
        "captions": {k: caps for k, (_, caps) in sets["evaluation"].items() if caps},
        "per_seed": per_seed,
        "summary": summary,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()

"""The tiny decoder on the toy world (issue 24): trained from toy-sd's VAE decoder (objective vae-decoder) over
several training seeds, measured against the full decoder.

For each training seed: PSNR and SSIM of the tiny decoder's image against the full decoder's image (both as 8-bit
images, what a user gets), the mean colour shift per channel in grey levels (tiny - full, averaged over every pixel
of every image; and per image, in absolute value, averaged over the images: opposite shifts of two images do not
cancel there), on two sets of latents: reconstructions (fresh shapes images of every colour x shape combination,
encoded by the teacher's VAE: its posterior mean x scaling factor) and samples (the teacher's own latents at its
25 steps and guidance 2 for the demo's evaluation captions: what the decoder decodes in use), and the caption
fidelity of those sampled images through each decoder (colour and shape read back from the pixels,
slimsd.toy.shapes.caption_fidelity: 24 seen + 24 held-out captions of the demo's evaluation seed 0; not the 4-step
student's images: that student is made by the demo, not kept). Decoder parameters and MACs at 64 px, and ms per
decode of one 64 px latent (full and tiny interleaved, median and sample std over --repeats, --threads threads);
ms per whole image (`slimsd generate`'s path) of the teacher at 25 steps with guidance against a 4-step student of
the demo's shape with the full and with the tiny decoder (image_ms), and the parts of an image timed alone (one
U-Net evaluation of each, one text encoding, one decode of each: parts_ms).

The recipe (defaults): --steps 1000 of batch 16, AdamW 3e-3 with TAESD's betas (0.9, 0.9), no weight decay, cosine
decay after a 50-step warm-up, pixel loss only (--lambda-feat adds the teacher-encoder feature term, which doubles
a step's time), bf16 (the teacher's decode in bf16, the student under autocast; --mixed-precision no: fp32). The
results file of 2026-12-06 was made with the earlier recipe: --steps 400 --learning-rate 1e-3 --adam-betas 0.9 0.99
--weight-decay 0.01 --lambda-feat 0.1 --mixed-precision no.

    python benchmarks/toy_tiny_decoder.py --work runs/toy-tiny-decoder --seeds 0 1 2 \
        [--out benchmarks/results/toy_tiny_decoder.json]

--timing-only (another --out): no training and no quality, the times and MACs with the preset in seeded random
weights (the time of a decode does not depend on its weights).

Training resumes (or skips) what --work already holds (--train-only: train and stop, e.g. one process per seed
in parallel after the cache is written); the results file is written whole at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TEACHER = "toy-sd"
EVAL_IMAGE_SEED = (
    5_000_003  # a stream of shapes images no training set draws from (training: shapes:N, seed 0..)
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/toy-tiny-decoder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--decoder", default="micro-tiny-decoder")
    p.add_argument("--steps", type=int, default=1000)
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
    p.add_argument("--out", default="benchmarks/results/toy_tiny_decoder.json")
    return p.parse_args(argv)


def train_seed(args, cache: Path, seed: int) -> Path:
    from slimsd.train.config import make_config
    from slimsd.train.distill import train

    cfg = make_config(
        {
            "objective": "vae-decoder",
            "teacher": TEACHER,
            "student": args.decoder,
            "data": str(cache),
            "output_dir": str(Path(args.work) / f"seed-{seed}"),
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "adam_beta1": args.adam_betas[0],
            "adam_beta2": args.adam_betas[1],
            "weight_decay": args.weight_decay,
            "lr_scheduler": "cosine",
            "lr_warmup_steps": min(50, args.steps // 10),
            "lambda_task": 0.0,
            "lambda_out": 1.0,
            "lambda_feat": args.lambda_feat,
            "resolution": 64,
            "mixed_precision": args.mixed_precision,
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


def reconstruction_latents(pipe, n: int) -> torch.Tensor:
    from slimsd.toy.shapes import make_dataset

    images = make_dataset(n, seed=EVAL_IMAGE_SEED, size=64, split="all")
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im, _ in images]
    )
    with torch.no_grad():
        mean = pipe.vae.encode(pixels / 127.5 - 1).latent_dist.mean
    return mean * pipe.vae.config.scaling_factor


def sample_latents(pipe) -> tuple[torch.Tensor, list[str]]:
    """The teacher's latents for the demo's evaluation captions (seen and held-out, evaluation seed 0), at its own
    steps and guidance, and the captions."""
    from slimsd.toy.demo import DemoConfig, eval_captions

    cfg = DemoConfig()
    captions = eval_captions(cfg, 0, "seen") + eval_captions(cfg, 0, "held_out")
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(captions))]
    with torch.no_grad():
        out = pipe(
            captions,
            num_inference_steps=cfg.inference_steps,
            guidance_scale=cfg.guidance_scale,
            generator=gens,
            height=64,
            width=64,
            output_type="latent",
        )
    return out.images, captions


def decode_both(pipe, decoder, latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        full = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        tiny = decoder.decode(latents).sample
    return to_uint8(full), to_uint8(tiny)


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
    return {k: r[k] for k in ("fidelity", "colour_accuracy", "shape_accuracy")}


def header(args, argv, load_start: tuple) -> dict:
    """What every results file of this script starts with: command, date, machine (load at start and end)."""
    from slimsd.devices import cpu_isa, cpu_model

    return {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_isa": cpu_isa(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "niceness": os.nice(0),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "note": "a machine shared with other jobs: compare ratios within one run, not ms across runs",
        },
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
    finals = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        finals[seed] = train_seed(args, cache, seed)
        print(f"seed {seed}: {finals[seed]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.train_only:
        return {}

    pipe = load(TEACHER, device="cpu", dtype="fp32", optimize=False)
    samples, captions = sample_latents(pipe)
    sets = {"reconstructions": reconstruction_latents(pipe, args.eval_images), "samples": samples}
    full_fid = None
    per_seed = []
    for seed, final in finals.items():
        decoder = load_decoder(final)
        row = {"seed": seed, "final": str(final)}
        for name, z in sets.items():
            full, tiny = decode_both(pipe, decoder, z)
            row[name] = compare(full, tiny)
            if name == "samples":  # the teacher's images through each decoder
                full_fid = fidelity(full, captions)
                row["fidelity_tiny"] = fidelity(tiny, captions)
        if not args.no_timing:
            row |= decode_ms(pipe, decoder, args.repeats)
        per_seed.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "final"}), flush=True)

    per_image = None
    if not args.no_timing:
        per_image = image_ms(lcm_student(work, cache), finals[args.seeds[0]], args.image_repeats)
        print(json.dumps(per_image), flush=True)
    full_params, full_macs = decoder_counts(pipe.vae, 64)
    tiny_params, tiny_macs = decoder_counts(load_decoder(finals[args.seeds[0]]), 64)

    def mean_sd(values):
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    summary = {}
    for name in sets:
        summary[name] = {
            "psnr_db": mean_sd([r[name]["psnr_db"] for r in per_seed]),
            "ssim": mean_sd([r[name]["ssim"] for r in per_seed]),
            "colour_shift_max_abs": max(r[name]["colour_shift_max_abs"] for r in per_seed),
            "colour_shift_per_image_abs_max": max(
                r[name]["colour_shift_per_image_abs_max"] for r in per_seed
            ),
        }
    tf = [r["fidelity_tiny"]["fidelity"] for r in per_seed]
    summary["fidelity_full"] = full_fid["fidelity"]
    summary["fidelity_tiny"] = mean_sd(tf)
    summary["fidelity_ratio"] = mean_sd([f / full_fid["fidelity"] for f in tf])
    if not args.no_timing:
        summary["decode_speedup"] = mean_sd([r["full_ms"] / r["tiny_ms"] for r in per_seed])
    result = header(args, argv, load_start) | {
        "decoder_params": {"full": full_params, "tiny": tiny_params},
        "decoder_macs_64px": {"full": full_macs, "tiny": tiny_macs, "ratio": full_macs / tiny_macs},
        "full_decoder_fidelity": full_fid,
        "per_image": per_image,
        "captions": captions,
        "per_seed": per_seed,
        "summary": summary,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Full-size end-to-end time per image, random weights: SD v1.4 at 25 steps with classifier-free guidance against
a BK-SDM-Tiny-shaped LCM student at 4 steps (guidance through its embedding, no doubled batch), with the model's
own VAE decoder and with a tiny decoder (issue 24's per-image claim at full size).

Every pipeline is built by slimsd (random weights; the LCM student is bk-sdm-tiny's U-Net with the guidance
embedding ``slimsd distill objective=lcm`` adds, and LCMScheduler; the tiny decoder is a ``--tiny-decoder`` preset
of :mod:`slimsd.models.decoders` in seeded random weights, put in with ``load(..., vae=FOLDER)`` as ``slimsd
generate --vae`` does), gets slimsd's fast runtime in one dtype, and makes one 512 px image through
:func:`slimsd.run.generate.generate`, as ``slimsd generate`` does: text encoding, every U-Net evaluation, decode.
Random weights give the images no meaning; the work per image is what a trained model does. After one untimed
1-step warm-up each, the rows are timed round-robin (A B C, A B C, ...; ``--repeats`` rounds); medians, and the
sample std over rounds.

Run:  .venv/bin/python benchmarks/fullsize_steps.py --threads 2 --dtype bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of an astronaut"


def lcm_student(dtype: str, vae: str | None = None):
    """bk-sdm-tiny in random weights as `slimsd distill objective=lcm` leaves it: guidance embedding, LCM
    scheduler, the fast runtime; with VAE (a tiny decoder folder) in place of its VAE when given."""

    from slimsd.devices import resolve_dtype
    from slimsd.models import runtime
    from slimsd.models.loading import load
    from slimsd.train.config import DistillConfig
    from slimsd.train.consistency import with_guidance_embedding
    from slimsd.train.objectives.lcm import LCM

    torch_dtype = resolve_dtype(dtype, "cpu")
    # vae= as `slimsd generate --vae` swaps it: before the runtime, which then prepares the decoder too
    lcm = load("bk-sdm-tiny", device="cpu", dtype=dtype, random_weights=True, optimize=False, vae=vae)
    lcm.unet = with_guidance_embedding(lcm.unet, 256)
    lcm.scheduler = LCM(DistillConfig(objective="lcm")).final_scheduler(lcm.scheduler.config)
    lcm._slimsd["default_scheduler"] = "lcm"
    lcm._slimsd["base_scheduler"] = dict(lcm.scheduler.config)
    runtime.optimize_pipeline(lcm, runtime.RuntimeConfig(device="cpu", dtype=torch_dtype))
    lcm._slimsd["runtime"] = runtime.applied(lcm.unet, optimized=True)
    return lcm


def build(dtype: str, tiny: str, work: Path) -> dict:
    from slimsd.models.decoders import build_tiny_decoder
    from slimsd.models.loading import load

    teacher = load("sd-v1.4", device="cpu", dtype=dtype, random_weights=True)
    folder = work / tiny
    build_tiny_decoder(tiny, dict(teacher.vae.config)).save_pretrained(folder, safe_serialization=True)
    return {
        "sd-v1.4, 25 steps, CFG 7.5": (teacher, 25, 7.5),
        "bk-sdm-tiny LCM, 4 steps, w-embedding 8": (lcm_student(dtype), 4, 8.0),
        f"bk-sdm-tiny LCM, 4 steps, w-embedding 8, {tiny}": (lcm_student(dtype, str(folder)), 4, 8.0),
    }


def count_calls(pipe, guidance: float) -> dict:
    """A 1-step warm-up that counts the U-Net's evaluations and their batch."""
    from slimsd.run.generate import generate

    n = {"calls": 0, "batch": 0}

    def hook(_m, inputs):
        n["calls"] += 1
        n["batch"] = inputs[0].shape[0]

    handle = pipe.unet.register_forward_pre_hook(hook)
    generate(pipe, PROMPT, steps=1, guidance=guidance, seed=0)
    handle.remove()
    return n


def time_rounds(rows: dict, repeats: int) -> dict:
    from slimsd.run.generate import generate

    times = {name: [] for name in rows}
    for _ in range(repeats):
        for name, (pipe, steps, guidance) in rows.items():
            t0 = time.perf_counter()
            generate(pipe, PROMPT, steps=steps, guidance=guidance, seed=0)
            times[name].append(time.perf_counter() - t0)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    return times


def markdown(meta: dict, table: list[dict]) -> str:
    lines = [
        "# fullsize_steps: end-to-end time per 512 px image, random weights",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']['cpu_model']}, {meta['machine']['threads']} torch threads, torch "
        f"{meta['machine']['torch']}, {meta['dtype']}; date {meta['date']}; load average "
        f"{meta['machine']['loadavg_start'][0]:.1f} at start, {meta['machine']['loadavg_end'][0]:.1f} at end.",
        "",
        "| model | steps | U-Net batch | U-Net params | s / image (median ± sample std) | vs SD v1.4 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['row']} | {r['steps']} | {r['unet_batch']} | {r['unet_params']:,} | "
            f"{r['image_s_median']:.2f} ± {r['image_s_std']:.2f} | {r['speedup_vs_sd']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds (at least 2: a sample std)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--tiny-decoder", default="tiny-decoder", help="a slimsd.models.decoders preset")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fullsize_steps")
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error("--repeats must be at least 2 (a sample std needs two rounds)")
    import torch

    from slimsd.atomic import atomic_write_text
    from slimsd.measure.machine import run_record

    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        rows = build(args.dtype, args.tiny_decoder, Path(work))
        calls = {name: count_calls(pipe, guidance) for name, (pipe, _, guidance) in rows.items()}
        times = time_rounds(rows, args.repeats)
    table = [
        {
            "row": name,
            "steps": steps,
            "guidance": guidance,
            "unet_batch": calls[name]["batch"],
            "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
            "decoder_params": sum(p.numel() for p in pipe.vae.decoder.parameters()),
            "image_s_median": statistics.median(times[name]),
            "image_s_std": statistics.stdev(times[name]),
            "image_s_all": times[name],
        }
        for name, (pipe, steps, guidance) in rows.items()
    ]
    base = table[0]["image_s_median"]
    for r in table:
        r["speedup_vs_sd"] = base / r["image_s_median"]
    meta = run_record(None, args.threads, load_start) | {
        "resolution": 512,
        "dtype": args.dtype,
        "weights": "random (slimsd presets; the tiny decoder seeded random)",
        "spread": "sample std over the rounds",
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({**meta, "rows": table}, indent=1) + "\n")
    text = markdown(meta, table)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()

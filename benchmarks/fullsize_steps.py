"""Full-size end-to-end time per image, random weights: SD v1.4 at 25 steps with classifier-free guidance against
a BK-SDM-Tiny-shaped LCM student at 4 steps (guidance through its embedding, no doubled batch).

Both pipelines are built by slimsd (random weights; the LCM student is bk-sdm-tiny's U-Net with the guidance
embedding ``slimsd distill objective=lcm`` adds, and LCMScheduler), get slimsd's fast runtime, and make one
512 px image through :func:`slimsd.run.generate.generate`, as ``slimsd generate`` does: text encoding, every
U-Net evaluation, VAE decode. Random weights give the images no meaning; the work per image is what a trained
model does. Timed A B A B (``--repeats`` each, median), after one untimed 1-step warm-up each.

Run:  .venv/bin/python benchmarks/fullsize_steps.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]


def build(threads: int):
    import torch

    from slimsd.models import runtime
    from slimsd.models.loading import load
    from slimsd.train.config import DistillConfig
    from slimsd.train.consistency import with_guidance_embedding
    from slimsd.train.objectives.lcm import LCM

    torch.set_num_threads(threads)
    teacher = load("sd-v1.4", device="cpu", dtype="fp32", random_weights=True)
    lcm = load("bk-sdm-tiny", device="cpu", dtype="fp32", random_weights=True, optimize=False)
    lcm.unet = with_guidance_embedding(lcm.unet, 256)
    # the scheduler `slimsd distill objective=lcm` saves with its student
    lcm.scheduler = LCM(DistillConfig(objective="lcm")).final_scheduler(lcm.scheduler.config)
    lcm._slimsd["default_scheduler"] = "lcm"
    lcm._slimsd["base_scheduler"] = dict(lcm.scheduler.config)
    runtime.optimize_pipeline(lcm, runtime.RuntimeConfig(device="cpu", dtype=torch.float32))
    lcm._slimsd["runtime"] = runtime.applied(lcm.unet, optimized=True)
    return {
        "sd-v1.4, 25 steps, CFG 7.5": (teacher, 25, 7.5),
        "bk-sdm-tiny LCM, 4 steps, w-embedding 8": (lcm, 4, 8.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fullsize_steps")
    args = ap.parse_args()
    import torch

    from slimsd.devices import cpu_model
    from slimsd.run.generate import generate

    rows = build(args.threads)
    calls = {}
    for name, (pipe, _steps, guidance) in rows.items():  # warm-up, and count U-Net evaluations per step
        n = {"calls": 0, "batch": 0}

        def hook(_m, inputs, _n=n):
            _n["calls"] += 1
            _n["batch"] = inputs[0].shape[0]

        handle = pipe.unet.register_forward_pre_hook(hook)
        generate(pipe, "a photo of an astronaut", steps=1, guidance=guidance, seed=0)
        handle.remove()
        calls[name] = n
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (pipe, steps, guidance) in rows.items():
            t0 = time.perf_counter()
            generate(pipe, "a photo of an astronaut", steps=steps, guidance=guidance, seed=0)
            times[name].append(time.perf_counter() - t0)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    table = []
    for name, (pipe, steps, guidance) in rows.items():
        table.append(
            {
                "row": name,
                "steps": steps,
                "guidance": guidance,
                "unet_batch": calls[name]["batch"],
                "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
                "image_s_median": statistics.median(times[name]),
                "image_s_all": times[name],
            }
        )
    base = table[0]["image_s_median"]
    for r in table:
        r["speedup_vs_sd"] = base / r["image_s_median"]
    meta = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} torch threads",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/fullsize_steps.py " + " ".join(sys.argv[1:]),
        "resolution": 512,
        "dtype": "fp32",
        "weights": "random (slimsd presets)",
    }
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": table}, indent=1) + "\n")
    lines = [
        "# fullsize_steps: end-to-end time per 512 px image, random weights",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, torch {meta['torch']}, fp32; date {meta['date']}.",
        "",
        "| model | steps | U-Net batch | U-Net params | s / image | vs SD v1.4 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['row']} | {r['steps']} | {r['unet_batch']} | {r['unet_params']:,} | "
            f"{r['image_s_median']:.1f} | {r['speedup_vs_sd']:.1f}x |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""DeepCache on the trained toy model: end-to-end time per image and U-Net passes for each interval N.

toy-sd on the CPU in fp32 with one thread, its own scheduler (PNDM), 25 steps, guidance 2, seed 0, the slimsd
runtime; N = 1 (off), 2, 3, 5. The intervals are timed round-robin (repeat r runs every N once, the order
reversed on odd repeats) and the median is kept. Per N: the U-Net calls, how many ran the deep blocks (a forward
hook on the mid block) and how many only the shallow branch, and the mean absolute pixel difference (0-255)
from the N=1 image of the same seed. Under a minute.

    OMP_NUM_THREADS=1 python benchmarks/toy_deep_cache.py

Writes benchmarks/results/toy_deep_cache.json (machine, date and command inside).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from slimsd import load
from slimsd.atomic import atomic_write_text
from slimsd.measure.bench import environment
from slimsd.models import runtime
from slimsd.run.generate import generate

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"prompt": "a red circle", "steps": 25, "guidance": 2.0, "seed": 0}


def count_passes(pipe, interval: int) -> tuple[dict, np.ndarray]:
    """U-Net calls, deep passes and shallow-only passes of one image, and the image."""
    counts = {"unet_calls": 0, "deep_passes": 0}
    unet = pipe.unet

    def bump(key):
        return lambda *_a, **_k: counts.__setitem__(key, counts[key] + 1)

    handles = [
        unet.conv_in.register_forward_hook(bump("unet_calls")),  # every call, full or cached, runs conv_in
        unet.mid_block.register_forward_hook(bump("deep_passes")),
    ]
    try:
        (result,) = generate(pipe, SETTINGS["prompt"], **_kwargs(interval))
    finally:
        for handle in handles:
            handle.remove()
    counts["shallow_only_passes"] = counts["unet_calls"] - counts["deep_passes"]
    return counts, np.asarray(result.image, dtype=np.float64)


def unet_call_ms(pipe, repeats: int = 30) -> dict:
    """Median ms of one full U-Net call and of one cached (shallow-only) call at the CFG batch of one image,
    interleaved: what a cached step saves, apart from the text encoder, the VAE and the scheduler."""
    import torch

    from slimsd.models.counting import unet_dummy_inputs
    from slimsd.run.deepcache import deep_cache

    inputs = unet_dummy_inputs(pipe.unet, 64, batch=2, device="cpu", dtype=torch.float32)
    full, cached = [], []
    with torch.inference_mode(), deep_cache(pipe.unet, 2):
        for _ in range(repeats):
            for kind in (full, cached):  # calls alternate full, cached, full, ...
                t0 = time.perf_counter()
                pipe.unet(**inputs)
                kind.append(time.perf_counter() - t0)
    return {
        "full_ms": round(1000 * statistics.median(full), 2),
        "cached_ms": round(1000 * statistics.median(cached), 2),
    }


def _kwargs(interval: int) -> dict:
    return {
        "steps": SETTINGS["steps"],
        "guidance": SETTINGS["guidance"],
        "seed": SETTINGS["seed"],
        "deep_cache": interval,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "toy_deep_cache.json")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    rt = runtime.RuntimeConfig(device="cpu", threads=1)
    runtime.apply_process_settings(rt)
    pipe = load("toy-sd", device="cpu", dtype="fp32")
    generate(pipe, SETTINGS["prompt"], steps=2, guidance=2.0, seed=0)  # warm-up
    passes, images = {}, {}
    for n in args.intervals:
        passes[n], images[n] = count_passes(pipe, n)
    times = {n: [] for n in args.intervals}
    for r in range(args.repeats):
        for n in args.intervals if r % 2 == 0 else args.intervals[::-1]:
            t0 = time.perf_counter()
            generate(pipe, SETTINGS["prompt"], **_kwargs(n))
            times[n].append(time.perf_counter() - t0)
    first = args.intervals[0]
    out = []
    for n in args.intervals:
        median = statistics.median(times[n])
        out.append(
            {
                "deep_cache": n,
                "time_per_image_s": round(median, 4),
                "times_s": [round(t, 4) for t in times[n]],
                "speedup_vs_first": round(statistics.median(times[first]) / median, 3),
                **passes[n],
                "mean_abs_pixel_diff_vs_first": round(float(np.abs(images[n] - images[first]).mean()), 3),
            }
        )
        print(
            f"N={n}: {median:.3f} s/image ({out[-1]['speedup_vs_first']:.2f}x), "
            f"{passes[n]['deep_passes']}/{passes[n]['unet_calls']} deep passes, "
            f"mean |diff| {out[-1]['mean_abs_pixel_diff_vs_first']:.2f}"
        )
    result = {
        "command": command,
        "model": "toy-sd",
        "settings": {
            **SETTINGS,
            "scheduler": "pndm (the model's own)",
            "dtype": "fp32",
            "repeats": args.repeats,
        },
        "unet_call": unet_call_ms(pipe),
        "environment": {**environment(rt), "process": runtime.process_settings()},
        "rows": out,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"U-Net call at the CFG batch: {result['unet_call']}; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()

"""The articles' table on a GPU: end to end at 25 steps in fp16, slimsd runtime beside plain diffusers.

The source articles report SDXL 82.2 s, SSD-1B 59.4 s, SD 1.4 15.4 s, BK-SDM-small 10.0 s per image on one
GPU (their GPU and settings; not comparable to other GPUs). This script measures the same models with random
weights (identical architectures, no download), text encoding / denoising / VAE decoding apart, with
``--baseline diffusers`` timed in the same run.

    python benchmarks/gpu_end_to_end.py                 # needs CUDA
    python benchmarks/gpu_end_to_end.py --compile       # adds torch.compile (warm-up reported apart)

Writes benchmarks/results/gpu_end_to_end_<class>.{md,json,png}. STATUS: written, not yet run (no GPU was
available when it was written); run it on a CUDA machine and commit the results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from slimsd.atomic import atomic_write_bytes, atomic_write_text
from slimsd.measure import bench

CLASSES = {
    "sd": ["sd-v1.4", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"],
    "sdxl": ["sdxl-base-1.0", "ssd-1b", "segmind-vega"],
}
RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", nargs="+", choices=sorted(CLASSES), default=["sdxl", "sd"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_end_to_end.py needs a CUDA GPU; for CPU use benchmarks/cpu_step_latency.py")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    for cls in args.classes:
        cfg = bench.BenchConfig(
            models=CLASSES[cls],
            device="cuda",
            dtype="fp16",
            random_weights=True,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            batch_sizes=args.batch_sizes,
            compile=args.compile,
            baseline="diffusers",
        )
        rows = bench.run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
        table = bench.markdown_table(rows)
        print(table, flush=True)
        stem = args.out / f"gpu_end_to_end_{cls}"
        md = f"# GPU end to end, {args.steps} steps, fp16: {cls} class\n\nCommand: `{command}`\n\n{table}"
        atomic_write_text(stem.with_suffix(".md"), md)
        atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
        atomic_write_bytes(stem.with_suffix(".png"), bench.chart_png(rows))


if __name__ == "__main__":
    main()

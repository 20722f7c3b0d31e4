"""The articles' model table on CPU: per-step U-Net latency of teachers and students, random weights.

SD-class models at 512 px (sd-v1.4 and the BK-SDM students), SDXL-class models at 1024 px (sdxl-base-1.0,
SSD-1B, Segmind-Vega), a few forwards each. Within a class all U-Nets (and, with --baseline, plain diffusers
eager copies of them) are timed round-robin in one process, so that a shared CPU slows them alike; the
ratios teacher / student are the robust result, the absolute numbers depend on the machine's load (recorded).
With --baseline diffusers, plain diffusers runs beside slimsd in the same dtype and in its default dtype (fp32).

    python benchmarks/cpu_step_latency.py                  # what `make bench` runs
    python benchmarks/cpu_step_latency.py --classes sd --repeats 5

Writes benchmarks/results/cpu_step_latency_<class>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", nargs="+", choices=sorted(CLASSES), default=["sd", "sdxl"])
    ap.add_argument("--repeats", type=int, default=None, help="timed forwards (default: 3 SD, 2 SDXL class)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--baseline",
        choices=["diffusers", "none"],
        default=None,
        help="default: diffusers for the SD class, none for SDXL (copies of 3 SDXL U-Nets would need 18 GB)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. _vs_fp32)")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    for cls in args.classes:
        baseline = args.baseline or ("diffusers" if cls == "sd" else "none")
        cfg = bench.BenchConfig(
            models=CLASSES[cls],
            device="cpu",
            dtype=args.dtype,
            random_weights=True,
            e2e=False,
            warmup=args.warmup,
            repeats=args.repeats or (3 if cls == "sd" else 2),
            threads=args.threads,
            baseline=None if baseline == "none" else baseline,
        )
        rows = bench.run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
        load_end = [round(x, 2) for x in os.getloadavg()]
        for row in rows:
            row["load_average_end"] = load_end
        spread = add_spread(rows)
        table = bench.markdown_table(rows) + spread
        print(table, flush=True)
        stem = args.out / f"cpu_step_latency_{cls}{args.tag}"
        md = f"# CPU per-step U-Net latency: {cls} class\n\nCommand: `{command}`\n\n{table}"
        atomic_write_text(stem.with_suffix(".md"), md)
        atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
        atomic_write_bytes(stem.with_suffix(".png"), bench.chart_png(rows))


def add_spread(rows: list[dict]) -> str:
    """Per row: the sample std of its timed forwards, and the speed-up over the first model of the same variant
    forward by forward (round-robin: forward i of every model ran in the same round), as median and sample std.
    Returns the markdown lines that show them."""
    lines = [
        "",
        "Spread (sample std, n - 1) over the timed forwards; speed-up per round: the first model's forward i over "
        "this model's forward i.",
        "",
        "| model | variant | forwards | step ms median | step ms std | speed-up per round: median | std | min-max |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        times = row["step_latency_all_ms"]
        first = next(r for r in rows if r["variant"] == row["variant"])
        ratios = [a / b for a, b in zip(first["step_latency_all_ms"], times, strict=True)]
        row["step_latency_std_ms"] = statistics.stdev(times) if len(times) > 1 else None
        row["speedup_per_round"] = ratios
        row["speedup_per_round_median"] = statistics.median(ratios)
        row["speedup_per_round_std"] = statistics.stdev(ratios) if len(ratios) > 1 else None
        std = row["step_latency_std_ms"]
        rstd = row["speedup_per_round_std"]
        lines.append(
            f"| {row['model']} | {row['variant']} | {len(times)} | {statistics.median(times):,.1f} | "
            f"{'–' if std is None else f'{std:,.1f}'} | {row['speedup_per_round_median']:.2f} | "
            f"{'–' if rstd is None else f'{rstd:.2f}'} | {min(ratios):.2f}-{max(ratios):.2f} |"
        )
    r = rows[0]
    lines += ["", f"Load average at the start {r.get('load_average')}, at the end {r['load_average_end']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

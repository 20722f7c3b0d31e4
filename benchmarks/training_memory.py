"""The `slimsd distill --dry-run` memory estimate: against measured CPU training steps of the micro models, and
at full size (estimates only).

Measured, in a fresh process each (measure_step.py): what two training steps of the student (forward,
backward, AdamW; the second holds the states the first made) add over its weights on CPU, batch 16 and 64 at
64 px, gradient checkpointing off and on: the peak of the live tensor bytes (deterministic) and of the resident
size (VmHWM, allocator- and environment-dependent), against the estimate's step_peak (AdamW states + the step's
worst moment). Full size: `slimsd distill --dry-run --json` of the README's two runs on 8 processes (meta
device, no download).

    OMP_NUM_THREADS=1 python benchmarks/training_memory.py

Writes benchmarks/results/training_memory.json (machine, date and command inside). About two minutes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from slimsd.atomic import atomic_write_text
from slimsd.measure.bench import environment
from slimsd.models import runtime
from slimsd.train.config import DistillConfig
from slimsd.train.estimate import estimate

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
MICRO = [("micro-sd", "bk-small"), ("micro-sdxl", "ssd-1b")]
FULL = {
    "sd-v1.4 -> bk-small, 512 px, batch 8 per GPU, fp32": dict(
        teacher="sd-v1.4", student="bk-small", resolution=512, batch_size=8
    ),
    "sdxl-base-1.0 -> ssd-1b, 1024 px, batch 1 per GPU, bf16, gradient checkpointing": dict(
        teacher="sdxl-base-1.0",
        student="ssd-1b",
        resolution=1024,
        batch_size=1,
        mixed_precision="bf16",
        gradient_checkpointing=True,
    ),
}
GIB = 2**30


def measured_step(teacher: str, student: str, batch: int, checkpointing: bool) -> dict:
    script = Path(__file__).with_name("measure_step.py")
    args = [teacher, student, "64", str(batch), "1" if checkpointing else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    micro = []
    for teacher, student, batch in [(t, s, b) for t, s in MICRO for b in (16, 64)]:
        for checkpointing in (False, True):
            cfg = DistillConfig(
                teacher=teacher,
                student=student,
                resolution=64,
                batch_size=batch,
                gradient_checkpointing=checkpointing,
            )
            est = estimate(cfg, 1)["memory_per_process"]["ddp"]["step_peak"]
            got = measured_step(teacher, student, batch, checkpointing)
            micro.append(
                {
                    "teacher": teacher,
                    "student": student,
                    "batch_size": batch,
                    "gradient_checkpointing": checkpointing,
                    "estimated_step_bytes": est,
                    "measured_live_peak_bytes": got["live_peak"],
                    "measured_rss_added_bytes": got["rss_added"],
                    "error_vs_live": round(est / got["live_peak"] - 1, 3),
                    "error_vs_rss": round(est / got["rss_added"] - 1, 3),
                }
            )
            print(
                f"{teacher} {student} batch {batch} checkpointing={checkpointing}: {est / 2**20:.1f} MiB "
                f"estimated; measured {got['live_peak'] / 2**20:.1f} MiB live tensors, "
                f"{got['rss_added'] / 2**20:.1f} MiB resident"
            )
    full = {}
    for name, keys in FULL.items():
        est = estimate(DistillConfig(**keys), 8)
        full[name] = {
            "config": keys,
            "gib_per_process": {e: round(p["total"] / GIB, 1) for e, p in est["memory_per_process"].items()},
            "tmacs_per_step": round(est["macs_per_step"] / 1e12, 1),
        }
        print(name, full[name]["gib_per_process"], full[name]["tmacs_per_step"], "TMACs")
    out = {
        "name": "training_memory",
        "command": "OMP_NUM_THREADS=1 python " + shlex.join(["benchmarks/training_memory.py", *sys.argv[1:]]),
        "environment": environment(runtime.RuntimeConfig(device="cpu")),
        "micro_measured": micro,
        "full_size_estimates_8_processes": full,
        "note": "micro: what two CPU training steps add over the weights (peak live tensor bytes, and peak "
        "resident size) vs the estimate's step_peak; the live-tensor peak leaves out allocator slack, library "
        "workspaces and (on GPU) the CUDA context, which the resident size partly shows; full size: estimates "
        "only, never measured (no GPU), activations counted in fp32, attention as the fused kernels store it",
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "training_memory.json", json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

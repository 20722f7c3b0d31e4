"""What the demo's tiny-decoder row costs (issue 24): seconds per optimizer step of the demo's own training runs,
measured in one process, interleaved: the KD student (DemoConfig's KD run), the LCM student (its LCM run) and
the tiny decoder (its vae-decoder run), each trained ``--steps`` steps per round for ``--rounds`` rounds in turn,
on the demo's latent cache (shapes:2048 at 64 px, written once), with ``--threads`` torch threads. Per run: the
median and sample std over rounds of (seconds per step, set-up excluded: a 1-step run's time is subtracted).

From these, the demo's added training time at its default budget is estimated as decoder_steps x the decoder's
seconds per step, and set against the KD, task-only and LCM runs' training time at their budgets measured the
same way: a ratio within one run, not a wall time of `make demo` (other engineers' jobs share this machine).

    flock /tmp/slimsd-bench.lock python benchmarks/demo_decoder_cost.py --threads 1 \
        [--out benchmarks/results/demo_decoder_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/demo_decoder_cost.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from dataclasses import replace

    from slimsd.atomic import atomic_write_text
    from slimsd.devices import cpu_isa, cpu_model
    from slimsd.models.compress import compress
    from slimsd.toy.demo import DemoConfig, distill_config, lcm_config, tiny_decoder_config
    from slimsd.train.cache import write_cache
    from slimsd.train.distill import train

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    demo = DemoConfig(progress=False)
    work = Path(tempfile.mkdtemp(prefix="demo-decoder-cost-"))
    compress(demo.teacher, demo.recipe, work / "student-init")
    write_cache(demo.teacher, f"shapes:{demo.data_images}", work / "cache", resolution=64, seed=demo.seed)

    def kd(steps, out):
        return replace(
            distill_config(demo, work / "student-init", work / "cache", out, kd=True), max_steps=steps
        )

    def lcm(steps, out):  # from the compressed student: the LCM step costs the same whatever the weights
        return replace(lcm_config(demo, work / "student-init", work / "cache", out), max_steps=steps)

    def decoder(steps, out):
        return replace(tiny_decoder_config(demo, work / "cache", out), max_steps=steps)

    runs = {"kd": kd, "lcm": lcm, "tiny_decoder": decoder}
    per_step: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, make in runs.items():
            times = {}
            for steps in (1, 1 + args.steps):
                t0 = time.perf_counter()
                train(make(steps, work / f"{name}-{r}-{steps}"))
                times[steps] = time.perf_counter() - t0
            per_step[name].append((times[1 + args.steps] - times[1]) / args.steps)
    s = {
        n: {"median": statistics.median(v), "std": statistics.stdev(v), "all": v} for n, v in per_step.items()
    }
    budgets = {"kd": 2 * demo.steps, "lcm": demo.lcm_steps, "tiny_decoder": demo.decoder_steps}  # KD + twin
    training_s = {n: budgets[n] * s[n]["median"] for n in budgets}
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count(), "threads": args.threads},
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "note": "a shared machine: other engineers' jobs ran beside this one; read the ratios, not the seconds",
        "seconds_per_step": s,
        "budgets_steps": budgets,
        "estimated_training_s": training_s,
        "decoder_vs_other_training": training_s["tiny_decoder"] / (training_s["kd"] + training_s["lcm"]),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("estimated_training_s", "decoder_vs_other_training")}))
    return result


if __name__ == "__main__":
    main()

"""The demo (`slimsd demo`, default settings): every row, the int8 student against the fp32 one, the LCM
student decoding with the tiny decoder against the full VAE, and the demo's phase timings and total wall time
(is `make demo` within 10 minutes?).

  flock /tmp/slimsd-bench.lock python benchmarks/toy_demo_run.py --out benchmarks/results/toy_demo_run.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/toy-demo-run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from slimsd.devices import cpu_isa, cpu_model
    from slimsd.toy.demo import DemoConfig, run_demo

    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    summary = run_demo(DemoConfig(out=args.work, overwrite=True, log=lambda m: print(m, file=sys.stderr)))
    keys = ("label", "steps", "caption_fidelity", "caption_fidelity_held_out", "step_latency_ms", "image_ms")
    result = {
        "what": "slimsd demo at its default settings: every row, its ratios and phase timings; wall_s: the run_demo "
        "call (the command adds its imports)",
        "command": "flock /tmp/slimsd-bench.lock python " + " ".join(sys.argv),
        "machine": {"cpu": cpu_model(), "isa": cpu_isa(), "threads": summary["threads"]},
        "date": started,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "note": "the 2-core machine is shared with other jobs: timings are under their load (see loadavg)",
        "rows": {m: {k: summary[m].get(k) for k in keys} for m in summary["models"]},
        "int8_vs_lcm": summary["int8_vs_lcm"],
        "int8_image_speedup": summary["int8_image_speedup"],
        "tiny_decoder_vs_lcm": summary["tiny_decoder_vs_lcm"],
        "tiny_decoder_image_speedup": summary["tiny_decoder_image_speedup"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "timings_s": summary["timings_s"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

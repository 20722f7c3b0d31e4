"""The demo (`slimsd demo`, default settings) with its int8 row: the rows, the int8 student against the fp32 one,
and the demo's phase timings (is `make demo` still within 10 minutes with the quantisation step?).

  flock /tmp/slimsd-bench.lock python benchmarks/toy_demo_int8.py --out benchmarks/results/toy_demo_int8.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/toy-demo-int8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from slimsd.devices import cpu_isa, cpu_model
    from slimsd.toy.demo import DemoConfig, run_demo

    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    summary = run_demo(DemoConfig(out=args.work, overwrite=True, log=lambda m: print(m, file=sys.stderr)))
    keys = ("label", "steps", "caption_fidelity", "caption_fidelity_held_out", "step_latency_ms", "image_ms")
    result = {
        "what": "slimsd demo at its default settings, with the int8 (OpenVINO) LCM student row",
        "command": "flock /tmp/slimsd-bench.lock python " + " ".join(sys.argv),
        "machine": {"cpu": cpu_model(), "isa": cpu_isa(), "threads": summary["threads"]},
        "date": started,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "note": "the 2-core machine is shared with other jobs: timings are under their load (see loadavg)",
        "rows": {m: {k: summary[m].get(k) for k in keys} for m in summary["models"]},
        "int8_vs_lcm": summary["int8_vs_lcm"],
        "int8_image_speedup": summary["int8_image_speedup"],
        "timings_s": summary["timings_s"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

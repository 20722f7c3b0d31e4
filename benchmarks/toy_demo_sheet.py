"""The README's demo sheet: a finished `slimsd demo` folder's sheet.png and results.json, recorded under
benchmarks/results/ with the machine and the date (the README shows the sheet; its numbers are in the JSON).

    slimsd demo && python benchmarks/toy_demo_sheet.py demo-out

Writes benchmarks/results/toy_demo_sheet.png and toy_demo_sheet.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
from pathlib import Path

import torch

from slimsd import devices
from slimsd.atomic import atomic_write_bytes, atomic_write_text

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a finished `slimsd demo` output folder")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile, and the like")
    args = parser.parse_args(argv)
    results_file = args.folder / "results.json"
    results = json.loads(results_file.read_text(encoding="utf-8"))
    if results.get("kind") != "slimsd-demo":
        raise SystemExit(f"{results_file} is not a slimsd demo's results.json")
    sheet = (args.folder / results["sheet"]["file"]).read_bytes()
    ran = datetime.datetime.fromtimestamp(results_file.stat().st_mtime, datetime.timezone.utc)
    record = {
        "command": results["command"],
        "recorded_by": shlex.join(["python", "benchmarks/toy_demo_sheet.py", str(args.folder)])
        + (" --note NOTE (the note below)" if args.note else ""),
        "date": ran.isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": devices.cpu_model(),
            "cpu_isa": devices.cpu_isa(),
            "cpu_count": os.cpu_count(),
            "torch_threads": results["threads"],
            "torch": torch.__version__,
        },
        "load_average_when_recorded": [round(x, 2) for x in os.getloadavg()],
        "wall_time_s": results["timings_s"]["total_s"],
        "note": args.note,
        "sheet": "toy_demo_sheet.png",
        "results": results,
    }
    atomic_write_bytes(RESULTS / "toy_demo_sheet.png", sheet)
    atomic_write_text(RESULTS / "toy_demo_sheet.json", json.dumps(record, indent=1) + "\n")
    print(f"wrote {RESULTS / 'toy_demo_sheet.png'} ({len(sheet) // 1024} KiB) and toy_demo_sheet.json")


if __name__ == "__main__":
    main()

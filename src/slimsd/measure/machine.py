"""What a results file says of the run that made it: the command, the date, and the machine (CPU model and ISA
flags, cores, torch threads, software, niceness, the load average at the start and at the end). Timings mean
something only as ratios within one run on one machine (the CPU differs between sessions, and the machine may be
shared), so every benchmark script records the same fields under the same names."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime

import torch

from slimsd.devices import cpu_isa, cpu_model

NOTE = (
    "compare ratios within one run, not times across runs: the machine may be shared (see the load average)"
)


def run_record(argv: list[str] | None, threads: int, loadavg_start: tuple[float, ...]) -> dict:
    """{"command", "date", "machine"} for a results file written now by the script ``sys.argv[0]`` with ARGV
    (None: ``sys.argv[1:]``), timed with THREADS torch threads; LOADAVG_START is ``os.getloadavg()`` taken
    before the timing began."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": " ".join(["python", sys.argv[0], *args]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_isa": cpu_isa(),
            "cores": os.cpu_count(),
            "threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "niceness": os.nice(0),
            "loadavg_start": list(loadavg_start),
            "loadavg_end": list(os.getloadavg()),
            "note": NOTE,
        },
    }

"""slimsd.measure.machine: the record every benchmark's results file starts with."""

from __future__ import annotations

import os
import sys

import torch

from slimsd.measure.machine import run_record


def test_the_run_record_names_this_machine_and_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/some_bench.py", "--threads", "2"])
    with open("/proc/cpuinfo") as f:  # read here, not through slimsd
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    start = (1.5, 2.5, 3.5)
    record = run_record(None, 2, start)
    assert record["command"] == "python benchmarks/some_bench.py --threads 2"
    assert (
        run_record(["--out", "x.json"], 1, start)["command"] == "python benchmarks/some_bench.py --out x.json"
    )
    machine = record["machine"]
    assert machine["cpu_model"] == model
    assert machine["cores"] == os.cpu_count() and machine["threads"] == 2
    assert machine["torch"] == torch.__version__
    assert machine["loadavg_start"] == [1.5, 2.5, 3.5] and len(machine["loadavg_end"]) == 3
    assert record["date"].endswith("+00:00")

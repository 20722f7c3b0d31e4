#!/usr/bin/env bash
# The first lent GPU, used at once: the `gpu` tests (half-precision inference per family with the SDXL VAE
# upcast, the memory estimate against torch.cuda.max_memory_allocated, DDP/FSDP/ZeRO under NCCL = 1 process
# where there are 2+ GPUs) and the GPU benchmark (the SD class end to end, slimsd beside diffusers, fp16), in
# under 8 minutes (each part under its own time limit), then one JSON verdict.
#
#   bash benchmarks/gpu_check.sh [VERDICT]      # default benchmarks/results/gpu_check.json
#
# The benchmark's tables go to benchmarks/results/gpu_check/ (gpu_end_to_end_sd.{md,json,png}). Exit 0 when
# every part passed. On a machine without CUDA it writes a verdict saying so and exits 1 at once.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
VERDICT=${1:-benchmarks/results/gpu_check.json}
RESULTS=benchmarks/results/gpu_check
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
mkdir -p "$(dirname "$VERDICT")" "$RESULTS"

if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  "$PY" - "$VERDICT" <<'PYEOF'
import json, sys
verdict = {"ok": False, "error": "no CUDA GPU on this machine: nothing was run"}
open(sys.argv[1], "w").write(json.dumps(verdict, indent=1) + "\n")
print(json.dumps(verdict))
PYEOF
  exit 1
fi

# 1. the gpu tests: at most 270 s
timeout 270 "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml="$WORK/tests.xml" \
  tests/run/test_half_precision.py tests/train/test_gpu_training.py >"$WORK/tests.log" 2>&1
TESTS_RC=$?
# 2. the GPU benchmark, short (1 warm-up + 3 timed runs, batch 1): at most 150 s
timeout 150 "$PY" benchmarks/gpu_end_to_end.py --classes sd --repeats 3 --warmup 1 --batch-sizes 1 \
  --out "$RESULTS" >"$WORK/bench.log" 2>&1
BENCH_RC=$?

"$PY" - "$VERDICT" "$WORK" "$TESTS_RC" "$BENCH_RC" "$START" "$RESULTS" <<'PYEOF'
import datetime, json, sys, time
from pathlib import Path
from xml.etree import ElementTree

import torch

verdict_path, work, tests_rc, bench_rc, start, results = sys.argv[1:]
work, tests_rc, bench_rc = Path(work), int(tests_rc), int(bench_rc)


def tail(name: str) -> list[str]:
    path = work / name
    return path.read_text(errors="replace").splitlines()[-15:] if path.exists() else []


tests = {"passed": [], "failed": [], "skipped": []}
if (work / "tests.xml").exists():
    for case in ElementTree.parse(work / "tests.xml").iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        key = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        tests[key].append(name)
tests["exit_code"] = tests_rc  # 124: the part ran past its time limit
if tests_rc != 0:
    tests["log_tail"] = tail("tests.log")
bench = {"exit_code": bench_rc, "files": sorted(str(p) for p in Path(results).glob("gpu_end_to_end_sd.*"))}
rows = Path(results) / "gpu_end_to_end_sd.json"
if bench_rc == 0 and rows.exists():
    bench["rows"] = [
        {k: r.get(k) for k in ("model", "variant", "dtype", "step_latency_ms", "e2e_s", "peak_memory_bytes")}
        for r in json.loads(rows.read_text())
    ]
else:
    bench["log_tail"] = tail("bench.log")
verdict = {
    "ok": tests_rc == 0 and not tests["failed"] and bool(tests["passed"]) and bench_rc == 0,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
    "torch": torch.__version__,
    "seconds": round(time.time() - float(start)),
    "tests": tests,
    "benchmark": bench,
}
Path(verdict_path).write_text(json.dumps(verdict, indent=1) + "\n")
print(json.dumps({k: verdict[k] for k in ("ok", "device", "seconds")}))
sys.exit(0 if verdict["ok"] else 1)
PYEOF

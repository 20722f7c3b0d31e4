"""On a machine with 2+ CUDA GPUs: for each multi-process engine (DDP, FSDP2 FULL_SHARD and SHARD_GRAD_OP,
DeepSpeed ZeRO-2 and ZeRO-3; NCCL), train micro-sd 2 steps, stop, resume to step 3, and compare with an
uninterrupted 1-GPU run of the same global batch. Prints one JSON verdict. Run by the gpu test
tests/train/test_gpu_training.py (benchmarks/gpu_check.sh); the same checks run on CPUs (gloo) in
tests/train/test_sharded.py.

    python benchmarks/gpu_sharded_check.py            # needs CUDA, accelerate, deepspeed
    python benchmarks/gpu_sharded_check.py --dry-run  # prints the commands it would run, runs nothing
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["ddp.yaml", "fsdp.yaml", "fsdp-shard-grad-op.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"]
RUN = {
    "teacher": "micro-sd",
    "student": "bk-small",
    "data": "shapes:8",
    "resolution": 64,
    "max_steps": 3,
    "checkpoint_every": 1,
    "keep_last": 3,
    "adam_epsilon": 1e-3,
    "learning_rate": 1e-3,
    "ema": True,
    "ema_decay": 0.9,
    "progress": False,
    "tensorboard": False,
}
TOLERANCE = 1e-4  # GPU kernels of 1 and 2 processes differ more than CPU ones (tests use 1e-5)


def distill(out: Path, processes: int, config: str | None, **kw) -> list[str]:
    keys = {**RUN, **kw, "batch_size": 4 // processes, "output_dir": out}
    args = ["-m", "slimsd.cli", "distill", *[f"{k}={v}" for k, v in keys.items()], "--json"]
    if config is None:
        return [sys.executable, *args]
    launch = ["launch", "--config_file", str(ROOT / "configs" / "accelerate" / config)]
    launch += ["--num_processes", str(processes), "--mixed_precision", "no"]
    return [shutil.which("accelerate") or "accelerate", *launch, *args]


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slimsd-sharded-"))
    plan = {"one": distill(work / "one", 1, None)}
    for config in CONFIGS:
        out = work / config.removesuffix(".yaml")
        plan[config] = [distill(out, 2, config, stop_at_step=2), distill(out, 2, config, resume="latest")]
    if args.dry_run:
        print(json.dumps(plan, indent=1, default=str))
        return
    import torch

    if torch.cuda.device_count() < 2:
        print(json.dumps({"ok": False, "error": "needs 2 CUDA GPUs"}))
        sys.exit(1)
    verdict = {"one": run(plan["one"])}
    for config in CONFIGS:
        first, resumed = run(plan[config][0]), run(plan[config][1])
        out = work / config.removesuffix(".yaml")
        check = {"stopped": first, "resumed": resumed}
        if "error" not in first and "error" not in resumed:
            step3 = "checkpoints/step-00000003/student.safetensors"
            check["max_diff_step3"] = max_diff(work / "one" / step3, out / step3)
            check["ok"] = check["max_diff_step3"] <= TOLERANCE and resumed.get("resumed_from", "").endswith(
                "2"
            )
        else:
            check["ok"] = False
        verdict[config] = check
    verdict["ok"] = all(verdict[c]["ok"] for c in CONFIGS)
    print(json.dumps(verdict, indent=1))
    sys.exit(0 if verdict["ok"] else 1)


if __name__ == "__main__":
    main()

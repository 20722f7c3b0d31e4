"""Per image, one model, every runtime a CPU user could pick, in one table (issue: quantise and deploy).

Rows, each at the model's own steps, guidance and scheduler, one image per call, same prompt and seeds:
  diffusers eager fp32 (plain DiffusionPipeline, no slimsd) | slimsd torch fp32 | slimsd torch bf16 (when the
  CPU has native bf16) | slimsd ONNX Runtime fp32 static | slimsd OpenVINO fp32 static | slimsd OpenVINO int8 |
  slimsd ONNX Runtime int8 | peer: optimum-intel's OV pipeline on the same OpenVINO fp32 folder, run from its
  own virtualenv (benchmarks/make_peer_env.sh) in a subprocess.
The rows are timed round-robin (one image of each row, then the next round), so that a load change on a shared
machine hits every row alike; the figure is the median per image with the sample std. Every row's image is
compared with slimsd torch fp32's on the same seed (PSNR, dB).

  python benchmarks/deploy_runtimes.py --model DIR_OR_NAME --resolution 64 --threads 2 --repeats 5 \
      --prompts FILE --out benchmarks/results/deploy_toy.json [--peer-python benchmarks/.peer-venv/bin/python]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PEER_SCRIPT = Path(__file__).with_name("peer_optimum.py")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def prepare(model: str, work: Path, size: str, prompts: str | None, calib: int, log) -> dict[str, Path]:
    """The exported folders (static shapes, batch 1), made once per work folder."""
    from slimsd.models.exporting import export_runtime
    from slimsd.run.quantize import quantize

    folders = {}
    for name, to in (("onnx-fp32", "onnx"), ("openvino-fp32", "openvino")):
        folders[name] = work / name
        if not (work / name / "slimsd.json").is_file():
            t = time.perf_counter()
            export_runtime(model, work / name, to, resolution=size, batch=1, overwrite=True)
            log(f"exported {name} in {time.perf_counter() - t:.0f} s")
    for name, to in (("openvino-int8", "openvino"), ("onnx-int8", "onnx")):
        folders[name] = work / name
        if not (work / name / "slimsd.json").is_file():
            t = time.perf_counter()
            quantize(
                model,
                work / name,
                to=to,
                prompts_file=prompts,
                calibration_prompts=calib,
                resolution=size,
                batch=1,
                sensitivity_layers=16,
                overwrite=True,
            )
            log(f"quantised {name} in {time.perf_counter() - t:.0f} s")
    return folders


def diffusers_eager(model: str):
    """What a user gets from diffusers alone: the model's own folder, fp32, eager, its own scheduler."""
    from diffusers import DiffusionPipeline

    from slimsd.models.loading import describe_model, load

    if describe_model(model) == "local":
        pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None)
    else:  # a name only slimsd resolves (micro, toy, preset with random weights): its plain modules
        pipe = load(model, dtype="fp32", optimize=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", default=None, help="calibration prompts (one per line)")
    ap.add_argument("--calibration-prompts", type=int, default=16)
    ap.add_argument("--prompt", default="a red circle")
    ap.add_argument("--work", default=None, help="where the exported folders go (reused)")
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slimsd.devices import cpu_isa, cpu_model, cpu_supports_bf16
    from slimsd.models.loading import load, model_info
    from slimsd.run.generate import generate, sampling_defaults

    def log(m):
        print(m, file=sys.stderr, flush=True)

    size = f"{args.resolution}x{args.resolution}"
    work = Path(args.work or f"/tmp/deploy-bench-{Path(args.model).name}-{args.resolution}")
    work.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.model, work, size, args.prompts, args.calibration_prompts, log)
    own = sampling_defaults(model_info(load(args.model, dtype="fp32", optimize=False)).get("sampling"))
    rows = {"diffusers eager fp32": ("diffusers", diffusers_eager(args.model))}
    rows["slimsd torch fp32"] = ("slimsd", load(args.model, dtype="fp32"))
    if cpu_supports_bf16():
        rows["slimsd torch bf16"] = ("slimsd", load(args.model, dtype="bf16"))
    labels = {
        "onnx-fp32": "slimsd ONNX Runtime fp32 static",
        "openvino-fp32": "slimsd OpenVINO fp32 static",
        "openvino-int8": "slimsd OpenVINO int8 static",
        "onnx-int8": "slimsd ONNX Runtime int8 static",
    }
    for key, label in labels.items():
        rows[label] = ("slimsd", load(str(folders[key])))
    times = {k: [] for k in rows}
    images = {}
    w = h = args.resolution
    for r in range(args.repeats + 1):  # round 0: warm-up (compilation, first-call allocation), not counted
        for label, (kind, pipe) in rows.items():
            seed = 100 + r
            if kind == "diffusers":
                t = time.perf_counter()
                img = pipe(
                    args.prompt,
                    num_inference_steps=own["steps"],
                    guidance_scale=own["guidance"],
                    width=w,
                    height=h,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]
                elapsed = time.perf_counter() - t
            else:
                t = time.perf_counter()
                img = generate(pipe, args.prompt, seed=seed, width=w, height=h)[0].image
                elapsed = time.perf_counter() - t
            if r > 0:
                times[label].append(elapsed * 1000)
            if r == 1:
                images[label] = np.asarray(img)
        log(f"round {r} done")
    reference = images["slimsd torch fp32"]
    table = []
    for label in rows:
        ms = times[label]
        table.append(
            {
                "row": label,
                "image_ms_median": round(statistics.median(ms), 2),
                "image_ms_std": round(statistics.stdev(ms), 2) if len(ms) > 1 else None,
                "n": len(ms),
                "psnr_vs_slimsd_torch_fp32_db": round(psnr(images[label], reference), 2),
            }
        )
    base = table[0]["image_ms_median"]
    for row in table:
        row["speedup_vs_diffusers_eager_fp32"] = round(base / row["image_ms_median"], 3)
    peer = None
    if args.peer_python:
        cmd = [
            args.peer_python,
            str(PEER_SCRIPT),
            str(folders["openvino-fp32"]),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--prompt",
            args.prompt,
            "--steps",
            str(own["steps"]),
            "--guidance",
            str(own["guidance"]),
            "--size",
            str(args.resolution),
        ]
        log("peer: " + " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode == 0:
            peer = json.loads(done.stdout.strip().splitlines()[-1])
            peer["row"] = "peer: optimum-intel OV pipeline, same OpenVINO fp32 folder"
            peer["speedup_vs_diffusers_eager_fp32"] = round(base / peer["image_ms_median"], 3)
            table.append(peer)
        else:
            peer = {"row": "peer: optimum-intel", "error": done.stderr.strip().splitlines()[-1:]}
            log(f"peer failed: {done.stderr[-2000:]}")
    q = json.loads((folders["openvino-int8"] / "slimsd.json").read_text())["export"]["quantization"]
    qo = json.loads((folders["onnx-int8"] / "slimsd.json").read_text())["export"]["quantization"]
    result = {
        "what": "one image per call at the model's own steps and guidance, per-image wall time (median, sample std)"
        ", rows timed round-robin after one warm-up round",
        "model": args.model,
        "steps": own["steps"],
        "guidance": own["guidance"],
        "resolution": args.resolution,
        "threads": args.threads,
        "machine": {
            "cpu": cpu_model(),
            "isa": cpu_isa(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cores_visible": os.cpu_count(),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "rows": table,
        "peer_error": None if peer is None or "error" not in peer else peer["error"],
        "unet_disk_bytes": {
            "openvino_fp32": q["unet_bytes_fp32"],
            "openvino_int8": q["unet_bytes"],
            "onnx_fp32": qo["unet_bytes_fp32"],
            "onnx_int8": qo["unet_bytes"],
        },
        "calibration": {
            k: q["calibration"][k] for k in ("count", "steps", "guidance", "unet_inputs", "timesteps")
        },
        "kept_layers": len(q["kept_layers"]),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for row in table:
        log(
            f"{row['row']:<55} {row['image_ms_median']:>10.1f} ms  ±{row.get('image_ms_std') or 0:.1f}  "
            f"x{row['speedup_vs_diffusers_eager_fp32']:.2f}  PSNR {row.get('psnr_vs_slimsd_torch_fp32_db')}"
        )


if __name__ == "__main__":
    main()

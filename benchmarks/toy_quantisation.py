"""Naive PTQ against trajectory calibration with kept layers, on the toy LCM student (issue: quantise and deploy).

Arms (OpenVINO, NNCF int8 weights and activations, the same calibration prompts and seeds):
  naive       min-max activation ranges, the first timestep of each calibration image only, nothing kept
  trajectory  NNCF's default ranges over every U-Net call of the student's own 4-step sampling, the sensitive
              layers kept (slimsd quantize's defaults)
Scored like the demo: caption fidelity (3 seeds x 24 fresh captions of seen combinations, and held-out ones) at
the student's own steps and guidance; and per-image PSNR of each arm against the fp32 student (torch) on the same
seeds. Also the fp32 export (OpenVINO) as a control.

  python benchmarks/toy_quantisation.py --model DEMO_OUT/lcm_student/final --threads 2 \
      --out benchmarks/results/toy_quantisation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration-prompts", type=int, default=16)
    ap.add_argument("--work", default="/tmp/toy-quantisation")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slimsd.atomic import atomic_write_text
    from slimsd.devices import cpu_isa, cpu_model
    from slimsd.models.exporting import export_runtime
    from slimsd.models.loading import load
    from slimsd.run.quantize import quantize
    from slimsd.toy.demo import DemoConfig, eval_captions, fidelity, sample
    from slimsd.toy.shapes import make_captions

    def log(m):
        print(m, file=sys.stderr, flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # calibration captions: the tuning stream's neighbour, apart from every evaluation caption
    prompts = work / "calibration.txt"
    prompts.write_text("\n".join(make_captions(args.calibration_prompts, seed=5_000_003)) + "\n")
    own = load(args.model, dtype="fp32", optimize=False)._slimsd["sampling"]
    cfg = DemoConfig(guidance_scale=float(own["guidance"]), lcm_inference_steps=int(own["steps"]))
    arms = {}
    t = time.perf_counter()
    if not (work / "fp32" / "slimsd.json").is_file():
        export_runtime(args.model, work / "fp32", "openvino", overwrite=True)
    arms["openvino fp32 (control)"] = (work / "fp32", None)
    for name, naive, keep in (("naive", True, ()), ("trajectory", False, None)):
        if not (work / name / "slimsd.json").is_file():
            quantize(
                args.model,
                work / name,
                to="openvino",
                prompts_file=str(prompts),
                keep=keep,
                naive=naive,
                sensitivity_layers=16,
                overwrite=True,
            )
        arms[f"int8 {name}"] = (work / name, None)  # as slimsd loads it: float parts in the CPU's auto dtype
    arms["int8 trajectory, --dtype fp32"] = (work / "trajectory", "fp32")  # the int8 error alone
    log(f"prepared in {time.perf_counter() - t:.0f} s")
    torch_pipe = load(args.model, dtype="fp32")
    rows = {"torch fp32": {**fidelity(torch_pipe, cfg, steps=cfg.lcm_inference_steps)}}
    refs = {}
    for s in cfg.eval_seeds:
        caps = eval_captions(cfg, s, "seen")
        refs[s] = (caps, sample(torch_pipe, caps, 10_000 * (s + 1), cfg, cfg.lcm_inference_steps))
    for label, (folder, dtype) in arms.items():
        pipe = load(str(folder), dtype=dtype)
        row = {"kernels": pipe._slimsd["runtime"]["dtype"]}
        row |= fidelity(pipe, cfg, steps=cfg.lcm_inference_steps)
        psnrs = []
        for s, (caps, ref) in refs.items():
            imgs = sample(pipe, caps, 10_000 * (s + 1), cfg, cfg.lcm_inference_steps)
            psnrs += [psnr(a, b) for a, b in zip(imgs, ref, strict=True)]
        finite = [p for p in psnrs if np.isfinite(p)]  # an image identical to fp32's has no finite PSNR
        row["images_identical_to_torch_fp32"] = len(psnrs) - len(finite)
        row["psnr_vs_torch_fp32_db_mean"] = statistics.fmean(finite) if finite else None
        row["psnr_vs_torch_fp32_db_std"] = statistics.stdev(finite) if len(finite) > 1 else None
        info = json.loads((folder / "slimsd.json").read_text())["export"]
        if "quantization" in info:
            q = info["quantization"]
            row["calibration"] = {
                k: q["calibration"][k] for k in ("kind", "count", "unet_inputs", "timesteps")
            }
            row["kept_layers"] = len(q["kept_layers"])
        rows[label] = row
        log(f"{label}: fidelity {row['caption_fidelity']:.3f} PSNR {row['psnr_vs_torch_fp32_db_mean']}")
    base = rows["torch fp32"]["caption_fidelity"]
    for row in rows.values():
        row["fidelity_vs_fp32"] = row["caption_fidelity"] / base if base else None
    result = {
        "what": "toy LCM student: naive PTQ vs trajectory calibration with kept layers (OpenVINO / NNCF int8)",
        "model": args.model,
        "steps": cfg.lcm_inference_steps,
        "guidance": cfg.guidance_scale,
        "eval": {"seeds": list(cfg.eval_seeds), "captions_per_seed": cfg.eval_prompts},
        "machine": {"cpu": cpu_model(), "isa": cpu_isa()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
        "targets": {
            "int8_keeps_97pct_of_fp32_fidelity": {
                k: {"ratio": rows[k]["fidelity_vs_fp32"], "met": rows[k]["fidelity_vs_fp32"] >= 0.97}
                for k in rows
                if k.startswith("int8 trajectory")
            },
            "trajectory_beats_naive": {
                "trajectory": rows["int8 trajectory"]["caption_fidelity"],
                "naive": rows["int8 naive"]["caption_fidelity"],
                "met": rows["int8 trajectory"]["caption_fidelity"] > rows["int8 naive"]["caption_fidelity"],
            },
        },
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""U-Net weights on disk, fp32 against int8, for a full-size bk-sdm-tiny-shaped student with RANDOM weights
(issue target: >= 3.5x smaller). Bytes only: random weights say nothing about image quality, and the calibration
runs at 64 px with one prompt and 2 steps to keep the run short (the weight bytes do not depend on either).

  python benchmarks/fullsize_int8_disk.py --out benchmarks/results/fullsize_int8_disk.json [--to openvino]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bk-sdm-tiny")
    ap.add_argument("--to", default="openvino")
    ap.add_argument("--work", default="/tmp/fullsize-int8")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--resave",
        action="store_true",
        help="reuse WORK/int8-TO (an earlier run's NNCF output, kept layers stored fp32) and save its U-Net as "
        "slimsd quantize now does (float weights fp16): the same quantised graph, bytes only",
    )
    args = ap.parse_args()
    from slimsd.devices import cpu_isa, cpu_model
    from slimsd.models.loading import build_random_pipeline
    from slimsd.models.presets import get_preset
    from slimsd.run.quantize import quantize

    work = Path(args.work)
    model = work / args.preset
    if not (model / "model_index.json").is_file():
        pipe = build_random_pipeline(get_preset(args.preset), seed=0)
        pipe.save_pretrained(model)
        # sample in 2 steps without guidance: calibration cost only, the bytes do not depend on it
        (model / "slimsd.json").write_text(json.dumps({"sampling": {"steps": 2, "guidance": 1.0}}))
    if args.resave:
        resave(work, args)
        return
    t = time.perf_counter()
    record = quantize(
        str(model),
        work / f"int8-{args.to}",
        to=args.to,
        calibration_prompts=1,
        resolution="64x64",
        sensitivity_layers=4,
        overwrite=True,
        on_phase=lambda m: print(m, file=sys.stderr, flush=True),
    )
    q = record["quantization"]
    result = {
        "what": f"{args.preset}-shaped U-Net, random weights: weight bytes on disk, fp32 export vs slimsd quantize "
        "int8 (default kept layers in fp32)",
        "backend": args.to,
        "unet_bytes_fp32": q["unet_bytes_fp32"],
        "unet_bytes_int8": q["unet_bytes"],
        "ratio": round(q["unet_bytes_fp32"] / q["unet_bytes"], 3),
        "kept_layers": len(q["kept_layers"]),
        "quantize_s": round(time.perf_counter() - t, 1),
        "machine": {"cpu": cpu_model(), "isa": cpu_isa()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def resave(work: Path, args) -> None:
    import openvino as ov

    from slimsd.devices import cpu_isa, cpu_model

    folder = work / f"int8-{args.to}"
    info = json.loads((folder / "slimsd.json").read_text())["export"]["quantization"]
    before = (folder / "unet" / "openvino_model.bin").stat().st_size
    scratch = work / "resaved" / "openvino_model.xml"
    scratch.parent.mkdir(exist_ok=True)
    from slimsd.run.quantize import kept_weights_fp16

    model = ov.Core().read_model(str(folder / "unet" / "openvino_model.xml"))
    kept_weights_fp16(model)  # what slimsd quantize now does before it saves
    ov.save_model(model, str(scratch), compress_to_fp16=False)
    after = scratch.with_suffix(".bin").stat().st_size
    result = {
        "what": f"{args.preset}-shaped U-Net, random weights: weight bytes on disk, fp32 export vs slimsd quantize "
        "int8 (NNCF, default kept layers), kept layers' weights stored fp32 and fp16",
        "backend": args.to,
        "unet_bytes_fp32": info["unet_bytes_fp32"],
        "unet_bytes_int8_kept_fp32": before,
        "unet_bytes_int8_kept_fp16": after,
        "ratio_kept_fp32": round(info["unet_bytes_fp32"] / before, 3),
        "ratio_kept_fp16": round(info["unet_bytes_fp32"] / after, 3),
        "kept_layers": len(info["kept_layers"]),
        "calibration": {k: info["calibration"][k] for k in ("count", "steps", "unet_inputs", "resolution")},
        "machine": {"cpu": cpu_model(), "isa": cpu_isa()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python "
        + " ".join(sys.argv)
        + "  (after a first run without --resave made WORK/int8-TO)",
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

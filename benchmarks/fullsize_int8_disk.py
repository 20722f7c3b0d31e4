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


if __name__ == "__main__":
    main()

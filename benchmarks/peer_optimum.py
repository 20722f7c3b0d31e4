"""The peer row of deploy_runtimes.py: the same OpenVINO folder run by optimum-intel's own pipeline (what a CPU
user of OpenVINO picks), in optimum-intel's own virtualenv (benchmarks/make_peer_env.sh). Prints one JSON line.

  benchmarks/.peer-venv/bin/python benchmarks/peer_optimum.py FOLDER --threads 2 --repeats 5 --steps 4 \
      --guidance 2 --size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--guidance", type=float, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--prompt", default="a red circle")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    import optimum.intel as oi
    import transformers

    with open(f"{args.folder}/unet/config.json") as f:
        lcm = json.load(f).get("time_cond_proj_dim") is not None
    cls = oi.OVLatentConsistencyModelPipeline if lcm else oi.OVStableDiffusionPipeline
    # f32 as the slimsd fp32 rows run (OpenVINO's CPU default on bf16 hardware is bf16); static shapes as exported
    ov_config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(args.threads)}
    pipe = cls.from_pretrained(args.folder, ov_config=ov_config, compile=True)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for r in range(args.repeats + 1):
        generator = torch.Generator().manual_seed(100 + r)
        t = time.perf_counter()
        pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            width=args.size,
            height=args.size,
            generator=generator,
        )
        if r > 0:
            times.append((time.perf_counter() - t) * 1000)
    print(
        json.dumps(
            {
                "image_ms_median": round(statistics.median(times), 2),
                "image_ms_std": round(statistics.stdev(times), 2) if len(times) > 1 else None,
                "n": len(times),
                "pipeline": cls.__name__,
                "versions": {
                    "optimum-intel": getattr(oi, "__version__", "2.2.0"),
                    "transformers": transformers.__version__,
                },
                "note": "timed in its own process, after slimsd's rows (not round-robin with them)",
            }
        )
    )


if __name__ == "__main__":
    main()

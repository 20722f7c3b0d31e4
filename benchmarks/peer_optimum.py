"""The peer rows of deploy_runtimes.py: the same OpenVINO folder run by optimum-intel's own pipeline (what a CPU
user of OpenVINO picks), in optimum-intel's own virtualenv (benchmarks/make_peer_env.sh).

It serves one image per request, so that deploy_runtimes.py times it round-robin with its own rows: it prints one
JSON line once loaded (``ready``: the pipeline class, versions, and the precision each network's compiled model
really runs, ``INFERENCE_PRECISION_HINT``), then reads a seed per line on stdin and answers each with one JSON
line ``{"ms": ...}`` (the pipeline call's wall time, timed in this process as slimsd's rows are in theirs).

``--precision default`` leaves OpenVINO's CPU plugin its own choice (bf16 on hardware with native bf16, f32 on
other CPUs): what a user of optimum-intel gets. ``--precision f32`` forces f32 kernels.

  benchmarks/.peer-venv/bin/python benchmarks/peer_optimum.py FOLDER --threads 2 --steps 4 --guidance 6 \
      --size 512 [--precision default|f32|bf16]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings


def compiled_precision(part) -> str | None:
    """The inference precision the part's compiled model runs (optimum keeps it in ``request``)."""
    if getattr(part, "request", None) is None and hasattr(part, "compile"):
        part.compile()
    compiled = getattr(part, "request", None)
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except (AttributeError, RuntimeError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--guidance", type=float, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--prompt", default="a red circle")
    ap.add_argument("--precision", choices=("default", "f32", "bf16"), default="default")
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
    ov_config = {"INFERENCE_NUM_THREADS": str(args.threads)}
    if args.precision != "default":
        ov_config["INFERENCE_PRECISION_HINT"] = args.precision
    pipe = cls.from_pretrained(args.folder, ov_config=ov_config, compile=True)
    pipe.set_progress_bar_config(disable=True)
    parts = {"unet": pipe.unet, "vae_decoder": pipe.vae_decoder, "text_encoder": pipe.text_encoder}
    ready = {
        "ready": True,
        "pipeline": cls.__name__,
        "ov_config": ov_config,
        "precision": {name: compiled_precision(part) for name, part in parts.items()},
        "versions": {
            "optimum-intel": getattr(oi, "__version__", "2.2.0"),
            "transformers": transformers.__version__,
        },
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        generator = torch.Generator().manual_seed(int(line))
        t = time.perf_counter()
        pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            width=args.size,
            height=args.size,
            generator=generator,
        )
        print(json.dumps({"ms": (time.perf_counter() - t) * 1000}), flush=True)


if __name__ == "__main__":
    main()

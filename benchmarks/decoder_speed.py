"""Full-size decoders with random weights (issue 24): the SD VAE decoder against tiny decoders (diffusers'
AutoencoderTiny; --decoders: the `tiny-decoder` preset, TAESD's size, and `lite-decoder`, TAESD's without its
full-resolution block) at 512 px (SD 1.x: 64x64 latents) and the SDXL VAE decoder against the same tiny decoders
at 1024 px (128x128 latents), in one run.

Per (resolution, dtype): one decode of batch 1 under torch.inference_mode(), in channels_last as slimsd's runtime
runs a pipeline's VAE (--no-channels-last: not), full and tiny interleaved round by round after --warmup rounds,
median and sample std over --repeats (each tiny decoder's speedup: the full decoder's median over its own);
peak tensor memory of one decode (the live bytes of the tensors its
operators create, slimsd.train.estimate.LiveBytes: activations, not the weights) and the weights' bytes; parameters and MACs (convolutions and linear layers, slimsd.models.counting) of each decoder.
Random weights: speed and memory only (no quality: no real weights offline).

    python benchmarks/decoder_speed.py --threads 2 [--cases 512:bf16 512:fp32 1024:bf16 1024:fp32] [--repeats 3]
        [--decoders tiny-decoder lite-decoder]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from slimsd.models.decoders import TINY_DECODERS

CASES = {512: "SD_VAE", 1024: "SDXL_VAE"}  # resolution -> the presets' VAE config it is decoded with


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--cases",
        nargs="+",
        default=["512:bf16", "512:fp32", "1024:bf16", "1024:fp32"],
        help="RESOLUTION:DTYPE pairs (512 or 1024; fp32 or bf16)",
    )
    p.add_argument(
        "--decoders",
        nargs="+",
        default=["tiny-decoder", "lite-decoder"],
        help="tiny decoder presets (slimsd.models.decoders.TINY_DECODERS) measured against the full decoder",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep the default memory format (slimsd.load's runtime puts the VAE in channels_last, as here)",
    )
    p.add_argument("--out", default="benchmarks/results/decoder_speed.json")
    return p.parse_args(argv)


def decoders(vae_config: dict, dtype: torch.dtype, channels_last: bool, tiny: list[str]) -> dict:
    from diffusers import AutoencoderKL

    from slimsd.models.decoders import build_tiny_decoder

    torch.manual_seed(0)
    full = AutoencoderKL.from_config(vae_config).eval()
    models = {"full": full.to(dtype)}
    for name in tiny:
        models[name] = build_tiny_decoder(name, vae_config, seed=0).eval().to(dtype)
    if channels_last:  # what slimsd's runtime does to a pipeline's VAE (models/runtime.optimize_pipeline)
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    return models


def peak_bytes(vae, z) -> int:
    from slimsd.train.estimate import LiveBytes

    with torch.inference_mode(), LiveBytes() as meter:
        vae.decode(z)
    return meter.peak


def measure(resolution: int, dtype_name: str, args) -> dict:
    from slimsd.devices import DTYPES
    from slimsd.models import presets
    from slimsd.models.counting import decoder_counts

    dtype = DTYPES[dtype_name]
    vae_config = getattr(presets, CASES[resolution])
    models = decoders(vae_config, dtype, args.channels_last, args.decoders)
    side = resolution // 8
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(dtype)
    if args.channels_last:
        z = z.to(memory_format=torch.channels_last)
    # each as its pipeline hands it over: the full VAE's scaling factor, a tiny decoder's 1.0
    inputs = {name: z / vae_config["scaling_factor"] if name == "full" else z for name in models}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for r in range(args.warmup + args.repeats):
            for name, vae in models.items():
                t0 = time.perf_counter()
                vae.decode(inputs[name])
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    row = {"resolution": resolution, "dtype": dtype_name, "vae_config": CASES[resolution]}
    for name, vae in models.items():
        params, macs = decoder_counts(vae, resolution)
        weights = sum(p.numel() * p.element_size() for m in decoder_parts(vae) for p in m.parameters())
        row[name] = {
            "decode_s": statistics.median(times[name]),
            "decode_s_std": statistics.stdev(times[name]) if len(times[name]) > 1 else 0.0,
            "decode_s_all": times[name],
            "peak_activation_bytes": peak_bytes(vae, inputs[name]),
            "weight_bytes": weights,
            "params": params,
            "macs": macs,
        }
    full = row["full"]
    for name in args.decoders:
        tiny = row[name]
        row[f"{name}_vs_full"] = {
            "speedup": full["decode_s"] / tiny["decode_s"],
            "macs_ratio": full["macs"] / tiny["macs"],
            "activation_ratio": full["peak_activation_bytes"] / tiny["peak_activation_bytes"],
        }
        r = row[f"{name}_vs_full"]
        print(
            f"{resolution} px {dtype_name}: full {full['decode_s']:.2f} s, {name} {tiny['decode_s']:.3f} s "
            f"({r['speedup']:.1f}x faster, {r['macs_ratio']:.1f}x fewer MACs)",
            flush=True,
        )
    return row


def decoder_parts(vae) -> list:
    return [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None]


def main(argv=None) -> dict:
    from slimsd.atomic import atomic_write_text
    from slimsd.measure.machine import run_record

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.cases]
    bad = [
        c
        for c, (res, dtype) in zip(args.cases, cases, strict=True)
        if res not in CASES or dtype not in ("fp32", "bf16")
    ]
    if bad:
        raise SystemExit(f"--cases {bad[0]!r}: expected 512 or 1024, a colon, fp32 or bf16")
    unknown = [d for d in args.decoders if d not in TINY_DECODERS]
    if unknown:
        raise SystemExit(f"--decoders {unknown[0]!r}: expected one of {', '.join(TINY_DECODERS)}")
    load_start = os.getloadavg()
    rows = [measure(res, dtype, args) for res, dtype in cases]
    result = run_record(argv, args.threads, load_start) | {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

"""U-Net parameters and MACs of every preset, counted on the meta device (no download, no weights).

Run: .venv/bin/python benchmarks/model_sizes.py > benchmarks/model_sizes.md
MACs: convolutions and linear layers of one U-Net forward at batch 1 (BK-SDM's convention), at 512 px for
SD-class models and 1024 px for SDXL-class models.
"""

from __future__ import annotations

import datetime
import platform

import diffusers
import torch

from slimsd.models.counting import summarize
from slimsd.models.presets import PRESETS


def main() -> None:
    print("# U-Net size of every preset\n")
    print(
        f"Measured {datetime.date.today()} with `python benchmarks/model_sizes.py` "
        f"(torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.machine()}).\n"
    )
    print(
        "| model | kind | px | U-Net params | vs teacher | U-Net MACs | vs teacher | published params | published MACs |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, p in PRESETS.items():
        if p.kind == "micro":
            continue
        s = summarize(name)
        teacher = summarize(p.teacher, s["resolution"]) if p.kind == "student" else s
        pub = p.published
        pub_params = (
            f"{pub['unet_params']:,}"
            if "unet_params" in pub
            else (f"~{pub['unet_params_approx'] / 1e9:.2f}B" if "unet_params_approx" in pub else "")
        )
        pub_macs = f"{pub['unet_macs_512'] / 1e9:.1f}G" if "unet_macs_512" in pub else ""
        print(
            f"| {name} | {p.kind} | {s['resolution']} | {s['unet_params']:,} | "
            f"{s['unet_params'] / teacher['unet_params']:.1%} | {s['unet_macs'] / 1e9:.1f}G | "
            f"{s['unet_macs'] / teacher['unet_macs']:.1%} | {pub_params} | {pub_macs} |"
        )


if __name__ == "__main__":
    main()

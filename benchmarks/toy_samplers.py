"""Which sampler and guidance should the toy world sample with? Models x (scheduler, guidance), scored as the demo
scores (caption fidelity of fresh captions of seen and of held-out colour x shape combinations, 25 steps), on
the tuning captions (slimsd.toy.demo.tuning_captions: seen combinations, no caption text and no held-out
combination that an evaluation uses, hence no held-out score) unless ``--captions eval``.

The toy teacher's own scheduler is PLMS (diffusers' PNDMScheduler, 4th-order linear multistep); high-order
multistep solvers are unstable at large guidance scales (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"), which is what the teacher's failure at guidance 5 was.

Run:  slimsd demo --seed 0 --out demo-seed0   (its KD and task-only students)
      .venv/bin/python benchmarks/toy_samplers.py --models teacher=toy-sd \\
          kd=demo-seed0/kd_student/final task-only=demo-seed0/task_only_student/final
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["pndm:2", "euler:2", "dpm++2m:2", "pndm:5", "euler:5", "dpm++2m:5"]


def cell(row: dict) -> str:
    held_out = row["caption_fidelity_held_out"]
    return f"{row['caption_fidelity']:.3f}" + ("" if held_out is None else f" ({held_out:.3f})")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_config(text: str) -> tuple[str, float]:
    from slimsd.models.schedulers import SCHEDULERS

    name, _, guidance = text.partition(":")
    try:
        scale = float(guidance)
    except ValueError:
        scale = None
    if name not in SCHEDULERS or scale is None:
        raise SystemExit(
            f"toy_samplers: config {text!r}: expected SCHEDULER:GUIDANCE, SCHEDULER one of {list(SCHEDULERS)}"
        )
    return name, scale


def parse_model(text: str) -> tuple[str, str]:
    """LABEL=MODEL, or MODEL labelled by itself."""
    label, _, model = text.partition("=")
    return (label, model) if model else (text, text)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", required=True, help="[LABEL=]MODEL (a name such as toy-sd, or a folder)"
    )
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="SCHEDULER:GUIDANCE")
    ap.add_argument("--captions", choices=("tuning", "eval"), default="tuning")
    ap.add_argument("--eval-seeds", type=int, default=2)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--name", default="toy_samplers")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    configs = [parse_config(c) for c in args.configs]
    models = [parse_model(m) for m in args.models]

    import torch

    from slimsd.atomic import atomic_write_text
    from slimsd.devices import cpu_model
    from slimsd.models.loading import load
    from slimsd.toy.demo import DemoConfig, eval_captions, fidelity, tuning_captions

    torch.set_num_threads(1)
    source = tuning_captions if args.captions == "tuning" else eval_captions
    base = DemoConfig(eval_seeds=tuple(range(args.eval_seeds)), eval_prompts=args.eval_prompts)
    rows = []
    for label, model in models:
        pipe = load(model, device="cpu", dtype="fp32")
        for scheduler, guidance in configs:
            r = fidelity(
                pipe, replace(base, scheduler=scheduler, guidance_scale=guidance), caption_source=source
            )
            row = {"model": label, "path": model, "scheduler": scheduler, "guidance": guidance}
            row |= {
                k: r.get(k)  # no held-out score on tuning captions
                for k in (
                    "caption_fidelity",
                    "caption_fidelity_held_out",
                    "colour_accuracy",
                    "shape_accuracy",
                )
            }
            rows.append(row)
            log(f"{label} {scheduler} guidance {guidance:g}: {cell(row)}")
    meta = {
        "machine": f"{cpu_model()}, 1 torch thread, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/toy_samplers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "captions": f"{args.captions} captions, {args.eval_seeds} seeds x {args.eval_prompts} captions per split, 25 steps",
    }
    lines = [
        f"# {args.name}: samplers and guidance on the toy world",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}.  ",
        f"Captions: {meta['captions']}. Caption fidelity on seen combinations (held-out combinations in brackets).",
        "",
        "| model | " + " | ".join(f"{s} {g:g}" for s, g in configs) + " |",
        "|---|" + "---:|" * len(configs),
    ]
    for label, _ in models:
        cells = [r for r in rows if r["model"] == label]
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in cells) + " |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / f"{args.name}.json", json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(lines) + "\n")
    log(f"wrote {args.out_dir / args.name}.json/.md")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()

"""Fewer steps on the toy world: caption fidelity against end-to-end time per image.

One chain per training seed, through the code users run: `slimsd demo`'s own run (toy teacher -> bk-small KD
student -> the KD student step-distilled by LCM, objective=lcm), then an LCM-LoRA of the same KD student
(objective=lcm-lora). Every row is scored as the demo scores (caption fidelity of fresh captions of seen and of
held-out colour x shape combinations, 3 seeds x 24 captions each, guidance 2) and timed end to end per image
(slimsd.run.generate: text encoding, every U-Net evaluation at the row's steps and guidance, VAE decode; 64 px,
fp32, one torch thread, median of round-robin repeats):

  teacher 25 steps (DPM-Solver++ is not its scheduler: PNDM, the toy teacher's own) with CFG
  KD student 25 steps with CFG; KD student at 4 steps with DPM++ 2M (a plain solver, no training)
  KD student + DeepCache, interval 3 (training-free reuse of deep features)
  LCM student 1 / 2 / 4 / 8 steps (guidance through its embedding, no doubled batch)
  LCM-LoRA 4 steps (guidance 1: baked in)

Writes OUT.json (rows), OUT.md (machine, date, command) and OUT.png (fidelity against ms per image).

Run:  .venv/bin/python benchmarks/toy_steps.py --seeds 0 1 2
      .venv/bin/python benchmarks/toy_steps.py --from-json benchmarks/results/toy_steps.json  # re-aggregate

Spreads are sample standard deviations (n - 1), as in every results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rows_for_seed(seed: int, work: Path, lora_rank: int, repeats: int) -> list[dict]:
    import torch

    from slimsd.measure.bench import time_round_robin
    from slimsd.models.loading import load
    from slimsd.run import generate as G
    from slimsd.toy.demo import DemoConfig, fidelity, lcm_config, run_demo
    from slimsd.train.distill import train

    cfg = DemoConfig(out=str(work / f"demo-seed{seed}"), seed=seed, log=log, overwrite=True, image_repeats=1)
    done = Path(cfg.out) / "results.json"
    summary = json.loads(done.read_text()) if done.is_file() else run_demo(cfg)
    kd_dir, lcm_dir = Path(cfg.out) / "kd_student" / "final", Path(cfg.out) / "lcm_student" / "final"
    lora_out = work / f"lcm-lora-seed{seed}"
    if not (lora_out / "final").is_dir():
        log(f"seed {seed}: training the LCM-LoRA of the KD student")
        lora_cfg = lcm_config(cfg, kd_dir, Path(cfg.out) / "cache", lora_out)
        lora_cfg.objective, lora_cfg.lora_rank, lora_cfg.learning_rate = "lcm-lora", lora_rank, 1e-3
        lora_cfg.sample_guidance, lora_cfg.overwrite = None, True
        train(lora_cfg)

    # (label, model folder, scheduler, steps, guidance, deep-cache interval)
    plan = [
        ("teacher", "toy-sd", None, 25, cfg.guidance_scale, 1),
        ("KD student", str(kd_dir), None, 25, cfg.guidance_scale, 1),
        ("KD student, DPM++ 2M", str(kd_dir), "dpm++2m", 4, cfg.guidance_scale, 1),
    ]
    plan.append(("KD student + DeepCache 3", str(kd_dir), None, 25, cfg.guidance_scale, 3))
    plan += [(f"LCM student ({n} steps)", str(lcm_dir), None, n, cfg.guidance_scale, 1) for n in (1, 2, 4, 8)]
    plan.append(("LCM-LoRA", str(lora_out / "final"), None, 4, 1.0, 1))

    rows, fns = [], {}
    for label, model, scheduler, steps, guidance, interval in plan:
        pipe = load(model, device="cpu", dtype="fp32", scheduler=scheduler)
        extra = {"deep_cache": interval} if interval > 1 else {}
        scores = fidelity(pipe, DemoConfig(guidance_scale=guidance), steps, interval)
        log(
            f"seed {seed}: {label}: fidelity {scores['caption_fidelity']:.3f} / {scores['caption_fidelity_held_out']:.3f}"
        )
        rows.append(
            {
                "seed": seed,
                "row": label,
                "model": model,
                "scheduler": scheduler or pipe._slimsd["default_scheduler"],
                "steps": steps,
                "guidance": guidance,
                "deep_cache": interval,
                "caption_fidelity": scores["caption_fidelity"],
                "caption_fidelity_held_out": scores["caption_fidelity_held_out"],
                "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
            }
        )
        fns[label] = lambda p=pipe, n=steps, g=guidance, e=extra: G.generate(
            p, "a red circle", steps=n, guidance=g, width=64, height=64, seed=0, **e
        )
    torch.set_num_threads(1)
    timings = time_round_robin(fns, "cpu", warmup=1, repeats=repeats)
    for row in rows:
        row["image_ms"] = timings[row["row"]]["median_ms"]
    rows.append(
        {
            "seed": seed,
            "row": "_demo",
            "summary": {k: summary[k] for k in ("lcm_vs_teacher", "kd_vs_teacher")},
        }
    )
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    out = []
    labels = list(dict.fromkeys(r["row"] for r in rows if r["row"] != "_demo"))
    for label in labels:
        group = [r for r in rows if r["row"] == label]
        first = group[0]
        fid = [r["caption_fidelity"] for r in group]
        held = [r["caption_fidelity_held_out"] for r in group]
        out.append(
            {
                "row": label,
                "steps": first["steps"],
                "scheduler": first["scheduler"],
                "guidance": first["guidance"],
                "deep_cache": first["deep_cache"],
                "seeds": [r["seed"] for r in group],
                "caption_fidelity_mean": statistics.fmean(fid),
                "caption_fidelity_std": statistics.stdev(fid) if len(fid) > 1 else 0.0,  # sample std
                "caption_fidelity_held_out_mean": statistics.fmean(held),
                "image_ms_median": statistics.median(r["image_ms"] for r in group),
                "unet_params": first["unet_params"],
            }
        )
    return out


def write(out: Path, table: list[dict], rows: list[dict], command: str, meta: dict | None = None) -> None:
    """The results (``meta``: machine, torch, date and command of the run, when re-aggregating one)."""
    import matplotlib

    from slimsd.devices import cpu_model

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    meta = meta or {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, 1 torch thread, other jobs running alike for all rows",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command,
    }
    command = meta["command"]
    out.with_suffix(".json").write_text(
        json.dumps({**meta, "rows": table, "per_seed": rows}, indent=1) + "\n"
    )
    teacher = next(r for r in table if r["row"] == "teacher")
    lines = [
        "# toy_steps: caption fidelity against end-to-end time per image",
        "",
        f"Command: `{command}`  ",
        f"Machine: {meta['machine']}, torch {meta['torch']}; date {meta['date']}.  ",
        "Fidelity: caption fidelity of 3 eval seeds x 24 captions (seen combinations; held-out: combinations no "
        "training data contains), mean ± std over training seeds. image ms: one 64 px image end to end "
        "(text encoding, all U-Net evaluations, VAE decode), median, fp32, CPU.",
        "",
        "| row | steps | guidance | fidelity (seen) | held-out | vs teacher | image ms | vs teacher time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['row']} | {r['steps']} | {r['guidance']:g} | {r['caption_fidelity_mean']:.3f} ± "
            f"{r['caption_fidelity_std']:.3f} | {r['caption_fidelity_held_out_mean']:.3f} | "
            f"{r['caption_fidelity_mean'] / teacher['caption_fidelity_mean']:.0%} | {r['image_ms_median']:.1f} | "
            f"{teacher['image_ms_median'] / r['image_ms_median']:.1f}x faster |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table:
        ax.scatter(r["image_ms_median"], r["caption_fidelity_mean"])
        ax.annotate(r["row"], (r["image_ms_median"], r["caption_fidelity_mean"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms per image, end to end (log)")
    ax.set_ylabel("caption fidelity (seen combinations)")
    ax.set_title("toy world: fewer steps")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "toy_steps")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_steps")
    ap.add_argument(
        "--from-json", type=Path, help="re-aggregate the per-seed rows of an earlier run's results"
    )
    args = ap.parse_args()
    if args.from_json:
        earlier = json.loads(args.from_json.read_text())
        meta = {k: earlier[k] for k in ("machine", "torch", "date", "command")}
        meta["aggregated_by"] = "python benchmarks/toy_steps.py " + " ".join(sys.argv[1:])
        write(args.out, aggregate(earlier["per_seed"]), earlier["per_seed"], meta["command"], meta)
        log(f"wrote {args.out}.json/.md/.png from the per-seed rows of {args.from_json}")
        return
    import torch

    torch.set_num_threads(1)
    command = "python benchmarks/toy_steps.py " + " ".join(sys.argv[1:])
    rows = []
    for seed in args.seeds:
        rows += rows_for_seed(seed, args.work, args.lora_rank, args.repeats)
    write(args.out, aggregate(rows), rows, command.strip())
    log(f"wrote {args.out}.json/.md/.png")


if __name__ == "__main__":
    main()

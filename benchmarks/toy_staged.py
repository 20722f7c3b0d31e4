"""Does staging pay? A staged plan (bk-small, then bk-tiny from its trained student) against a one-shot bk-tiny
with the same total steps, on the toy world.

SSD-1B was distilled progressively, shorter in each stage; slimsd's one-shot path compresses straight to the
final recipe. Both arms here end in the same bk-tiny architecture after the same number of optimizer steps,
trained through slimsd.train.distill.train with the demo's settings (slimsd.toy.demo.DemoConfig: task +
output-KD + feature-KD, the original toy teacher in every stage) and scored as toy_ablation.py does (caption
fidelity of fresh captions of seen and of held-out colour x shape combinations):

  one-shot   compress bk-tiny from the teacher, train STEPS1 + STEPS2 steps
  staged     stages: bk-small for STEPS1 steps, then bk-tiny (from that student) for STEPS2 steps

Results are saved per run under --work (an interrupted sweep resumes); rows go to OUT.json and OUT.md.

Run:  .venv/bin/python benchmarks/toy_staged.py --budgets 75+75 150+150 --jobs 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_ablation as A

ARMS = ("one-shot", "staged")
FIRST, LAST = "bk-small", "bk-tiny"
KD_ARM = (
    "teacher-init-task-out-feat"  # toy_ablation's arm with BK-SDM's full loss: its init is the one-shot one
)


def run_key(arm: str, seed: int, steps: tuple[int, int]) -> str:
    return f"{arm}.seed{seed}.steps{steps[0]}+{steps[1]}"


def run_one(job: tuple[str, int, tuple[int, int]], args) -> dict:
    """Train one arm's student for one seed and score it; the row is written to WORK/results/KEY.json."""
    import shutil

    import torch

    from slimsd.models.loading import load
    from slimsd.toy.demo import distill_config, fidelity
    from slimsd.train.distill import train

    torch.set_num_threads(1)
    arm, seed, (n1, n2) = job
    key = run_key(*job)
    cfg = A.demo_config(args, seed, n1 + n2)
    out = args.work / "students" / key
    shutil.rmtree(out, ignore_errors=True)  # a run killed half-way starts over
    one_shot = distill_config(
        cfg, A.init_dir(args.work, LAST, KD_ARM, seed), args.work / "cache" / f"seed{seed}", out, True
    )
    run_cfg = one_shot
    if arm == "staged":  # each stage warms up as the one-shot run does over its steps
        run_cfg = replace(
            one_shot,
            stages=[
                {"recipe": FIRST, "max_steps": n1, "lr_warmup_steps": min(20, n1 // 10)},
                {"recipe": LAST, "max_steps": n2, "lr_warmup_steps": min(20, n2 // 10)},
            ],
        )
    t0 = time.perf_counter()
    result = train(run_cfg)
    train_s = time.perf_counter() - t0
    scores = fidelity(load(result["final_dir"], device="cpu", dtype="fp32"), cfg)
    row = {"key": key, "arm": arm, "seed": seed, "steps": [n1, n2], "train_s": train_s, **scores}
    path = args.work / "results" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)
    shutil.rmtree(out, ignore_errors=True)  # the score is what the sweep keeps
    return row


def summarize(runs: list[dict], teacher: dict, meta: dict) -> list[dict]:
    rows = [
        {
            "arm": "teacher",
            "seeds": [],
            "caption_fidelity_mean": teacher["caption_fidelity"],
            "caption_fidelity_std": 0.0,
            "caption_fidelity_held_out_mean": teacher["caption_fidelity_held_out"],
            "caption_fidelity_held_out_std": 0.0,
            **meta,
        }
    ]
    for steps, arm in sorted({(tuple(r["steps"]), r["arm"]) for r in runs}, key=lambda g: (sum(g[0]), g[1])):
        rs = sorted(
            (r for r in runs if r["arm"] == arm and tuple(r["steps"]) == steps), key=lambda r: r["seed"]
        )
        row = {"arm": arm, "steps": rs[0]["steps"], "seeds": [r["seed"] for r in rs]}
        for field in ("caption_fidelity", "caption_fidelity_held_out"):
            values = [r[field] for r in rs]
            row[f"{field}_mean"] = statistics.fmean(values)
            row[f"{field}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{field}_per_seed"] = values
        row["train_s_mean"] = statistics.fmean(r["train_s"] for r in rs)
        rows.append(row | meta)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# {meta['name']}: staged (bk-small then bk-tiny) vs one-shot bk-tiny, same total steps",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}.  ",
        f"Scores: caption fidelity of {meta['eval']}; mean ± std over training seeds. `held-out`: colour x "
        "shape combinations no training data contains. Both arms end in bk-tiny; task + output-KD + "
        "feature-KD from the toy teacher in every stage.",
        "",
        "| arm | steps | seeds | fidelity (seen) | per seed | held-out | per seed | train s |",
        "|---|---|---|---:|---|---:|---|---:|",
    ]
    for r in rows:
        steps = "+".join(map(str, r["steps"])) if r.get("steps") else ""
        per = {
            f: ", ".join(f"{v:.3f}" for v in r.get(f"{f}_per_seed", []))
            for f in ("caption_fidelity", "caption_fidelity_held_out")
        }
        lines.append(
            f"| {r['arm']} | {steps} | {','.join(map(str, r['seeds']))} | "
            f"{r['caption_fidelity_mean']:.3f} ± {r['caption_fidelity_std']:.3f} | {per['caption_fidelity']} | "
            f"{r['caption_fidelity_held_out_mean']:.3f} ± {r['caption_fidelity_held_out_std']:.3f} | "
            f"{per['caption_fidelity_held_out']} | {r.get('train_s_mean', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--budgets", nargs="+", default=["150+150"], help="STEPS1+STEPS2 per budget (one-shot: the sum)"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--eval-seeds", type=int, default=3)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--data-images", type=int, default=2048)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--name", default="toy_staged")
    ap.add_argument("--out-dir", type=Path, default=A.ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=A.ROOT / "runs" / "toy_staged")
    args = ap.parse_args(argv)

    from slimsd.devices import cpu_model

    budgets = [tuple(int(n) for n in b.split("+")) for b in args.budgets]
    jobs = [(arm, seed, b) for b in budgets for seed in args.seeds for arm in args.arms]
    A.check_work(args)
    done = {p.stem for p in (args.work / "results").glob("*.json")}
    todo = [j for j in jobs if run_key(*j) not in done]
    A.log(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done in {args.work}")
    A.prepare(args, [(LAST, KD_ARM, seed, 0) for _, seed, _ in todo])  # bk-tiny init and latent caches

    def report(i: int, row: dict) -> None:
        A.log(
            f"{i}/{len(todo)} {row['key']}: fidelity {row['caption_fidelity']:.3f}, held-out "
            f"{row['caption_fidelity_held_out']:.3f} ({row['train_s']:.0f} s training)"
        )

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, j, args) for j in todo]
        for i, f in enumerate(futures, 1):
            report(i, f.result())
    runs = [json.loads((args.work / "results" / f"{run_key(*j)}.json").read_text()) for j in jobs]
    import torch

    cfg = A.demo_config(args, 0, 1)
    meta = {
        "name": args.name,
        "machine": f"{cpu_model()}, 1 torch thread per run, {args.jobs} run(s) at a time, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/toy_staged.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "eval": f"{args.eval_seeds} seeds x {args.eval_prompts} captions, {cfg.inference_steps} steps, guidance "
        f"{cfg.guidance_scale:g}",
    }
    rows = summarize(runs, A.teacher_row(args), meta)
    from slimsd.atomic import atomic_write_text

    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / f"{args.name}.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(args.out_dir / f"{args.name}.md", markdown(rows, meta))
    A.log(f"wrote {args.out_dir / args.name}.json/.md")
    print(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()

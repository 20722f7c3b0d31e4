"""BK-SDM's distillation ablation on the toy world: initialisation and KD terms, per block-removal recipe.

Kim et al. 2023 (BK-SDM, "distillation retraining" ablation) order their arms: a pruned student initialised at
random is far worse than one initialised from the teacher's weights; adding output-level KD helps; adding
feature-level KD helps most. Here each arm trains students of the toy teacher (slimsd.toy) through
slimsd.train.distill.train with the demo's settings (slimsd.toy.demo.DemoConfig) and scores them as the demo
does (caption fidelity of fresh captions of seen and of held-out colour x shape combinations):

  random-init-task            compress --init random, task loss only
  teacher-init-task           compress --init teacher, task loss only
  teacher-init-task-out       + output-level KD (lambda_out 1)
  teacher-init-task-out-feat  + feature-level KD (lambda_feat 1): BK-SDM's method, the demo's KD student

Each (recipe, arm, seed, steps) run is saved under --work as it finishes, so an interrupted sweep resumes;
--jobs N runs N students at a time (one torch thread each). The rows (mean and std over training seeds) go to
OUT.json (a list), OUT.md (with machine, date and command) and OUT.png.

Run:  .venv/bin/python benchmarks/toy_ablation.py --jobs 2
      .venv/bin/python benchmarks/toy_ablation.py --name toy_budgets --recipes bk-small \\
          --arms teacher-init-task teacher-init-task-out-feat --steps 150 300 600 --jobs 2
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# transformers' "Writing model shards" bars, once per saved student
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("bk-base", "bk-small", "bk-tiny")
# arm: (student init, lambda_out, lambda_feat); the task loss is always on (lambda_task 1)
ARMS = {
    "random-init-task": ("random", 0.0, 0.0),
    "teacher-init-task": ("teacher", 0.0, 0.0),
    "teacher-init-task-out": ("teacher", 1.0, 0.0),
    "teacher-init-task-out-feat": ("teacher", 1.0, 1.0),
}
TEACHER = "toy-sd"
# training settings the command line can change for every run of a sweep: DemoConfig's field names, which are
# also the options' (--learning-rate ...); each is part of the work folder's fingerprint and of the results
SETTINGS = ("learning_rate", "lr_scheduler", "lambda_feat", "feat_norm", "ema_decay")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_key(recipe: str, arm: str, seed: int, steps: int) -> str:
    return f"{recipe}.{arm}.seed{seed}.steps{steps}"


def init_dir(work: Path, recipe: str, arm: str, seed: int) -> Path:
    init = ARMS[arm][0]
    # a teacher-initialised student is the same for every seed; a random one depends on it
    return work / "init" / (f"{recipe}-teacher" if init == "teacher" else f"{recipe}-random-seed{seed}")


def demo_config(args, seed: int, steps: int, lambda_out: float = 1.0, lambda_feat: float = 1.0):
    from slimsd.toy.demo import DemoConfig

    return DemoConfig(
        seed=seed,
        steps=steps,
        lambda_out=lambda_out,
        lambda_feat=lambda_feat,
        eval_seeds=tuple(range(args.eval_seeds)),
        eval_prompts=args.eval_prompts,
        data_images=args.data_images,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        feat_norm=args.feat_norm,
        ema_decay=args.ema_decay,
        log=lambda _msg: None,
    )


def prepare(args, jobs: list[tuple[str, str, int, int]]) -> None:
    """Student inits and latent caches, built once here (the workers only read them)."""
    from slimsd.models.compress import compress
    from slimsd.train.cache import write_cache

    for recipe, arm, seed, _ in jobs:
        path = init_dir(args.work, recipe, arm, seed)
        if not (path / "slimsd.json").is_file():
            compress(TEACHER, recipe, path, init=ARMS[arm][0], seed=seed, overwrite=True)
    for seed in sorted({j[2] for j in jobs}):
        cache = args.work / "cache" / f"seed{seed}"
        if not cache.is_dir():  # write_cache builds it beside and renames it into place
            cfg = demo_config(args, seed, 1)
            write_cache(TEACHER, f"shapes:{cfg.data_images}", cache, resolution=64, seed=seed)


def run_one(job: tuple[str, str, int, int], args) -> dict:
    """Train one student and score it; the result is written to WORK/results/KEY.json."""
    import torch

    from slimsd.models.loading import load
    from slimsd.toy.demo import distill_config, fidelity
    from slimsd.train.distill import train

    torch.set_num_threads(1)
    recipe, arm, seed, steps = job
    key = run_key(*job)
    _, lambda_out, lambda_feat = ARMS[arm]
    cfg = demo_config(args, seed, steps, lambda_out, lambda_feat * args.lambda_feat)
    out = args.work / "students" / key
    shutil.rmtree(out, ignore_errors=True)  # a run killed half-way starts over
    t0 = time.perf_counter()
    result = train(
        distill_config(
            cfg, init_dir(args.work, recipe, arm, seed), args.work / "cache" / f"seed{seed}", out, True
        )
    )
    train_s = time.perf_counter() - t0
    scores = fidelity(load(result["final_dir"], device="cpu", dtype="fp32"), cfg)
    row = {
        "key": key,
        "recipe": recipe,
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "train_s": train_s,
        **scores,
    }
    path = args.work / "results" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)
    shutil.rmtree(out, ignore_errors=True)  # the score is what the sweep keeps
    return row


def fingerprint(args) -> dict:
    """What every saved result in --work depends on: the teacher's weights, its sampling, the evaluation."""
    import hashlib

    from slimsd.toy.teacher import TOY_DIR, TOY_SAMPLING

    weights = sorted(TOY_DIR.rglob("*.safetensors"))
    digest = hashlib.sha256()
    for f in weights:
        digest.update(f.relative_to(TOY_DIR).as_posix().encode() + f.read_bytes())
    return {
        "teacher_sha256": digest.hexdigest(),
        "sampling": TOY_SAMPLING,
        "eval_seeds": args.eval_seeds,
        "eval_prompts": args.eval_prompts,
        "data_images": args.data_images,
        **settings(args),
    }


def settings(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def check_work(args) -> None:
    """Refuse to mix results made with another teacher or protocol into this sweep (resumed results are reused
    as they are); a work folder without a fingerprint gets this one."""
    path = args.work / "fingerprint.json"
    now = fingerprint(args)
    if path.is_file():
        saved = json.loads(path.read_text())
        from slimsd.toy.demo import DemoConfig

        # work folders from before these options existed were trained with the demo's
        for k in SETTINGS:
            saved.setdefault(k, getattr(DemoConfig, k))
        if saved != now:
            changed = ", ".join(k for k in now if saved.get(k) != now[k])
            raise SystemExit(
                f"toy_ablation: {args.work} holds results made with another {changed}; use another --work "
                "or remove it"
            )
        return
    args.work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1) + "\n")


def teacher_row(args) -> dict:
    path = args.work / "results" / "teacher.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from slimsd.models.loading import load
    from slimsd.toy.demo import fidelity

    torch.set_num_threads(1)
    scores = fidelity(load(TEACHER, device="cpu", dtype="fp32"), demo_config(args, 0, 1))
    row = {"recipe": "teacher", "arm": "teacher", **scores}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def step_ms(args, recipes: list[str]) -> dict[str, float]:
    """Median ms of one U-Net step (batch 2: classifier-free guidance) per recipe and the teacher, round-robin,
    measured after the training runs so that nothing else runs beside it."""
    import torch

    from slimsd.models.loading import load
    from slimsd.toy.demo import step_latencies

    torch.set_num_threads(1)
    unets = {"teacher": load(TEACHER, device="cpu", dtype="fp32").unet}
    for recipe in recipes:
        unets[recipe] = load(str(args.work / "init" / f"{recipe}-teacher"), device="cpu", dtype="fp32").unet
    return step_latencies(unets, repeats=30)


def aggregate(runs: list[dict], teacher: dict, params: dict, latency: dict, meta: dict) -> list[dict]:
    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = [
        {
            "recipe": "teacher",
            "arm": "teacher",
            "steps": None,
            "seeds": [],
            "caption_fidelity_mean": teacher["caption_fidelity"],
            "caption_fidelity_std": 0.0,
            "caption_fidelity_held_out_mean": teacher["caption_fidelity_held_out"],
            "caption_fidelity_held_out_std": 0.0,
            "colour_accuracy_mean": teacher["colour_accuracy"],
            "shape_accuracy_mean": teacher["shape_accuracy"],
            "unet_params": params["teacher"],
            "step_ms": latency["teacher"],
            **meta,
        }
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["recipe"], r["arm"], r["steps"]), []).append(r)
    for (recipe, arm, steps), rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        fid = mean_std([r["caption_fidelity"] for r in rs])
        held = mean_std([r["caption_fidelity_held_out"] for r in rs])
        rows.append(
            {
                "recipe": recipe,
                "arm": arm,
                "steps": steps,
                "seeds": [r["seed"] for r in rs],
                "caption_fidelity_mean": fid[0],
                "caption_fidelity_std": fid[1],
                "caption_fidelity_per_seed": [r["caption_fidelity"] for r in rs],
                "caption_fidelity_held_out_mean": held[0],
                "caption_fidelity_held_out_std": held[1],
                "caption_fidelity_held_out_per_seed": [r["caption_fidelity_held_out"] for r in rs],
                "colour_accuracy_mean": statistics.fmean(r["colour_accuracy"] for r in rs),
                "shape_accuracy_mean": statistics.fmean(r["shape_accuracy"] for r in rs),
                "unet_params": params[recipe],
                "step_ms": latency[recipe],
                "train_s_mean": statistics.fmean(r["train_s"] for r in rs),
                **meta,
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# {meta['name']}: BK-SDM's ablation arms on the toy world",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}.  ",
        f"Scores: caption fidelity (colour and shape read back from pixels) of {meta['eval']}; mean ± std over "
        "training seeds. `held-out`: colour x shape combinations no training data contains.",
        "",
        "| recipe | arm | steps | seeds | fidelity (seen) | held-out | colour | shape | U-Net params | step ms |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['arm']} | {r['steps'] or ''} | {','.join(map(str, r['seeds']))} | "
            f"{r['caption_fidelity_mean']:.3f} ± {r['caption_fidelity_std']:.3f} | "
            f"{r['caption_fidelity_held_out_mean']:.3f} ± {r['caption_fidelity_held_out_std']:.3f} | "
            f"{r['colour_accuracy_mean']:.3f} | {r['shape_accuracy_mean']:.3f} | {r['unet_params']:,} | "
            f"{r['step_ms']:.1f} |"
        )
    lines += [
        "",
        "BK-SDM's published ordering (Kim et al. 2023): random-init-task < teacher-init-task < "
        "teacher-init-task-out < teacher-init-task-out-feat.",
        "",
    ]
    return "\n".join(lines)


def chart(rows: list[dict], meta: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [r for r in rows if r["arm"] != "teacher"]
    groups = list(dict.fromkeys((r["recipe"], r["steps"]) for r in students))
    arms = [a for a in ARMS if any(r["arm"] == a for r in students)]
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(3 + 1.8 * len(groups), 4), dpi=100)
    for k, arm in enumerate(arms):
        got = {(r["recipe"], r["steps"]): r for r in students if r["arm"] == arm}
        xs = [g - 0.4 + width * (k + 0.5) for g in range(len(groups))]
        ax.bar(
            xs,
            [got[g]["caption_fidelity_mean"] if g in got else 0 for g in groups],
            width,
            yerr=[got[g]["caption_fidelity_std"] if g in got else 0 for g in groups],
            label=arm,
            capsize=2,
        )
    teacher = next(r for r in rows if r["arm"] == "teacher")
    ax.axhline(teacher["caption_fidelity_mean"], color="k", ls="--", lw=1, label="teacher (toy-sd)")
    ax.set_xticks(range(len(groups)), [f"{r}\n{s} steps" for r, s in groups])
    ax.set_ylabel("caption fidelity, seen combinations")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{meta['name']} · {meta['machine'][:60]} · {meta['date']}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> list[dict]:
    from slimsd.toy.demo import DemoConfig
    from slimsd.train.losses import FEAT_NORMS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", nargs="+", type=int, default=[150])
    ap.add_argument("--eval-seeds", type=int, default=3)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--data-images", type=int, default=2048)
    ap.add_argument("--learning-rate", type=float, default=DemoConfig.learning_rate, help="every arm's")
    ap.add_argument("--lr-scheduler", default=DemoConfig.lr_scheduler, help="every arm's")
    ap.add_argument(
        "--lambda-feat",
        type=float,
        default=DemoConfig.lambda_feat,
        help="the feature-KD weight of the arms with one",
    )
    ap.add_argument(
        "--feat-norm", default=DemoConfig.feat_norm, choices=FEAT_NORMS, help="of the feature-KD arms"
    )
    ap.add_argument(
        "--ema-decay", type=float, default=DemoConfig.ema_decay, help="every arm's (default: none)"
    )
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--name", default="toy_ablation")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "toy_ablation")
    args = ap.parse_args(argv)

    from slimsd.devices import cpu_model

    jobs = [(r, a, s, n) for r in args.recipes for a in args.arms for s in args.seeds for n in args.steps]
    check_work(args)
    done = {p.stem for p in (args.work / "results").glob("*.json")}
    todo = [j for j in jobs if run_key(*j) not in done]
    log(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done in {args.work}")
    prepare(args, todo)

    def report(i: int, row: dict) -> None:
        log(
            f"{i}/{len(todo)} {row['key']}: fidelity {row['caption_fidelity']:.3f}, held-out "
            f"{row['caption_fidelity_held_out']:.3f} ({row['train_s']:.0f} s training)"
        )

    if args.jobs == 1:
        for i, job in enumerate(todo, 1):
            report(i, run_one(job, args))
    elif todo:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, j, args) for j in todo]
            for i, f in enumerate(futures, 1):
                report(i, f.result())
    runs = [json.loads((args.work / "results" / f"{run_key(*j)}.json").read_text()) for j in jobs]
    teacher = teacher_row(args)
    from slimsd.models.compress import compress

    params = {}
    for (
        recipe
    ) in args.recipes:  # counted once, by compress, into each teacher-initialised student's slimsd.json
        folder = args.work / "init" / f"{recipe}-teacher"
        if not (folder / "slimsd.json").is_file():  # only random-init arms ran: step_ms needs this one too
            compress(TEACHER, recipe, folder, overwrite=True)
        info = json.loads((folder / "slimsd.json").read_text())
        params[recipe], params["teacher"] = info["student_unet_params"], info["teacher_unet_params"]
    latency = step_ms(args, args.recipes)
    import torch

    cfg = demo_config(args, 0, 1)  # the sampling every score used
    meta = {
        "name": args.name,
        "machine": f"{cpu_model()}, 1 torch thread per run, {args.jobs} run(s) at a time, torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/toy_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "eval": f"{args.eval_seeds} seeds x {args.eval_prompts} captions, {cfg.inference_steps} steps, guidance "
        f"{cfg.guidance_scale:g}",
        **settings(args),
    }
    rows = aggregate(runs, teacher, params, latency, meta)
    from slimsd.atomic import atomic_write_bytes, atomic_write_text

    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / f"{args.name}.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(args.out_dir / f"{args.name}.md", markdown(rows, meta))
    atomic_write_bytes(args.out_dir / f"{args.name}.png", chart(rows, meta))
    log(f"wrote {args.out_dir / args.name}.json/.md/.png")
    print(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()

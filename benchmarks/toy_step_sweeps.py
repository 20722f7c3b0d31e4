"""The settings sweeps behind the demo's LCM defaults and the README's progressive-distillation paragraph.

One training seed (0), on the toy world, through the code users run (slimsd.train.distill.train on the configs
`slimsd distill` builds from the same key=value words, recorded as each run's command):

  kd300: the KD student the step distillation starts from: the demo's settings (slimsd.toy.demo.distill_config)
         at 300 steps, on the demo's data (slimsd compress toy-sd bk-small; slimsd cache of shapes:2048, 64 px);
  lcm:   objective=lcm from kd300, 300 steps, learning rate 1e-4 and 3e-4;
  progressive: objective=progressive [16, 8, 4] from kd300: 160 steps per round at 1e-4 and 3e-4, 250 steps per
         round at 1e-4; the 1e-4/160 run also scored after each round (its checkpoints, at the round's steps).

Every score is slimsd.toy.demo.fidelity (3 eval seeds x 24 captions of seen and of held-out colour x shape
combinations, guidance 2), written as [seen, held-out]. kd300 is also scored at 25 PNDM steps (its own sampler),
4 PNDM steps and 4 DPM-Solver++ 2M steps (plain few-step sampling, no training).

Run (about an hour on 2 shared cores):
    .venv/bin/python benchmarks/toy_step_sweeps.py
or the runs in parallel processes, then once more to assemble the file from what they measured:
    .venv/bin/python benchmarks/toy_step_sweeps.py --runs kd300   # first: trains the student the others start from
    .venv/bin/python benchmarks/toy_step_sweeps.py --runs lcm/lr1e-4 &
    .venv/bin/python benchmarks/toy_step_sweeps.py --runs lcm/lr3e-4 &
    .venv/bin/python benchmarks/toy_step_sweeps.py --runs progressive/lr1e-4 progressive/lr3e-4 &
    .venv/bin/python benchmarks/toy_step_sweeps.py --runs progressive/lr1e-4-r250 &
    wait; .venv/bin/python benchmarks/toy_step_sweeps.py
Finished trainings stay in --work, and every score and training time is kept there (scores-PID.json, one file per
process), so a rerun measures only what is missing. An invocation with every run (the default) writes
benchmarks/results/toy_step_distillation_sweeps.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]

BASE = (
    "batch_size=16 lr_scheduler=constant_with_warmup lr_warmup_steps=20 guidance_min=1.5 guidance_max=3 "
    "sample_guidance=2"
)
LCM = {
    "lr1e-4": "objective=lcm max_steps=300 learning_rate=0.0001",
    "lr3e-4": "objective=lcm max_steps=300 learning_rate=0.0003",
}
PROGRESSIVE = {  # name: (words, steps per round)
    "lr1e-4-r250": ("steps_per_round=250 max_steps=750 learning_rate=0.0001", 250),
    "lr1e-4": ("steps_per_round=160 max_steps=480 learning_rate=0.0001", 160),
    "lr3e-4": ("steps_per_round=160 max_steps=480 learning_rate=0.0003", 160),
}
ROUNDS = [16, 8, 4]
CHECKPOINTED = "lr1e-4"  # the progressive run also scored after each round
RUNS = ["kd300", *(f"lcm/{k}" for k in LCM), *(f"progressive/{k}" for k in PROGRESSIVE)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def words(text: str) -> list[str]:
    return text.split()


class Sweep:
    """The results file, rewritten after every score."""

    def __init__(self, out: Path, work: Path, command: str):
        from slimsd.devices import cpu_isa, cpu_model

        self.out, self.work = out, work
        # what earlier or parallel invocations measured: key -> value (scores, training seconds)
        self.known: dict = {}
        for path in sorted(work.glob("scores-*.json")):
            self.known |= json.loads(path.read_text())
        self.mine: dict = {}
        self.data: dict = {
            "name": "toy_step_distillation_sweeps",
            "machine": f"{cpu_model()} ({' '.join(cpu_isa())}), {os.cpu_count()} cores shared with other jobs, "
            "1 torch thread per process (the runs may run in parallel processes)",
            "torch": __import__("torch").__version__,
            "date": datetime.date.today().isoformat(),
            "command": command,
            "what": "Settings sweeps behind the demo's LCM defaults and the progressive-distillation paragraph: one "
            "training seed (0), scored with slimsd.toy.demo.fidelity (3 eval seeds x 24 captions of seen and of "
            "held-out combinations, guidance 2), each as [seen, held-out]. train_s_under_load: wall time of the "
            "training on the shared machine, not a benchmark (null: trained by an invocation that was stopped before it "
            "kept the time).",
            "kd_student": "kd300: slimsd distill teacher=toy-sd student=<slimsd compress toy-sd bk-small> "
            "data=<slimsd cache of shapes:2048, seed 0, 64 px> max_steps=300 batch_size=16 learning_rate=5e-4 "
            "lr_scheduler=constant_with_warmup lr_warmup_steps=20 caption_dropout=0.1 (the demo's settings at "
            "300 steps)",
            "kd300": {},
            "lcm": {},
            "progressive": {},
        }

    def keep(self, key: str, value) -> None:
        """A measurement, kept in this process's file in --work for later invocations."""
        from slimsd.atomic import atomic_write_text

        self.known[key] = self.mine[key] = value
        atomic_write_text(self.work / f"scores-{os.getpid()}.json", json.dumps(self.mine, indent=1) + "\n")

    def score(self, model: Path, steps: int, scheduler: str | None = None) -> list[float]:
        """[seen, held-out] caption fidelity of MODEL at STEPS (measured once per model folder)."""
        key = f"score {model.relative_to(self.work)} {steps} {scheduler}"
        if key not in self.known:
            self.keep(key, score(model, steps, scheduler))
        return self.known[key]

    def trained(self, overrides: list[str], out: Path) -> float | None:
        """Trains the run unless its final/ is there; the training's wall seconds (None: not known)."""
        key = f"train_s {out.relative_to(self.work)}"
        if not (out / "final").is_dir():
            log(f"training {out.name}")
            load = [round(os.getloadavg()[0], 2)]
            self.keep(key, trained(overrides, out))
            self.keep(f"load_average {out.relative_to(self.work)}", [*load, round(os.getloadavg()[0], 2)])
        self.data.setdefault("load_average_1min_at_start_and_end_of_each_training", {})[out.name] = (
            self.known.get(f"load_average {out.relative_to(self.work)}")
        )
        return self.known.get(key)

    def save(self) -> None:
        from slimsd.atomic import atomic_write_text

        atomic_write_text(self.out, json.dumps(self.data, indent=1) + "\n")


def score(model: str | Path, steps: int, scheduler: str | None = None) -> list[float]:
    from slimsd.models.loading import load
    from slimsd.toy.demo import DemoConfig, fidelity

    pipe = load(str(model), device="cpu", dtype="fp32", scheduler=scheduler)
    r = fidelity(pipe, DemoConfig(), steps)
    return [round(r["caption_fidelity"], 3), round(r["caption_fidelity_held_out"], 3)]


def trained(overrides: list[str], out: Path) -> int:
    """Trains the run (from the start); its wall seconds."""
    from slimsd.train.config import load_config
    from slimsd.train.distill import train

    t0 = time.perf_counter()
    cfg = load_config(None, [*overrides, f"output_dir={out}", "tensorboard=false", "progress=false"])
    cfg.overwrite = True
    train(cfg)
    return round(time.perf_counter() - t0)


def kd_student(work: Path, sweep: Sweep) -> Path:
    from slimsd.models.compress import compress
    from slimsd.toy.demo import DemoConfig, distill_config
    from slimsd.train.cache import write_cache
    from slimsd.train.distill import train

    init, cache, kd = work / "student-init", work / "cache", work / "kd300"
    if not init.is_dir():
        compress("toy-sd", "bk-small", init)
    if not cache.is_dir():
        write_cache("toy-sd", "shapes:2048", cache, resolution=64, seed=0)
    if not (kd / "final").is_dir():
        log("training kd300 (the demo's KD settings, 300 steps)")
        t0 = time.perf_counter()
        cfg = distill_config(DemoConfig(steps=300, seed=0, progress=False), init, cache, kd, kd=True)
        cfg.tensorboard, cfg.overwrite = False, True
        train(cfg)
        sweep.keep("train_s kd300", round(time.perf_counter() - t0))
    return kd / "final"


def kd_scores(sweep: Sweep, final: Path) -> None:
    sweep.data["kd300"]["train_s_under_load"] = sweep.known.get("train_s kd300")
    for key, steps, scheduler in (
        ("at_25_steps_pndm", 25, None),
        ("at_4_steps_pndm", 4, None),
        ("at_4_steps_dpm++2m", 4, "dpm++2m"),
    ):
        sweep.data["kd300"][key] = sweep.score(final, steps, scheduler)
        log(f"kd300 {key}: {sweep.data['kd300'][key]}")


def checkpoint_model(run: Path, step: int, into: Path) -> Path:
    """The run's final/ pipeline with the student weights of its checkpoint at ``step``."""
    from safetensors import safe_open

    final, ckpt = run / "final", run / "checkpoints" / f"step-{step:08d}"
    weights = into / "unet" / "diffusion_pytorch_model.safetensors"
    with (
        safe_open(str(final / weights.relative_to(into)), "pt") as a,
        safe_open(str(ckpt / "student.safetensors"), "pt") as b,
    ):
        if set(a.keys()) != set(b.keys()):
            raise SystemExit(f"{ckpt}: the student's weights are not final/'s U-Net's")
    if into.exists():
        shutil.rmtree(into)
    shutil.copytree(final, into)
    shutil.copyfile(ckpt / "student.safetensors", weights)
    return into


def lcm_run(sweep: Sweep, name: str, teacher: list[str], shown: list[str]) -> None:
    what, run = LCM[name], sweep.work / f"lcm-{name}"
    entry = {"command": "slimsd distill " + " ".join([*shown, *words(what), *words(BASE)])}
    entry["train_s_under_load"] = sweep.trained(
        [*teacher, *words(what), *words(BASE), "checkpoint_every=0"], run
    )
    entry["fidelity_by_steps"] = {}
    sweep.data["lcm"][name] = entry
    for steps in (1, 2, 4, 8):
        entry["fidelity_by_steps"][str(steps)] = sweep.score(run / "final", steps)
        log(f"lcm {name} {steps} steps: {entry['fidelity_by_steps'][str(steps)]}")


def progressive_run(sweep: Sweep, name: str, teacher: list[str], shown: list[str]) -> None:
    (what, per_round), run = PROGRESSIVE[name], sweep.work / f"progressive-{name}"
    schedule = f"progressive_steps={ROUNDS}"
    entry = {
        "command": "slimsd distill "
        + " ".join([*shown, "objective=progressive", f'"{schedule}"', *words(what), *words(BASE)])
    }
    keep = (
        [f"checkpoint_every={per_round}", "keep_last=3"] if name == CHECKPOINTED else ["checkpoint_every=0"]
    )
    entry["train_s_under_load"] = sweep.trained(
        [*teacher, "objective=progressive", schedule, *words(what), *words(BASE), *keep], run
    )
    entry["fidelity_by_steps"] = {}
    sweep.data["progressive"][name] = entry
    for steps in (2, 4, 8):
        entry["fidelity_by_steps"][str(steps)] = sweep.score(run / "final", steps)
        log(f"progressive {name} {steps} steps: {entry['fidelity_by_steps'][str(steps)]}")
    if name != CHECKPOINTED:
        return
    rounds = {}
    sweep.data["progressive"][f"{name}_per_round_checkpoints"] = rounds
    for r, count in enumerate(ROUNDS):
        step = (r + 1) * per_round
        model = checkpoint_model(run, step, sweep.work / f"progressive-{name}-step{step}")
        for steps in sorted({count, ROUNDS[-1]}, reverse=True):
            rounds[f"step{step}_{steps}"] = sweep.score(model, steps)
            log(
                f"progressive {name} after round {r} (step {step}), {steps} steps: {rounds[f'step{step}_{steps}']}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "toy_step_sweeps")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_step_distillation_sweeps.json"
    )
    ap.add_argument(
        "--runs",
        nargs="+",
        choices=RUNS,
        default=RUNS,
        help="these runs only (the results file: all of them)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(
        args.out, args.work.resolve(), "python benchmarks/toy_step_sweeps.py " + " ".join(sys.argv[1:])
    )
    kd = kd_student(sweep.work, sweep)
    teacher = ["teacher=toy-sd", f"student={kd}", f"data={sweep.work / 'cache'}"]
    shown = ["teacher=toy-sd", "student=kd300/final", "data=cache"]
    for run in args.runs:
        if run == "kd300":
            kd_scores(sweep, kd)
            continue
        kind, name = run.split("/")
        (lcm_run if kind == "lcm" else progressive_run)(sweep, name, teacher, shown)
    if set(args.runs) == set(RUNS):
        sweep.save()
        log(f"wrote {args.out}")
    else:
        log(f"measured {', '.join(args.runs)}; the results file is written by an invocation with every run")


if __name__ == "__main__":
    main()

"""SIGKILL a distillation run at random points (after a checkpoint, in the middle of writing one, in the middle
of writing final/), resume it with resume=latest each time: it ends bit-identical to an uninterrupted run, and
the temporary folders each kill left behind are gone."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

MAX_STEPS = 6
CONFIG = {
    "teacher": "micro-sd",
    "student": "bk-small",
    "data": "shapes:8",
    "batch_size": 2,
    "max_steps": MAX_STEPS,
    "learning_rate": 1e-3,
    "lr_scheduler": "linear",
    "lr_warmup_steps": 2,
    "ema": "true",
    "ema_decay": 0.9,
    "checkpoint_every": 1,
    "keep_last": 2,
    "resume": "latest",
    "output_dir": "run",  # relative, so that both runs record the same config
    "resolution": 64,
    "progress": "false",
    "tensorboard": "false",
}
TIMEOUT = 600  # seconds for any one condition: generous for a loaded 2-core machine; never reached normally


def start(cwd: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slimsd.cli", "distill", *[f"{k}={v}" for k, v in CONFIG.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)


def steps_saved(out: Path) -> list[int]:
    root = out / "checkpoints"
    names = os.listdir(root) if root.is_dir() else []
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("step-"))


def temporaries(out: Path) -> list[str]:
    found = [p.name for p in out.parent.glob(".run.*")]
    for folder in (out, out / "checkpoints"):
        found += [p.name for p in folder.glob(".*")] if folder.is_dir() else []
    return sorted(found)


def wait_until(condition, proc: subprocess.Popen, what: str, log: Path) -> bool:
    """Poll ``condition`` until it holds (True) or the process exits first (False)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"{what}: not reached in {TIMEOUT} s\n{log.read_text()[-3000:]}"
        time.sleep(0.005)
    return True


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow(seconds=60)
def test_sigkill_at_random_points_then_resume_ends_bit_identical(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    note = f"(random seed {seed})"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    log = tmp_path / "log.txt"
    out = killed / "run"

    # Three kills at random steps, each either right after that step's checkpoint is in place or while it is
    # being written; then one while final/ is being written (or just after, if the write was missed).
    targets = sorted(rng.sample(range(1, MAX_STEPS), 3))
    plan = [(t, rng.choice(["after", "writing"])) for t in targets] + [(MAX_STEPS, "final")]
    kills = []
    for target, how in plan:
        proc = start(killed, log)
        if how == "final":
            cond = lambda: list(out.glob(".final.tmp-*")) or (out / "final").exists()  # noqa: E731
        elif how == "writing":
            cond = lambda t=target: (  # noqa: E731
                list((out / "checkpoints").glob(f".step-{t:08d}.tmp-*")) or t in steps_saved(out)
            )
        else:
            cond = lambda t=target: t in steps_saved(out)  # noqa: E731
        reached = wait_until(cond, proc, f"{how} step {target} {note}", log)
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
        kills.append((target, how, reached, temporaries(out)))
    # A leftover that no later write of this run would replace: the next start must remove it.
    (out / "checkpoints" / f".step-00000099.tmp-{proc.pid}-x").mkdir(parents=True, exist_ok=True)

    proc = start(killed, log)
    assert proc.wait(timeout=TIMEOUT) == 0, f"{note} {kills}\n{log.read_text()[-3000:]}"
    reference = start(whole, log)
    assert reference.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]

    assert sum(reached for _, _, reached, _ in kills) >= 3, f"{note} the run ended before the kills: {kills}"
    assert temporaries(out) == [], f"{note} {kills}"
    a, b = files(whole / "run" / "final"), files(out / "final")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), f"{note} final/ differs: {kills}"
    for name in ("student.safetensors", "ema.safetensors", "trainer.pt"):
        last = f"checkpoints/step-{MAX_STEPS:08d}/{name}"
        assert (whole / "run" / last).read_bytes() == (out / last).read_bytes(), f"{note} {last}: {kills}"

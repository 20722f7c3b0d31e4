"""One run per output folder: a second run is refused or starts over whole, a resume with a changed config is
checked (and recorded when allowed), a finished run is left as it is, a checkpoint of another architecture is
named as such."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimsd.train.distill import train

from helpers import FAST_DISTILL as FAST
from helpers import cfg, run_cli, unet_weights

BASE = {**FAST, "batch_size": 2, "data": "shapes:8", "checkpoint_every": 1}


def args(out: Path, **kw) -> list[str]:
    """`slimsd distill` arguments for BASE with ``kw`` on top."""
    return ["distill", *[f"{k}={v}" for k, v in {**BASE, "output_dir": out, **kw}.items()]]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints at steps 1 and 2, final/); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(cfg(out.parent, "run", **BASE, max_steps=2))
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_second_run_into_a_used_folder_is_refused_and_overwrite_starts_over(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before, run_id = snapshot(out), json.loads((out / "run.json").read_text())["run_id"]
    code, _, err = run_cli(args(out, seed=1, max_steps=1), capsys)
    one_line_error(code, err, str(out), "resume=latest", "overwrite=true", "another output_dir")
    assert snapshot(out) == before  # nothing touched

    # overwrite=true: the old run goes whole (its step-2 checkpoint must not sit beside the new step-1)
    (tmp_path / f".run.old-{dead_pid()}-abc").mkdir()  # as left by an overwrite killed after its rename
    # beside resume=latest it is refused, the run untouched: a restart script that carries both keys would
    # otherwise delete the run, checkpoints included, on every restart
    code, _, err = run_cli(args(out, seed=1, max_steps=1, overwrite="true", resume="latest"), capsys)
    one_line_error(code, err, "overwrite=true starts a new run", "'latest'", "drop one")
    assert snapshot(out) == before
    code, out_text, _ = run_cli(args(out, seed=1, max_steps=1, overwrite="true"), capsys)
    assert code == 0 and f"overwrite=true: removing the earlier run in {out}" in out_text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] != run_id and record["config"]["seed"] == 1
    info = json.loads((out / "final" / "slimsd.json").read_text())
    assert (info["step"], info["distill"]["seed"]) == (1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing set aside is left


def test_a_folder_that_is_not_a_run_is_never_removed(finished, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    for extra in ({}, {"overwrite": "true"}):
        code, _, err = run_cli(args(mine, max_steps=1, **extra), capsys)
        one_line_error(code, err, str(mine), "'notes.txt'", "another output_dir")
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("user data")  # a run folder with the user's file in it
    code, _, err = run_cli(args(out, max_steps=1, overwrite="true"), capsys)
    one_line_error(code, err, "'notes.txt'", "removes only a run folder")
    assert (mine / "notes.txt").read_text() == (out / "notes.txt").read_text() == "user data"


def test_a_finished_run_is_left_as_it_is_and_a_larger_max_steps_continues_it(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    final_inode = (out / "final").stat().st_ino
    code, text, _ = run_cli(args(out, max_steps=2, resume="latest"), capsys)
    assert code == 0 and f"{out} already finished: step 2 of 2" in text
    assert snapshot(out) == before and (out / "final").stat().st_ino == final_inode  # final/ not rewritten
    code, text, _ = run_cli(args(out, max_steps=1, resume="latest"), capsys)  # past max_steps: finished too
    assert code == 0 and "already finished: step 2 of 1" in text and snapshot(out) == before

    code, text, _ = run_cli(args(out, max_steps=3, resume="latest"), capsys)
    assert code == 0 and "config change since step 2: max_steps: 2 -> 3" in text
    assert json.loads((out / "final" / "slimsd.json").read_text())["step"] == 3


def test_a_final_student_whose_replacement_was_killed_is_put_back_and_the_run_stays_finished(
    finished, tmp_path, capsys
):
    """A kill between final/'s set-aside and its replacement leaves only .final.old- and .final.tmp-; a start
    used to delete both (final/ gone although a complete copy existed). Now the old copy is put back."""
    out = copy_of(finished, tmp_path)
    before, pid = snapshot(out), dead_pid()
    (out / "final").rename(out / f".final.old-{pid}-ab")
    (out / f".final.tmp-{pid}-cd").mkdir()
    (out / f".final.tmp-{pid}-cd" / "model_index.json").write_text("{")  # the unfinished new copy
    code, text, _ = run_cli(args(out, max_steps=2, resume="latest"), capsys)
    assert code == 0 and f"{out} already finished: step 2 of 2" in text
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".")} == before  # final/ as it was
    code, text, _ = run_cli(args(out, max_steps=3, resume="latest"), capsys)  # the next start clears the rest
    assert code == 0 and not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_older_checkpoints_go_only_after_the_new_one_is_on_the_disk(tmp_path, monkeypatch):
    """Each file and folder of step 2 fsynced, then the rename into checkpoints/ fsynced, and only then step 1
    set aside for deletion (keep_last=1): after a crash the newest checkpoint is whole or the older one is there."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(cfg(tmp_path, "run", **{**BASE, "max_steps": 2, "keep_last": 1}))
    ckpts = tmp_path / "run" / "checkpoints"
    step1, step2 = str(ckpts / "step-00000001"), str(ckpts / "step-00000002")
    into = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == step2)
    tmp = events[into][1]
    gone = next(i for i, e in enumerate(events) if e[0] == "rename" and e[1] == step1)
    synced = {e[1].replace(tmp, step2) for e in events[:into] if e[0] == "fsync" and e[1].startswith(tmp)}
    assert synced == {str(p) for p in Path(step2).rglob("*")} | {step2}
    assert ("fsync", str(ckpts)) in events[into:gone]
    assert ".step-00000001.del-" in events[gone][2]  # set aside to be deleted: never put back on a start


def test_a_changed_config_that_breaks_exact_resumption_is_refused_unless_allowed(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    changed = {"max_steps": 3, "resume": "latest", "learning_rate": 5e-4, "seed": 7}
    code, _, err = run_cli(args(out, **changed), capsys)
    needle = "with changed learning_rate 0.001 -> 0.0005, seed 0 -> 7: that changes the computation"
    one_line_error(code, err, needle, "allow_config_change=true", "overwrite=true")
    assert snapshot(out) == before

    result = train(cfg(tmp_path, "run", **{**BASE, **changed, "allow_config_change": True}))
    assert result["losses"][-1]["lr"] == 5e-4  # the new rate is used, not the one the checkpoint restored
    recorded = {
        "step": 2,
        "changed": {
            "output_dir": [str(finished), str(out)],  # the folder was copied here: noted, not refused
            "max_steps": [2, 3],
            "learning_rate": [0.001, 0.0005],
            "seed": [0, 7],
        },
        "exact": False,
    }
    assert json.loads((out / "run.json").read_text())["config_changes"] == [recorded]
    assert json.loads((out / "final" / "slimsd.json").read_text())["config_changes"] == [recorded]


def test_max_steps_is_refused_when_the_lr_schedule_decays_over_it(tmp_path, capsys):
    out = tmp_path / "run"
    kw = {"lr_scheduler": "linear", "stop_at_step": 1}
    assert run_cli(args(out, max_steps=2, **kw), capsys)[0] == 0
    code, _, err = run_cli(args(out, max_steps=4, resume="latest", **kw), capsys)
    one_line_error(code, err, "changed max_steps 2 -> 4 (lr_scheduler=linear decays over max_steps)")


@pytest.mark.slow
def test_changes_that_keep_the_computation_pass_and_stay_bit_exact(tmp_path, capsys):
    """max_steps (constant LR), checkpointing and logging keys, and gradient_checkpointing (the same forward
    pass, recomputed) may change on a resume: the result equals an uninterrupted run bit for bit."""
    whole = train(cfg(tmp_path, "whole", **{**BASE, "max_steps": 3}))
    assert run_cli(args(tmp_path / "split", max_steps=2, checkpoint_every=2), capsys)[0] == 0
    safe = {"checkpoint_every": 1, "keep_last": 3, "log_every": 5, "gradient_checkpointing": "true"}
    code, text, _ = run_cli(args(tmp_path / "split", max_steps=3, resume="latest", **safe), capsys)
    assert code == 0
    for line in ("max_steps: 2 -> 3", "checkpoint_every: 2 -> 1", "gradient_checkpointing: false -> true"):
        assert f"config change since step 2: {line}" in text
    a, b = unet_weights(whole["final_dir"]), unet_weights(tmp_path / "split" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_checkpoint_of_another_architecture_names_both(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    code, _, err = run_cli(args(out, max_steps=3, resume="latest", student="bk-tiny"), capsys)
    one_line_error(code, err, 'changed student "bk-small" -> "bk-tiny"')
    code, _, err = run_cli(
        args(out, max_steps=3, resume="latest", student="bk-tiny", allow_config_change="true"), capsys
    )
    one_line_error(code, err, "is of another architecture", "it holds bk-small (", "student is bk-tiny (")
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert "block_out_channels" in state["architecture"]
    weights = load_file(str(out / "checkpoints" / "step-00000002" / "student.safetensors"))
    assert f"{sum(v.numel() for v in weights.values()):,} parameters" in state["architecture"]

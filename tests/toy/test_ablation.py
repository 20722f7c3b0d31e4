"""benchmarks/toy_ablation.py at a tiny size: the rows the issue asks for, counted independently, and a
rerun that resumes from the saved runs instead of training again."""

from __future__ import annotations

import json

import pytest

from helpers import benchmark_module


@pytest.mark.slow(seconds=30)
def test_ablation_rows_and_resume(tmp_path, monkeypatch):
    from slimsd.models.counting import summarize

    ablation = benchmark_module("toy_ablation")
    args = [
        *("--recipes", "bk-tiny", "--arms", "random-init-task", "teacher-init-task-out-feat"),
        *("--seeds", "0", "1", "--steps", "1", "--eval-seeds", "1", "--eval-prompts", "1"),
        *("--data-images", "16", "--work", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")),
    ]
    rows = ablation.main(args)
    written = json.loads((tmp_path / "out" / "toy_ablation.json").read_text())
    assert isinstance(written, list) and [r["arm"] for r in written] == [r["arm"] for r in rows]
    keys = {
        "recipe",
        "arm",
        "seeds",
        "caption_fidelity_mean",
        "caption_fidelity_std",
        "caption_fidelity_held_out_mean",
        "unet_params",
        "step_ms",
        "machine",
        "date",
        "command",
    }
    assert all(keys <= set(r) for r in written)
    students = {r["arm"]: r for r in written if r["recipe"] == "bk-tiny"}
    assert set(students) == {"random-init-task", "teacher-init-task-out-feat"}
    assert all(r["seeds"] == [0, 1] and r["steps"] == 1 for r in students.values())
    # parameters: the meta-device count of the toy teacher and of its bk-tiny student (no weights involved)
    teacher = next(r for r in written if r["arm"] == "teacher")
    assert teacher["unet_params"] == summarize("toy-sd")["unet_params"]
    assert all(r["unet_params"] < 0.5 * teacher["unet_params"] for r in students.values())
    # the random-init student really started from fresh weights: its init folder says so and inherits nothing
    info = json.loads((tmp_path / "work" / "init" / "bk-tiny-random-seed1" / "slimsd.json").read_text())
    assert info["init"] == "random" and info["weight_map"] == {}
    md = (tmp_path / "out" / "toy_ablation.md").read_text()
    assert (
        "python benchmarks/toy_ablation.py --recipes bk-tiny" in md and "| bk-tiny | random-init-task |" in md
    )
    assert (tmp_path / "out" / "toy_ablation.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun over the same work folder trains nothing and gives the same scores
    def no_training(*_args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "run_one", no_training)
    again = ablation.main(args)

    def score(rs):
        return [(r["arm"], r["caption_fidelity_mean"], r["caption_fidelity_held_out_mean"]) for r in rs]

    assert score(again) == score(rows)

    # results made under another protocol are not mixed in: a changed evaluation refuses the work folder
    with pytest.raises(SystemExit, match="another eval_prompts"):
        ablation.main(
            [a if a != "1" or i != args.index("--eval-prompts") + 1 else "2" for i, a in enumerate(args)]
        )
    # ... and so do other training settings; a work folder from before --learning-rate and --lr-scheduler
    # existed (no such keys in its fingerprint) was made with the demo's settings and still resumes
    with pytest.raises(SystemExit, match="another learning_rate"):
        ablation.main([*args, "--learning-rate", "1e-3"])
    with pytest.raises(SystemExit, match="another lr_scheduler"):
        ablation.main([*args, "--lr-scheduler", "cosine"])
    fingerprint = tmp_path / "work" / "fingerprint.json"
    saved = json.loads(fingerprint.read_text())
    assert (saved["learning_rate"], saved["lr_scheduler"]) == (5e-4, "constant_with_warmup")
    fingerprint.write_text(
        json.dumps({k: saved[k] for k in saved if k not in ("learning_rate", "lr_scheduler")})
    )
    assert score(ablation.main(args)) == score(rows)

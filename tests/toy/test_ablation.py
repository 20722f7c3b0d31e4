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
    # ... and so do other training settings; a work folder from before these options existed (no such keys in
    # its fingerprint) was made with the demo's settings and still resumes
    settings = {
        "learning_rate": ("--learning-rate", "1e-3", 5e-4),
        "lr_scheduler": ("--lr-scheduler", "cosine", "constant_with_warmup"),
        "lambda_feat": ("--lambda-feat", "0.1", 1.0),
        "feat_norm": ("--feat-norm", "teacher", "none"),
        "ema_decay": ("--ema-decay", "0.95", None),
    }
    for key, (option, value, _) in settings.items():
        with pytest.raises(SystemExit, match=f"another {key}"):
            ablation.main([*args, option, value])
    fingerprint = tmp_path / "work" / "fingerprint.json"
    saved = json.loads(fingerprint.read_text())
    assert {k: saved[k] for k in settings} == {k: default for k, (_, _, default) in settings.items()}
    fingerprint.write_text(json.dumps({k: saved[k] for k in saved if k not in settings}))
    assert score(ablation.main(args)) == score(rows)


def test_ablation_settings_reach_the_trainer(tmp_path, monkeypatch):
    """--lambda-feat scales the feature-KD arms' weight only; --feat-norm, --ema-decay and the learning rate go
    to every arm's DistillConfig as given."""
    import slimsd.train.distill as distill

    ablation = benchmark_module("toy_ablation")
    seen = {}

    def capture(cfg):
        seen[(cfg.lambda_out, cfg.lambda_feat)] = cfg
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(distill, "train", capture)
    base = [
        *("--recipes", "bk-tiny", "--seeds", "0", "--steps", "1", "--data-images", "8"),
        *("--work", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")),
        *("--lambda-feat", "0.25", "--feat-norm", "teacher", "--ema-decay", "0.9", "--learning-rate", "2e-4"),
    ]
    for arm in ("teacher-init-task", "teacher-init-task-out-feat"):
        with pytest.raises(KeyboardInterrupt):
            ablation.main([*base, "--arms", arm])
    task_only, kd = seen[(0.0, 0.0)], seen[(1.0, 0.25)]
    for cfg in (task_only, kd):
        assert (cfg.feat_norm, cfg.ema, cfg.ema_decay, cfg.learning_rate) == ("teacher", True, 0.9, 2e-4)

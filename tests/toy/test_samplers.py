"""benchmarks/toy_samplers.py: the demo's scoring under other samplers, on tuning or evaluation captions."""

from __future__ import annotations

import json

import pytest

from slimsd.toy.teacher import TOY_DIR

from helpers import benchmark_module


@pytest.mark.slow(seconds=20)
def test_eval_captions_reproduce_the_teachers_recorded_score_and_tuning_captions_differ(tmp_path):
    samplers = benchmark_module("toy_samplers")
    common = [
        "--models",
        "teacher=toy-sd",
        "--configs",
        "pndm:2",
        "--eval-seeds",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    (row,) = samplers.main([*common, "--captions", "eval", "--name", "eval"])
    # the teacher's first evaluation seed, as scripts/train_toy_teacher.py scored it into training.json
    recorded = json.loads((TOY_DIR / "training.json").read_text())["scores"]
    assert row["caption_fidelity"] == pytest.approx(recorded["caption_fidelity_per_seed"][0])
    assert row["caption_fidelity_held_out"] == pytest.approx(
        recorded["caption_fidelity_held_out_per_seed"][0]
    )
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["rows"] == [row] and "--captions eval" in written["command"]
    assert "| teacher | " in (tmp_path / "eval.md").read_text()

    from slimsd.toy.demo import CAPTION_SEEDS, TUNING_CAPTION_SEEDS, DemoConfig, eval_captions

    cfg = DemoConfig()
    for split in ("seen", "held_out"):
        tuning = {c for s in range(3) for c in eval_captions(cfg, s, split, TUNING_CAPTION_SEEDS)}
        evaluation = {c for s in range(3) for c in eval_captions(cfg, s, split, CAPTION_SEEDS)}
        assert tuning != evaluation


def test_a_bad_config_is_one_line():
    samplers = benchmark_module("toy_samplers")
    with pytest.raises(SystemExit, match="config 'heun:2'"):
        samplers.main(["--models", "t=toy-sd", "--configs", "heun:2"])
    with pytest.raises(SystemExit, match="config 'euler'"):
        samplers.main(["--models", "t=toy-sd", "--configs", "euler"])
    with pytest.raises(SystemExit, match="config 'euler:x'"):
        samplers.main(["--models", "t=toy-sd", "--configs", "euler:x"])
    assert samplers.parse_model("toy-sd") == ("toy-sd", "toy-sd")
    assert samplers.parse_model("kd=runs/a=b/final") == ("kd", "runs/a=b/final")

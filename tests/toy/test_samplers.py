"""benchmarks/toy_samplers.py: the demo's scoring under other samplers, on tuning or evaluation captions."""

from __future__ import annotations

import json

import pytest

from slimsd.toy.teacher import TOY_DIR

from helpers import benchmark_module


@pytest.mark.slow(seconds=20)
def test_eval_captions_reproduce_the_teachers_recorded_score(tmp_path):
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


def test_tuning_captions_share_no_text_and_no_held_out_combination_with_any_evaluation():
    """The tuning captions used to differ as a list only: 15 of the 57 seen and 18 of the 34 held-out evaluation
    captions were tuning captions too. The evaluation set is rebuilt here from the shapes world's own caption
    draws (make_captions on the demo's seed streams), not from demo.py's helper."""
    from slimsd.toy.demo import CAPTION_SEEDS, DemoConfig, tuning_captions
    from slimsd.toy.shapes import HELD_OUT, make_captions, parse_caption

    evaluation = {
        c
        for split, stream in CAPTION_SEEDS.items()
        for s in range(3)  # the demo's, toy_ablation's and toy_staged's evaluation seeds
        for c in make_captions(24, seed=stream + s, split=split)
    }
    assert len(evaluation) > 80  # both splits are in it (seen ~57, held-out ~34 distinct)
    for cfg in (DemoConfig(), DemoConfig(eval_seeds=(0, 1), eval_prompts=24)):  # toy_samplers' default
        tuning = [c for s in cfg.eval_seeds for c in tuning_captions(cfg, s, "seen")]
        assert len(tuning) == len(cfg.eval_seeds) * cfg.eval_prompts
        assert not set(tuning) & evaluation
        combos = {(parse_caption(c).colour, parse_caption(c).shape) for c in tuning}
        assert not combos & HELD_OUT
        assert all(tuning_captions(cfg, s, "held_out") == [] for s in cfg.eval_seeds)


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

"""Loss terms and feature taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimsd.errors import SlimsdError
from slimsd.models.architecture import load_recipe, plan
from slimsd.train.losses import (
    attach_taps,
    default_taps,
    distill_loss,
    feature_term,
    parse_taps,
    tapped,
    task_target,
)


def _cfgs(micro_sd, recipe):
    from slimsd.models.compress import compress_pipeline

    t_cfg = {k: v for k, v in dict(micro_sd.unet.config).items() if not k.startswith("_")}
    student = compress_pipeline(micro_sd, recipe).pipeline.unet
    return student, dict(student.config), t_cfg


def test_default_taps_follow_bk_sdm(micro_sd):
    _, s_small, t_cfg = _cfgs(micro_sd, "bk-small")
    taps = default_taps(s_small, t_cfg, plan(t_cfg, load_recipe("bk-small"))[1])
    assert taps == [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)] + [
        (f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)
    ]
    _, s_base, _ = _cfgs(micro_sd, "bk-base")
    assert ("mid_block", "mid_block") in default_taps(s_base, t_cfg, plan(t_cfg, load_recipe("bk-base"))[1])
    # BK-SDM-Tiny: the innermost stage is gone, the student's up blocks map to the teacher's shifted ones
    _, s_tiny, _ = _cfgs(micro_sd, "bk-tiny")
    tiny = default_taps(s_tiny, t_cfg, plan(t_cfg, load_recipe("bk-tiny"))[1])
    # and the last student down stage has no downsampler: its last layer meets the teacher stage's last layer
    assert tiny == [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.0", "down_blocks.2.attentions.1"),
    ] + [(f"up_blocks.{i}", f"up_blocks.{i + 1}") for i in range(3)]


def test_recipe_feature_taps(micro_sd):
    _, s_cfg, t_cfg = _cfgs(micro_sd, "bk-small")
    recipe = load_recipe("bk-small")
    assert parse_taps(recipe.extra["feature_taps"]) == default_taps(s_cfg, t_cfg, plan(t_cfg, recipe)[1])
    # BK-SDM-Tiny's published mapping: the attention projections at the stage that loses its downsampler
    tiny = parse_taps(load_recipe("bk-tiny").extra["feature_taps"])
    assert ("down_blocks.2.attentions.0.proj_out", "down_blocks.2.attentions.1.proj_out") in tiny
    assert ("up_blocks.0", "up_blocks.1") in tiny and len(tiny) == 6


def test_tapped_shapes_match_between_student_and_teacher(micro_sd):
    student, s_cfg, t_cfg = _cfgs(micro_sd, "bk-tiny")
    recipe = load_recipe("bk-tiny")
    for taps in (
        default_taps(s_cfg, t_cfg, plan(t_cfg, recipe)[1]),
        parse_taps(recipe.extra["feature_taps"]),
    ):
        x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
        with (
            torch.no_grad(),
            tapped(student, [s for s, _ in taps]) as st,
            tapped(micro_sd.unet, [t for _, t in taps]) as tt,
        ):
            student(x, t, c)
            micro_sd.unet(x, t, c)
        for s, te in taps:
            assert st.features[s].shape == tt.features[te].shape, (s, te)
    assert not student._forward_hooks and not student.up_blocks[0]._forward_hooks  # removed on exit


def test_taps_fire_through_wrappers_and_compile(micro_sd):
    """Hooks hang on module objects, not names: a DDP-like wrapper (names gain 'module.') and torch.compile
    do not lose them (BK-SDM#10)."""
    student, _, _ = _cfgs(micro_sd, "bk-small")

    class Wrapper(torch.nn.Module):  # what DDP/FSDP do to names: everything moves under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            return self.module(*a, **k)

    taps = attach_taps(student, ["up_blocks.3", "down_blocks.0"])
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        Wrapper(student)(x, t, c)
    assert set(taps.features) == {"up_blocks.3", "down_blocks.0"}
    taps.remove()
    # torch.compile (dynamo) keeps forward hooks on submodules; a small model keeps this test fast
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    taps = attach_taps(net, ["1"])
    y = torch.randn(3, 4)
    torch.compile(Wrapper(net), backend="eager")(y)
    torch.testing.assert_close(taps.features["1"], torch.relu(net[0](y)))


def test_unknown_tap_is_one_line_error(micro_sd):
    with pytest.raises(SlimsdError, match=r"up_blocks\.9"):
        attach_taps(micro_sd.unet, ["up_blocks.9"])
    with pytest.raises(SlimsdError, match="feature_taps"):
        parse_taps("up_blocks.0")


def test_distill_loss_terms_and_weights():
    g = torch.Generator().manual_seed(0)
    s, tgt, t = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    fs = {"a": torch.randn(2, 8, 4, 4, generator=g), "b": torch.randn(2, 16, 2, 2, generator=g) * 10}
    ft = {"A": torch.randn(2, 8, 4, 4, generator=g), "B": torch.randn(2, 16, 2, 2, generator=g)}
    taps = [("a", "A"), ("b", "B")]
    terms = distill_loss(s, tgt, t, fs, ft, taps, lambda_task=0.5, lambda_out=2.0, lambda_feat=3.0)
    task, out = ((s - tgt) ** 2).mean(), ((s - t) ** 2).mean()
    feat = ((fs["a"] - ft["A"]) ** 2).mean() + ((fs["b"] - ft["B"]) ** 2).mean()
    torch.testing.assert_close(terms["task"], task)
    torch.testing.assert_close(terms["out"], out)
    torch.testing.assert_close(terms["feat"], feat)
    torch.testing.assert_close(terms["loss"], 0.5 * task + 2 * out + 3 * feat)
    # normalised: each tap divided by the teacher feature's mean square, so the x10 tap no longer dominates
    norm = distill_loss(s, tgt, t, fs, ft, taps, feat_norm="teacher")
    expect = sum(((fs[a] - ft[b]) ** 2).mean() / (ft[b] ** 2).mean() for a, b in taps)
    torch.testing.assert_close(norm["feat"], expect)
    # task-only: no teacher at all
    only = distill_loss(s, tgt, None, {}, {}, taps, lambda_out=0, lambda_feat=0)
    torch.testing.assert_close(only["loss"], task)


def test_feature_term_rejects_mismatched_shapes():
    with pytest.raises(SlimsdError, match="shapes differ"):
        feature_term(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_task_target_follows_prediction_type():
    from diffusers import DDPMScheduler

    x, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert task_target(eps, x, n, t) is n
    v = DDPMScheduler(prediction_type="v_prediction")
    a = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(task_target(v, x, n, t), a * n - s * x)
    assert F.mse_loss(task_target(v, x, n, t), n) > 0

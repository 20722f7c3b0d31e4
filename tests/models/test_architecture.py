"""Recipes -> student configs and weight maps, on the micro models and the full-size configs (meta device)."""

import pytest
import torch

from slimsd.errors import SlimsdError
from slimsd.models.architecture import build_student, identity_recipe, load_recipe, plan, student_config
from slimsd.models.counting import build_unet_meta, unet_dummy_inputs
from slimsd.models.presets import PRESETS


def _per_layer_transformers(cfg: dict) -> list:
    """Transformer depth per layer of every cross-attention stage, down then up (a normal form)."""
    n = len(cfg["down_block_types"])
    lpb = cfg["layers_per_block"]
    lpb = lpb if isinstance(lpb, list) else [lpb] * n
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = tl if isinstance(tl, list) else [tl] * n
    out = [
        ("down", i, tl[i] if isinstance(tl[i], list) else [tl[i]] * lpb[i])
        for i, t in enumerate(cfg["down_block_types"])
        if t.startswith("CrossAttn")
    ]
    rev = cfg.get("reverse_transformer_layers_per_block") or list(reversed(tl))
    out += [
        ("up", j, rev[j] if isinstance(rev[j], list) else [rev[j]] * (lpb[n - 1 - j] + 1))
        for j, t in enumerate(cfg["up_block_types"])
        if t.startswith("CrossAttn")
    ]
    return out


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.kind == "student"])
def test_recipes_rebuild_the_released_architectures(name):
    p = PRESETS[name]
    cfg = student_config(PRESETS[p.teacher].unet, load_recipe(p.recipe))
    for key in (
        "layers_per_block",
        "mid_block_type",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "attention_head_dim",
    ):
        if key in p.released:
            assert cfg[key] == p.released[key], key
    if "transformer_layers_per_block" in p.released:
        assert _per_layer_transformers(cfg) == _per_layer_transformers({**cfg, **p.released})


@pytest.mark.parametrize(
    ("teacher", "recipes"),
    [("micro_sd", ["bk-base", "bk-small", "bk-tiny"]), ("micro_sdxl", ["ssd-1b", "vega"])],
)
def test_every_student_tensor_equals_its_mapped_teacher_tensor(teacher, recipes, request):
    unet = request.getfixturevalue(teacher).unet
    teacher_sd = unet.state_dict()
    for recipe in recipes:
        student, mapping, _ = build_student(unet, recipe)
        student_sd = student.state_dict()
        assert set(mapping) == set(student_sd)
        for s, t in mapping.items():
            assert torch.equal(student_sd[s], teacher_sd[t]), (recipe, s, t)
        assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in unet.parameters())


def test_bk_rule_down_keeps_first_pair_up_keeps_pairs_0_and_2(micro_sd):
    _, mapping, _ = build_student(micro_sd.unet, "bk-tiny")
    assert mapping["down_blocks.0.resnets.0.conv1.weight"] == "down_blocks.0.resnets.0.conv1.weight"
    assert mapping["down_blocks.2.attentions.0.proj_in.weight"] == "down_blocks.2.attentions.0.proj_in.weight"
    # tiny drops the innermost stage: student up stage 0 is the teacher's up stage 1, pairs 0 and 2
    assert mapping["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    assert mapping["up_blocks.0.upsamplers.0.conv.weight"] == "up_blocks.1.upsamplers.0.conv.weight"
    assert not any(k.startswith("mid_block") for k in mapping)


def test_sdxl_transformer_layers_come_from_the_teacher_in_order_unless_named(micro_sdxl):
    _, mapping, _ = build_student(micro_sdxl.unet, "ssd-1b")
    key = "down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_q.weight"
    assert mapping[key] == key  # 4 of 10 kept: the first four
    recipe = load_recipe("ssd-1b").to_dict()
    recipe["down"][2]["transformer_sources"] = [[0, 1, 2, 9], [0, 1, 2, 3]]
    _, mapping, _ = build_student(micro_sdxl.unet, recipe)
    assert mapping[key] == key  # layer 1 still takes 0..3
    first = "down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q.weight"
    assert mapping[first] == "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q.weight"
    assert mapping["mid_block.resnets.0.conv1.weight"] == "mid_block.resnets.0.conv1.weight"


@pytest.mark.parametrize("teacher", ["micro_sd", "micro_sdxl"])
def test_identity_recipe_reproduces_the_teacher_exactly(teacher, request):
    unet = request.getfixturevalue(teacher).unet
    student, _, _ = build_student(unet, "identity")
    assert {k: v for k, v in student.config.items() if not k.startswith("_")} == {
        k: v for k, v in unet.config.items() if not k.startswith("_")
    }
    torch.manual_seed(0)
    inputs = unet_dummy_inputs(unet, 64, batch=2, device="cpu")
    inputs["sample"] = torch.randn_like(inputs["sample"])
    inputs["encoder_hidden_states"] = torch.randn_like(inputs["encoder_hidden_states"])
    with torch.no_grad():
        assert torch.equal(student(**inputs).sample, unet(**inputs).sample)


def _recipe(**changes):
    base = load_recipe("bk-small").to_dict()
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (_recipe(down=[{"keep": [0]}] * 3), "3 down / 4 up stages, the teacher has 4"),
        (_recipe(down=[{"keep": [0]}, {"keep": [0]}, {"keep": [0]}, {"keep": [5]}]), "teacher has 2 layers"),
        (_recipe(up=[{"keep": [0]}] * 4), "one more than its down stage"),
        (_recipe(down=["drop", {"keep": [0]}, {"keep": [0]}, {"keep": [0]}]), "innermost"),
        (_recipe(mid="half"), "mid must be one of"),
        (_recipe(down=[{"keep": [1, 0]}] * 4), "increasing"),
    ],
)
def test_bad_recipes_are_clear_errors(recipe, message):
    with pytest.raises(SlimsdError, match=message):
        plan(PRESETS["sd-v1.4"].unet, load_recipe(recipe))


def test_shape_mismatch_is_a_clear_error():
    # keeping up pairs 0 and 1 would feed layer 1 the wrong skip connection: channels differ from the teacher's
    recipe = _recipe(up=[{"keep": [0, 1]}] * 4)
    with pytest.raises(SlimsdError, match="cannot be copied"):
        build_student(build_unet_meta(PRESETS["sd-v1.4"].unet), recipe)


def test_sdxl_recipe_does_not_fit_an_sd_teacher():
    with pytest.raises(SlimsdError, match="for sdxl teachers"):
        plan(PRESETS["sd-v1.4"].unet, load_recipe("ssd-1b"))


def test_identity_recipe_is_data_too():
    r = identity_recipe(PRESETS["sdxl-base-1.0"].unet)
    assert student_config(PRESETS["sdxl-base-1.0"].unet, r)["transformer_layers_per_block"] == [1, 2, 10]

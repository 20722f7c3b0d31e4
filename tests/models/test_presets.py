import json

from slimsd.models.presets import PRESETS, RECIPES

from helpers import run_cli

CONTRACT_NAMES = {
    "teacher": ["sd-v1.4", "sd-v1.5", "sd-v2.1-base", "sdxl-base-1.0"],
    "student": [
        "bk-sdm-base",
        "bk-sdm-small",
        "bk-sdm-tiny",
        "bk-sdm-v2-base",
        "bk-sdm-v2-small",
        "bk-sdm-v2-tiny",
        "segmind-small-sd",
        "segmind-tiny-sd",
        "ssd-1b",
        "segmind-vega",
    ],
    "micro": ["micro-sd", "micro-sdxl"],
}


def test_contract_names_and_kinds():
    for kind, names in CONTRACT_NAMES.items():
        for name in names:
            assert PRESETS[name].kind == kind, name
    assert set(RECIPES) >= {"bk-base", "bk-small", "bk-tiny", "ssd-1b", "vega"}


def test_students_name_a_teacher_and_recipe_of_the_same_family():
    for p in PRESETS.values():
        if p.kind == "student":
            teacher = PRESETS[p.teacher]
            assert teacher.kind == "teacher"
            assert RECIPES[p.recipe] == teacher.family == p.family, p.name
            assert p.hub_id and "/" in p.hub_id


def test_presets_cli_json_lists_names_kinds_and_hub_ids(capsys):
    code, out, _ = run_cli(["presets", "--json"], capsys)
    assert code == 0
    rows = {(r["name"], r["kind"]): r for r in json.loads(out)}  # "ssd-1b" is a student and a recipe
    assert rows["sd-v1.4", "teacher"]["hub_id"] == "CompVis/stable-diffusion-v1-4"
    assert rows["ssd-1b", "student"]["hub_id"] == "segmind/SSD-1B"
    assert ("ssd-1b", "recipe") in rows and ("bk-small", "recipe") in rows
    for kind, names in CONTRACT_NAMES.items():
        assert all((n, kind) in rows for n in names)

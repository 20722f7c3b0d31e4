"""Reports: the terminal and HTML tables of one column list, and `slimsd eval`'s report."""

from __future__ import annotations

import pytest
from PIL import Image

from slimsd.measure import report
from slimsd.measure.prompts import Prompt

from helpers import html_tables


def test_report_table_holds_the_computed_scores(tmp_path):
    for slug in ("a", "b"):
        (tmp_path / "images" / slug).mkdir(parents=True)
        Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "images" / slug / "p0.png")
    rows = [
        {
            "model": "teacher <x>",
            "images": "images/a",
            "fid": 12.34567,
            "inception_score": 3.5,
            "inception_score_std": 0.25,
            "clip_score": 31.0,
            "num_images": 10,
        },
        {
            "model": "student",
            "images": "images/b",
            "fid": None,
            "inception_score": 2.0,
            "inception_score_std": 0.1,
            "clip_score": None,
            "num_images": 10,
        },
    ]
    result = {
        "protocol": "bk-sdm-coco30k",
        "models": rows,
        "settings": {"seed": 7, "steps": 25},
        "environment": {"device": "cpu"},
    }
    text = report.render_report(result, tmp_path, [Prompt(0, "p0", "a <b>bold</b> cat")])
    parsed = html_tables(text)
    table = parsed.tables["scores"]
    assert [r["model"] for r in table] == ["teacher <x>", "student"]  # escaped in HTML, intact when parsed
    for row, cells in zip(rows, table, strict=True):
        for column in report.METRICS:
            expected = row[column.key]
            if expected is None:
                assert cells[column.key] == "–"
            else:
                assert float(cells[column.key]) == pytest.approx(expected, abs=5e-4)
    assert len(parsed.images) == 2  # one prompt x two models, side by side
    assert all(src.startswith("data:image/jpeg;base64,") for src in parsed.images)  # self-contained
    assert "<b>bold</b>" not in text

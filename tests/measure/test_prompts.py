"""The prompt file of an evaluation: columns, ids, encodings and errors."""

from __future__ import annotations

import pytest

from slimsd.errors import SlimsdError
from slimsd.measure.prompts import read_prompts


def test_read_prompts_columns_ids_and_errors(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('file_name,text\nCOCO_1.jpg,"a cat, sitting"\n../evil/x y.jpg,a dog\n')
    prompts = read_prompts(f)
    assert [(p.index, p.id, p.caption) for p in prompts] == [
        (0, "COCO_1", "a cat, sitting"),
        (1, "x_y", "a dog"),
    ]
    f.write_text("caption\nA\nB\nC\n")
    assert [p.id for p in read_prompts(f, limit=2)] == ["000000", "000001"]
    f.write_text("foo\nA\n")
    with pytest.raises(SlimsdError, match="caption column"):
        read_prompts(f)
    f.write_text("id,caption\na,x\na,y\n")
    with pytest.raises(SlimsdError, match="twice"):
        read_prompts(f)


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_bytes("caption,id\na cat,x\n".encode("utf-8-sig"))
    assert [(p.id, p.caption) for p in read_prompts(f)] == [("x", "a cat")]

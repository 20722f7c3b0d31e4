"""`slimsd data`: rows found, each rule's removals, unreadable rows, caption and image-size distributions, column
ranges and the captioned grid, on a small image folder with known metadata (every number worked out by hand)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from helpers import run_cli

CORRUPT = b"\x89PNG\r\n\x1a\nthis is not a png"
# key, colour (None: corrupt bytes), image size, aesthetic, language, caption (None: no caption)
ROWS = [
    ("a", "red", (40, 30), 8.0, "en", "a red square"),  # 12 characters, 3 words
    ("b", "blue", (30, 30), 7.0, "en", "a blue square in the sky"),  # 24, 6
    ("c", "green", (20, 50), 9.0, "de", "ein gruenes quadrat"),  # 19, 3
    ("d", None, (0, 0), 8.5, "en", "a broken image"),  # 14, 3; its image cannot be read
    ("e", "black", (60, 40), 6.0, "fr", "un carre noir"),  # removed by the aesthetic rule
    ("f", "white", (50, 50), 9.5, "en", None),  # no caption: dropped when the data is indexed
]
RULES = ["aesthetic >= 7", "language in (en, de)"]
RGB = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 128, 0)}


def make(root) -> str:
    lines = []
    for key, colour, size, aesthetic, language, caption in ROWS:
        if colour is None:
            data = CORRUPT
        else:
            buf = io.BytesIO()
            Image.new("RGB", size, colour).save(buf, format="PNG")
            data = buf.getvalue()
        (root / f"{key}.png").write_bytes(data)
        line = {"file_name": f"{key}.png", "aesthetic": aesthetic, "language": language}
        lines.append(line | ({"text": caption} if caption else {}))
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(root)


def spread(lo, p5, median, p95, hi, mean, count) -> dict:
    return {"count": count, "min": lo, "p5": p5, "median": median, "p95": p95, "max": hi, "mean": mean}


def test_the_summary_of_a_full_pass(tmp_path, capsys):
    data = make(tmp_path)
    grid = tmp_path / "grid.png"
    args = ["data", data, "--full", "--grid", str(grid), *[x for r in RULES for x in ("--filter", r)]]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert (s["kind"], s["found"], s["rows"], s["dropped"]) == ("imagefolder", 6, 4, {"missing_caption": 1})
    assert s["filter"] == [
        {"rule": "aesthetic >= 7", "removed": 1, "no_value": 0, "left": 4},
        {"rule": "language in (en, de)", "removed": 0, "no_value": 0, "left": 4},
    ]
    assert s["read"] == {"mode": "full", "rows": 4, "readable": 3, "unreadable": {"unreadable_image": 1}}
    # kept captions a, b, c, d: 12, 24, 19, 14 characters (sorted 12 14 19 24; nearest rank: p5 at place 0,
    # the median at round(1.5) = 2, p95 at round(2.85) = 3) and 3, 6, 3, 3 words
    assert s["captions"]["characters"] == spread(12, 12, 19, 24, 24, 17.25, 4)
    assert s["captions"]["words"] == spread(3, 3, 3, 6, 6, 3.75, 4)
    # the readable kept images a, b, c: 40x30, 30x30, 20x50
    assert s["image_sizes"]["width"] == spread(20, 20, 30, 40, 40, 30.0, 3)
    assert s["image_sizes"]["height"] == spread(30, 30, 30, 50, 50, 110 / 3, 3)
    assert s["image_sizes"]["short_side"] == spread(20, 20, 30, 30, 30, 80 / 3, 3)
    # columns over the rows found and indexed (a to e), before the filter
    assert s["columns"]["aesthetic"] == {
        "values": 5,
        "missing": 0,
        "kind": "number",
        "min": 6.0,
        "median": 8.0,
        "max": 9.0,
    }
    assert s["columns"]["language"] == {
        "values": 5,
        "missing": 0,
        "kind": "text",
        "distinct": 3,
        "top": [["en", 3], ["de", 1], ["fr", 1]],
    }
    # the grid: the three readable kept images in order, each over its caption
    assert s["grid"] == {"path": str(grid), "images": 3}
    with Image.open(grid) as g:
        assert g.size == (3 * 160, 160 + 3 * 12 + 6)
        for i, colour in enumerate(["red", "blue", "green"]):
            assert g.getpixel((i * 160 + 80, 80)) == RGB[colour]
            caption_area = g.crop((i * 160, 162, (i + 1) * 160, g.height)).convert("L")
            assert caption_area.getextrema()[1] > 128  # white text drawn under the image

    code, out, _ = run_cli(args, capsys)
    assert code == 0
    for line in [
        f"data {data!r} (imagefolder): 6 rows found",
        "dropped at indexing: missing_caption 1",
        "filter 'aesthetic >= 7': removed 1, 4 left",
        "filter 'language in (en, de)': removed 0, 4 left",
        "kept: 4 rows",
        "read all 4 kept rows: 3 readable, 1 unreadable (unreadable_image 1)",
        "caption characters: min 12  p5 12  median 19  p95 24  max 24  mean 17.2",
        "image short side: min 20  p5 20  median 30  p95 30  max 30  mean 26.7",
        "column aesthetic: number, 5 values: 6 to 9, median 8",
        "column language: text, 5 values: 3 distinct; 'en' 3, 'de' 1, 'fr' 1",
        f"grid: wrote {grid} (3 images)",
    ]:
        assert line in out.splitlines(), (line, out)


def test_a_sample_reads_only_its_rows_and_a_config_gives_data_and_rules(tmp_path, capsys):
    data = make(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {data}\ndata_filter:\n  - aesthetic >= 7\n")
    code, out, err = run_cli(
        ["data", "--config", str(config), "--filter", "language == de", "--sample", "1"], capsys
    )
    assert code == 0, err
    # aesthetic keeps a, b, c, d; language == de then keeps c alone, which reads
    assert "filter 'language == de': removed 3, 1 left" in out
    assert "read a sample of 1 kept rows: 1 readable, 0 unreadable" in out.splitlines()
    code, out, _ = run_cli(["data", data, "--sample", "2", "--json"], capsys)
    s = json.loads(out)
    assert s["rows"] == 5 and s["read"]["rows"] == 2 and s["filter"] == []
    assert s["read"]["readable"] + sum(s["read"]["unreadable"].values()) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "no data: give DATA"),
        (["--filter", "nsfw < 1"], "has no column 'nsfw'; it has: aesthetic, caption, language, text"),
        (["--filter", "aesthetic >> 1"], "unknown operator '>>'"),
    ],
)
def test_bad_input_is_one_line(args, needle, tmp_path, capsys):
    data = [make(tmp_path)] if args else []
    code, out, err = run_cli(["data", *data, *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_column_stats_keep_whole_numbers_and_cap_the_distinct_texts(monkeypatch):
    from slimsd.train.survey import ColumnStats

    monkeypatch.setattr(ColumnStats, "MAX_DISTINCT", 2)
    stats = ColumnStats()
    for fields in [
        {"width": 640, "url": "u1", "nsfw": False, "x": 1},
        {"width": 512, "url": "u2", "nsfw": True, "x": "one"},
        {"width": 1024, "url": "u3", "nsfw": False},
        {"width": None, "url": "u1"},
    ]:
        stats(fields)
    ranges = stats.ranges()
    assert ranges["width"] == {
        "values": 3,
        "missing": 1,
        "kind": "number",
        "min": 512,
        "median": 640,
        "max": 1024,
    }
    assert isinstance(ranges["width"]["min"], int)
    # u3 came after two distinct values were kept: a value, but not one of the kept ones
    assert ranges["url"] == {
        "values": 4,
        "missing": 0,
        "kind": "text",
        "distinct": "more than 2",
        "top": [["u1", 2], ["u2", 1]],
    }
    assert ranges["nsfw"] == {"values": 3, "missing": 1, "kind": "bool", "true": 1, "false": 2}
    assert ranges["x"] == {"values": 2, "missing": 2, "kind": "mixed"}


def test_slimsd_data_imports_no_torch(tmp_path):
    """A sample is read in a few seconds: the command never imports torch (about 1.5 s of CPU to import)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom slimsd.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    args = ["data", make(tmp_path), "--filter", "aesthetic > 7", "--grid", str(tmp_path / "g.png")]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr
    assert "kept: 3 rows" in r.stdout and (tmp_path / "g.png").is_file()

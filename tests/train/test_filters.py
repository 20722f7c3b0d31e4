"""data_filter: rules on the rows' metadata select the exact rows, on parquet columns, webdataset .json sidecars
and metadata.jsonl fields; each rule's removals are counted; a bad rule is one line (exit 2) before any work."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.train.data import open_source
from slimsd.train.filters import FilterError, bind, parse_rule, parse_rules, select

from helpers import cfg, run_cli

CONFIGS = Path(__file__).parents[2] / "configs"

# key, colour of the stored image, (width, height) in the metadata (the original size, as LAION records it; the
# stored image is small), aesthetic, punsafe, language, caption. r3 has no aesthetic score.
ROWS = [
    ("r0", "red", (640, 480), 7.6, 0.02, "en", "a red square"),
    ("r1", "blue", (512, 512), 7.5, 0.20, "en", "a blue square in the sky"),
    ("r2", "green", (480, 640), 8.2, 0.01, "de", "ein gruenes quadrat"),
    ("r3", "white", (800, 800), None, 0.05, "en", "a white square"),
    ("r4", "black", (1024, 683), 9.0, 0.00, "en", "a black square on a black background at night"),
    ("r5", "yellow", (512, 576), 6.9, 0.03, "fr", "un carre jaune"),
]
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 128, 0), "white": (255, 255, 255)}
COLOURS |= {"black": (0, 0, 0), "yellow": (255, 255, 0)}
SEED_FILTER = ["aesthetic >= 7.5", "min(width, height) >= 512", "punsafe < 0.1", "language == en"]
CAPTION_FILTER = ["5 <= len(caption) <= 20", "language in (en, de)"]


def png(colour: str, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def meta(row, language_key="language") -> dict:
    _, _, (w, h), aesthetic, punsafe, language, _ = row
    return {"width": w, "height": h, "aesthetic": aesthetic, "punsafe": punsafe, language_key: language}


def make_parquet(root: Path, rows=ROWS) -> str:
    """LAION-style columns; LANGUAGE in capitals as LAION's metadata writes it. Row groups of 2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image": [{"bytes": png(r[1]), "path": None} for r in rows], "text": [r[6] for r in rows]}
    for k in ("width", "height", "aesthetic", "punsafe", "LANGUAGE"):
        columns[k] = [meta(r, "LANGUAGE")[k] for r in rows]
    path = root / "laion.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return str(path)


def make_webdataset(root: Path, rows=ROWS) -> str:
    """img2dataset's layout: KEY.png, KEY.txt (caption) and KEY.json (metadata); r5's caption is in its .json."""
    path = root / "shard-00000.tar"
    with tarfile.open(path, "w") as tar:

        def add(name, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for row in rows:
            key, colour, caption = row[0], row[1], row[6]
            add(f"{key}.png", png(colour))
            if key == "r5":
                add(f"{key}.json", json.dumps(meta(row) | {"caption": caption}).encode())
            else:
                add(f"{key}.txt", caption.encode())
                add(f"{key}.json", json.dumps(meta(row)).encode())
    return str(path)


def make_imagefolder(root: Path, rows=ROWS) -> str:
    lines = []
    for row in rows:
        (root / f"{row[0]}.png").write_bytes(png(row[1]))
        lines.append({"file_name": f"{row[0]}.png", "text": row[6]} | meta(row))
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(root)


FORMATS = [make_parquet, make_webdataset, make_imagefolder]


def kept(source) -> list[tuple[tuple, str]]:
    """(colour of the image read, caption) of every row the source kept, in order: metadata and image must
    belong to the same row."""
    out = []
    for row in source.rows:
        image, caption = source.read(row)
        out.append((image.getpixel((0, 0)), caption))
    return out


def expect(*keys) -> list[tuple[tuple, str]]:
    by_key = {r[0]: r for r in ROWS}
    return [(COLOURS[by_key[k][1]], by_key[k][6]) for k in keys]


@pytest.mark.parametrize("make", FORMATS)
def test_the_seed_rules_keep_the_exact_rows_and_count_each_rules_removals(tmp_path, make):
    source = open_source(make(tmp_path), data_filter=SEED_FILTER)
    assert kept(source) == expect("r4")
    # in order: aesthetic removes r3 (no score) and r5; the size rule r0 and r2; punsafe r1; language none
    assert [(f["rule"], f["removed"], f["no_value"], f["left"]) for f in source.filtered] == [
        ("aesthetic >= 7.5", 2, 1, 4),
        ("min(width, height) >= 512", 2, 0, 2),
        ("punsafe < 0.1", 1, 0, 1),
        ("language == en", 0, 0, 1),
    ]
    assert source.skipped == {
        "filter: aesthetic >= 7.5": 2,
        "filter: min(width, height) >= 512": 2,
        "filter: punsafe < 0.1": 1,
        "filter: language == en": 0,
    }


@pytest.mark.parametrize("make", FORMATS)
def test_caption_length_bounds_and_a_list_of_languages(tmp_path, make):
    source = open_source(make(tmp_path), data_filter=CAPTION_FILTER)
    # caption lengths 12, 24, 19, 14, 45, 14: r1 and r4 are out of 5..20; r5 is French
    assert kept(source) == expect("r0", "r2", "r3")
    assert [f["removed"] for f in source.filtered] == [2, 1]


@pytest.mark.parametrize("make", FORMATS)
def test_no_filter_keeps_every_row_in_order(tmp_path, make):
    source = open_source(make(tmp_path))
    assert kept(source) == expect("r0", "r1", "r2", "r3", "r4", "r5")
    assert source.skipped == {} and source.meta is None  # nothing indexed that no rule reads


def test_the_kept_rows_are_the_ones_pandas_keeps(tmp_path):
    """Another implementation: the same rules written as a pandas query, on 400 LAION-like rows with missing
    values; the kept rows must be the same rows."""
    import random

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    n = 400
    table = {
        "image": [{"bytes": b"never read", "path": None}] * n,
        "TEXT": [" ".join(["w"] * rng.randint(1, 12)) for _ in range(n)],
        "aesthetic": [None if rng.random() < 0.1 else round(rng.uniform(5, 9), 2) for _ in range(n)],
        "WIDTH": [rng.choice([256, 511, 512, 768]) for _ in range(n)],
        "HEIGHT": [rng.choice([256, 512, 513, 1024]) for _ in range(n)],
        "punsafe": [round(rng.random(), 3) for _ in range(n)],
        "LANGUAGE": [rng.choice(["en", "de", "fr", None]) for _ in range(n)],
        "id": list(range(n)),
    }
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table(table), path, row_group_size=64)
    rules = ["aesthetic >= 6.5", "min(width, height) >= 512", "punsafe < 0.3", "language in (en, de)"]
    rules += ["words(caption) <= 8"]
    source = open_source(str(path), data_filter=rules)
    ours = [table["id"][r[2] + 64 * r[1]] for r in source.rows]  # (path, row group, row, ...) -> id

    df = pd.read_parquet(path, columns=["TEXT", "aesthetic", "WIDTH", "HEIGHT", "punsafe", "LANGUAGE", "id"])
    theirs = df[
        (df.aesthetic >= 6.5)
        & (df[["WIDTH", "HEIGHT"]].min(axis=1) >= 512)
        & (df.punsafe < 0.3)
        & df.LANGUAGE.isin(["en", "de"])
        & (df.TEXT.str.split().str.len() <= 8)
    ]
    assert ours == theirs.id.tolist() and 0 < len(ours) < n


def test_a_rule_on_a_column_the_data_lacks_names_it_and_the_columns(tmp_path):
    spec = make_parquet(tmp_path)
    with pytest.raises(FilterError) as e:
        open_source(spec, data_filter=["aesthetic >= 7.5", "pwatermark < 0.5"])
    assert str(e.value) == (
        f"filter rule 'pwatermark < 0.5': data {spec!r} has no column 'pwatermark'; it has: LANGUAGE, "
        "aesthetic, caption, height, punsafe, text, width"
    )
    # the .txt-sidecar format carries no metadata but the caption
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "a.png").write_bytes(png("red"))
    (tmp_path / "side" / "a.txt").write_text("a red square")
    with pytest.raises(FilterError, match=r"has no column 'width'; it has: caption$"):
        open_source(str(tmp_path / "side"), data_filter="width >= 512")
    assert len(open_source(str(tmp_path / "side"), data_filter="len(caption) > 3")) == 1


BAD_RULES = [
    ("aesthetic => 7.5", "unknown operator '=>'; allowed: ==, !=, <, <=, >, >=, in, not in"),
    ("aesthetic = 7.5", "unknown operator '='; allowed: ==, !=, <, <=, >, >=, in, not in"),
    ("aesthetic >= 7.5x", "'7.5x' is not a number"),
    ("aesthetic >= 1e", "'1e' is not a number"),
    ("mean(width) > 1", "unknown function 'mean'; allowed: min, max, abs, len, words, lower"),
    ("len(caption, 2) > 3", "len() takes 1 argument(s)"),
    ("aesthetic", "has no comparison"),
    ("aesthetic >=", "ends early"),
    ("1 < 2", "reads no column"),
    ("language in en", "'in' needs a list on its right"),
    ("0 < a < b < c", "chains more than two comparisons"),
    ("width & height > 1", "unexpected character '&'"),
    ("  ", "empty"),
]


@pytest.mark.parametrize(("rule", "problem"), BAD_RULES, ids=[r for r, _ in BAD_RULES])
def test_bad_rules_are_one_line_errors(rule, problem):
    with pytest.raises(FilterError) as e:
        parse_rule(rule)
    assert str(e.value).startswith(f"filter rule {rule.strip()!r}: {problem}"), str(e.value)


def row_verdicts(rule: str, rows: list[dict], columns=("a", "b", "s", "t", "flag")) -> list:
    test = bind(parse_rule(rule), list(columns), "d")
    return [test(r) for r in rows]


def test_evaluation_rules():
    from slimsd.train.filters import MISSING

    rows = [
        {"a": 2, "b": 4},
        {"a": "3.5", "b": 0},
        {"a": None, "b": 1},
        {"b": 2},
        {"a": float("nan"), "b": 1},
    ]
    # a number written as text compares as a number; absent, null and NaN are no value (the row fails)
    assert row_verdicts("a >= 3", rows) == [False, True, MISSING, MISSING, MISSING]
    assert row_verdicts("a / b < 1", rows[:2]) == [True, MISSING]  # a division by zero is no value
    assert row_verdicts("a * 2 + -b == 0", rows[:1]) == [True]  # 2*2 - 4
    assert row_verdicts("1 <= b <= 3", rows) == [False, False, True, True, True]
    assert row_verdicts("a != 2", rows[:3]) == [False, True, MISSING]
    text = [{"s": "en", "t": "A Cat"}, {"s": "de", "t": "two words"}, {"s": 5, "t": None}]
    assert row_verdicts("s == en", text) == [True, False, MISSING]  # a bare word with no such column is text
    assert row_verdicts("s not in (en, 'fr')", text) == [False, True, MISSING]
    assert row_verdicts("lower(t) == 'a cat'", text) == [True, False, MISSING]
    assert row_verdicts("words(t) == 2", text) == [True, True, MISSING]
    assert row_verdicts("abs(-a) == max(a, 1, b / 2)", [{"a": 2, "b": 4}, {"a": 1, "b": 6}]) == [True, False]
    assert row_verdicts("flag == true", [{"flag": True}, {"flag": False}, {"flag": 1}]) == [
        True,
        False,
        MISSING,
    ]
    # a bare word that IS a column is the column: width == height compares the two
    assert row_verdicts("a == b", [{"a": 3, "b": 3}, {"a": 3, "b": 4}]) == [True, False]


def test_column_names_match_without_case_only_when_one_column_does():
    assert row_verdicts("WIDTH > 1", [{"width": 2}], columns=["width"]) == [True]
    with pytest.raises(FilterError, match=r"several columns named 'width' but for case \(Width, WIDTH\)"):
        bind(parse_rule("width > 1"), ["Width", "WIDTH"], "d")
    assert row_verdicts("Width > 1", [{"Width": 2}], columns=["Width", "WIDTH"]) == [True]


def test_select_applies_rules_in_order():
    metas = [{"a": v, "caption": "x"} for v in (1, 5, None, 9)]
    keep, report = select(parse_rules(["a > 2", "a < 9"]), metas, ["a", "caption"], "d")
    assert keep == [1]
    assert report == [
        {"rule": "a > 2", "removed": 2, "no_value": 1, "left": 2},
        {"rule": "a < 9", "removed": 1, "no_value": 0, "left": 1},
    ]


def test_nested_json_fields_are_columns_with_dots(tmp_path):
    (tmp_path / "a.png").write_bytes(png("red"))
    (tmp_path / "b.png").write_bytes(png("blue"))
    lines = [
        {"file_name": "a.png", "text": "a", "scores": {"aesthetic": 8.0}, "tags": ["x"]},
        {"file_name": "b.png", "text": "b", "scores": {"aesthetic": 5.0}},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    source = open_source(str(tmp_path), data_filter="scores.aesthetic > 6")
    assert [c for _, c in kept(source)] == ["a"]
    with pytest.raises(
        FilterError, match=r"it has: caption, scores\.aesthetic, text$"
    ):  # a list is no column
        open_source(str(tmp_path), data_filter="tags == x")


def test_config_key_and_command_line_rules(tmp_path, capsys, monkeypatch):
    from slimsd.train.config import load_config

    c = load_config(None, ["data_filter=aesthetic >= 7.5"])
    assert c.data_filter == ["aesthetic >= 7.5"]
    assert load_config(None, ["data_filter=[]"]).data_filter is None
    with pytest.raises(SlimsdError, match="unknown operator '=>'"):
        load_config(None, ["data_filter=[aesthetic => 7.5]"])
    # a bad rule, or a rule on a column the data lacks, ends the run before the folder or any model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("slimsd.models.loading.load", lambda *a, **k: pytest.fail("a model loaded"))
    data = make_parquet(tmp_path)
    for rule, needle in [
        ("aesthetic >= 7.5x", "filter rule 'aesthetic >= 7.5x': '7.5x' is not a number"),
        ("nsfw == no", f"filter rule 'nsfw == no': data {data!r} has no column 'nsfw'; it has: LANGUAGE, "),
    ]:
        code, _, err = run_cli(["distill", f"data={data}", "tensorboard=false", "--filter", rule], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "runs").exists()
    code, _, err = run_cli(["finetune", "model=micro-sd", f"data={data}", "--filter", "x > 1"], capsys)
    assert code == 2 and "has no column 'x'" in err and not (tmp_path / "runs").exists()


def test_a_run_records_each_rules_removals_and_the_filter_is_part_of_its_identity(tmp_path, capsys):
    from slimsd.train.distill import train

    data = make_parquet(tmp_path)
    rules = ["punsafe < 0.1", "aesthetic > 7"]  # keeps r0, r2, r4: punsafe removes r1, aesthetic r3 and r5
    counts = {"filter: punsafe < 0.1": 1, "filter: aesthetic > 7": 2}
    one = train(
        cfg(
            tmp_path,
            batch_size=3,
            max_steps=2,
            stop_at_step=1,
            checkpoint_every=1,
            data=data,
            data_filter=rules,
        )
    )
    assert one["skipped"] == counts and one["final_dir"] is None
    with pytest.raises(SlimsdError, match=r"with changed data_filter \["):  # other rows: another computation
        train(cfg(tmp_path, batch_size=3, max_steps=2, data=data, data_filter=rules[:1], resume="latest"))
    two = train(
        cfg(
            tmp_path,
            batch_size=3,
            max_steps=2,
            checkpoint_every=1,
            data=data,
            data_filter=rules,
            resume="latest",
        )
    )
    assert two["steps"] == 2 and two["skipped"] == counts  # counted once, kept across the resume
    info = json.loads((tmp_path / "run" / "final" / "slimsd.json").read_text())
    assert info["skipped"] == counts and info["distill"]["data_filter"] == rules


def test_the_latent_cache_is_written_filtered_and_refuses_other_rules(tmp_path):
    from slimsd.train.cache import write_cache
    from slimsd.train.survey import survey

    data = make_webdataset(tmp_path)
    rules = ["language == en", "aesthetic >= 7.6"]  # r0 and r4
    info = write_cache("micro-sd", data, tmp_path / "cache", resolution=32, data_filter=rules)
    assert info["count"] == 2 and info["data_filter"] == rules
    assert info["skipped"] == {"filter: language == en": 2, "filter: aesthetic >= 7.6": 2}
    same = open_source(str(tmp_path / "cache"), data_filter=rules)
    assert len(same) == 2 and [f["removed"] for f in same.filtered] == [2, 2]
    assert len(open_source(str(tmp_path / "cache"))) == 2  # no rules asked: the cache as written
    with pytest.raises(FilterError, match="is a latent cache made with data_filter"):
        open_source(str(tmp_path / "cache"), data_filter=["language == en"])
    # slimsd data on the cache: its rows and what the filter removed when it was written; no images to read
    shown = survey(str(tmp_path / "cache"))
    assert (shown["kind"], shown["found"], shown["rows"], shown["read"]) == ("cache", 6, 2, None)
    assert [(f["rule"], f["removed"]) for f in shown["filter"]] == [
        ("language == en", 2),
        ("aesthetic >= 7.6", 2),
    ]


@pytest.mark.slow(seconds=40)  # two meta-device estimates at full size
@pytest.mark.parametrize(
    ("config", "rows", "filtered"),
    [
        # aesthetic > 7.5: r1 (7.5), r3 (no score) and r5 (6.9) go
        ("segmind-small-laion-art.yaml", 3, [("aesthetic > 7.5", 3, 1)]),
        # aesthetic >= 6.5: r3 goes; short side >= 512: r0 and r2 go (480)
        ("bk-small-laion-aes.yaml", 3, [("aesthetic >= 6.5", 1, 1), ("min(width, height) >= 512", 2, 0)]),
    ],
)
def test_dry_run_of_the_seed_configs_reports_the_rows_a_run_uses(config, rows, filtered, tmp_path, capsys):
    data = make_webdataset(tmp_path)
    args = ["distill", "--config", str(CONFIGS / config), f"data={data}", "--dry-run"]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    shown = json.loads(out)["data"]
    assert shown["rows"] == rows and shown["dropped"] == {}
    assert [(f["rule"], f["removed"], f["no_value"]) for f in shown["filter"]] == filtered
    code, out, _ = run_cli(args, capsys)
    assert f"# data: a run uses {rows} rows, fewer than one global batch" in out
    assert f"# filter {filtered[0][0]!r}: removed {filtered[0][1]}" in out


def test_the_run_summary_names_each_rule_with_its_count():
    from slimsd.train.data import describe_skipped

    skipped = {"missing_caption": 1, "filter: aesthetic > 7.5": 3, "filter: punsafe < 0.1": 0}
    assert (
        describe_skipped(skipped) == "filter 'aesthetic > 7.5' 3, filter 'punsafe < 0.1' 0, missing_caption 1"
    )

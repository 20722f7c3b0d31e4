"""Data sources: every format reads its good rows and skips (and counts) a corrupted image and a missing caption."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.train.data import BatchPlan, Examples, check_rows, collate, open_source, preprocess

from helpers import run_cli

GOOD = [("red", "a red square"), ("blue", "a blue square"), ("green", "a green square")]
CORRUPT = b"\x89PNG\r\n\x1a\nthis is not a png"


def png(color: str, size=(80, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_imagefolder(root):
    lines = [{"file_name": f"{i}.png", "text": cap} for i, (_, cap) in enumerate(GOOD)]
    for i, (color, _) in enumerate(GOOD):
        (root / f"{i}.png").write_bytes(png(color))
    (root / "bad.png").write_bytes(CORRUPT)
    (root / "nocap.png").write_bytes(png("black"))
    lines += [{"file_name": "bad.png", "text": "a broken image"}, {"file_name": "nocap.png"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(root)


def make_sidecar(root):
    for i, (color, cap) in enumerate(GOOD):
        (root / f"{i}.png").write_bytes(png(color))
        (root / f"{i}.txt").write_text(cap)
    (root / "bad.png").write_bytes(CORRUPT)
    (root / "bad.txt").write_text("a broken image")
    (root / "nocap.png").write_bytes(png("black"))
    return str(root)


def make_webdataset(root):
    path = root / "shard-000.tar"
    with tarfile.open(path, "w") as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, (color, cap) in enumerate(GOOD):
            add(f"{i:04d}.png", png(color))
            add(f"{i:04d}.txt", cap.encode())
        add("0100.png", CORRUPT)
        add("0100.json", json.dumps({"caption": "a broken image"}).encode())
        add("0101.png", png("black"))
    return str(path)


def make_parquet(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": png(c), "path": None} for c, _ in GOOD] + [
        {"bytes": CORRUPT, "path": None},
        {"bytes": png("black"), "path": None},
    ]
    captions = [c for _, c in GOOD] + ["a broken image", None]
    path = root / "train.parquet"
    pq.write_table(pa.table({"image": images, "text": captions}), path, row_group_size=2)
    return str(path)


@pytest.mark.parametrize("make", [make_imagefolder, make_sidecar, make_webdataset, make_parquet])
def test_each_format_skips_and_counts_bad_rows(tmp_path, make):
    source = open_source(make(tmp_path))
    assert source.skipped == {"missing_caption": 1}
    # as a latent cache reads them (replace=False): the corrupt row is counted and left out
    examples = Examples(source, resolution=32, replace=False)
    batch = collate([examples[(i, 0)] for i in range(len(examples))])
    assert batch["skipped"] == ["unreadable_image"]
    assert batch["size"] == 3 and batch["pixels"].shape == (3, 3, 32, 32)
    assert sorted(batch["caption"]) == sorted(c for _, c in GOOD)
    # the colours come through: a red image is red after decoding, resizing and scaling to [-1, 1]
    red = batch["pixels"][batch["caption"].index("a red square")]
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9
    # as the trainer reads them: counted, and its slot filled by one of the good rows, so the batch is full
    trained = collate([Examples(source, resolution=32)[(i, 0)] for i in range(len(examples))])
    assert trained["skipped"] == ["unreadable_image"] and trained["size"] == 4
    assert set(trained["caption"]) == {c for _, c in GOOD}


def test_unknown_data_is_one_line_error(tmp_path):
    with pytest.raises(SlimsdError, match="not found or not understood"):
        open_source(str(tmp_path / "nothing-here"))
    with pytest.raises(SlimsdError, match="shapes:N"):
        open_source("shapes:zero")


def test_preprocess_center_crop_flip_and_size_conditioning():
    img = Image.new("RGB", (100, 50), "white")
    img.paste((255, 0, 0), (0, 0, 50, 50))  # left half red
    out = preprocess(img, 32)
    assert out["pixels"].shape == (3, 32, 32)
    assert out["original_size"].tolist() == [50, 100] and out["crop_top_left"].tolist() == [0, 16]
    flipped = preprocess(img, 32, flip=True)
    assert torch.allclose(flipped["pixels"], out["pixels"].flip(-1))


def test_batch_plan_splits_global_batches_across_processes_and_resumes():
    one = BatchPlan(10, 4, 1, 0, seed=3)
    two = [BatchPlan(10, 2, 2, r, seed=3) for r in range(2)]
    it1, it2 = iter(one), [iter(p) for p in two]
    seen = []
    for _ in range(5):  # crosses two epoch boundaries (2 global batches per epoch)
        b1 = next(it1)
        b2 = next(it2[0]) + next(it2[1])
        assert b1 == b2
        seen.append(b1)
    assert {e for b in seen for _, e in b} == {0, 1, 2}
    assert len({i for b in seen[:2] for i, _ in b}) == 8  # no repeat within an epoch
    resumed = iter(BatchPlan(10, 4, 1, 0, seed=3, start=3))
    assert next(resumed) == seen[3]


def test_too_few_rows_after_indexing_names_what_was_dropped(tmp_path):
    source = open_source(make_imagefolder(tmp_path))  # 4 rows (one is corrupt, found only when read)
    check_rows(source, "d", 4)
    with pytest.raises(
        SlimsdError,
        match=r"'d': 4 usable rows, fewer than one global batch \(6\); skipped: "
        r"missing_caption 1$",
    ):
        check_rows(source, "d", 6)


# --- data that yields nothing ------------------------------------------------------------------------------------


class Hang(BaseException):
    """Not an Exception: the readers' `except Exception` around image decoding must not swallow it."""


@contextmanager
def no_hang(seconds: int = 120):
    """Fail instead of hanging: the trainer used to spin forever on data with no readable row."""

    def timeout(*_):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def all_missing_files(root):
    lines = [{"file_name": f"gone-{i}.png", "text": f"caption {i}"} for i in range(3)]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(root), "skipped 3 rows: missing_image 3"


def all_corrupt_sidecar(root):
    for i in range(3):
        (root / f"{i}.png").write_bytes(CORRUPT)
        (root / f"{i}.txt").write_text(f"caption {i}")
    return str(root), "skipped 3 rows: unreadable_image 3"


def all_corrupt_webdataset(root):
    path = root / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            for name, data in ((f"{i:04d}.png", CORRUPT), (f"{i:04d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path), "skipped 3 rows: unreadable_image 3"


def all_corrupt_parquet(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "train.parquet"
    pq.write_table(pa.table({"image": [CORRUPT] * 3, "text": ["a caption"] * 3}), path, row_group_size=2)
    return str(path), "skipped 3 rows: unreadable_image 3"


def all_captions_missing(root):  # dropped at indexing: refused before any model is loaded
    for i in range(3):
        (root / f"{i}.png").write_bytes(png("red"))
    return str(root), "0 usable rows, fewer than one global batch (2); skipped: missing_caption 3"


@pytest.mark.parametrize(
    "make",
    [
        all_missing_files,
        all_corrupt_sidecar,
        all_corrupt_webdataset,
        all_corrupt_parquet,
        all_captions_missing,
    ],
)
def test_distill_on_data_with_no_readable_row_ends_with_one_line(make, tmp_path, capsys):
    data, counts = make(tmp_path)
    args = ["distill", f"data={data}", f"output_dir={tmp_path / 'run'}", "batch_size=2", "max_steps=2"]
    with no_hang():
        code, _, err = run_cli([*args, "resolution=64", "progress=false", "tensorboard=false"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert counts in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def recorded_reads(monkeypatch) -> list[tuple[int, bool]]:
    """Every row the trainer reads, as (row, read without error), in order: the sources' `read` wrapped."""
    import slimsd.train.data as D

    reads, opened = [], D.open_source

    def open_source(*args, **kw):
        source = opened(*args, **kw)
        read = source.read

        def recorded(row):
            try:
                out = read(row)
            except D.BadRow:
                reads.append((source.rows.index(row), False))
                raise
            reads.append((source.rows.index(row), True))
            return out

        source.read = recorded
        return source

    monkeypatch.setattr(D, "open_source", open_source)
    return reads


def test_a_few_readable_rows_are_trained_on_and_the_rest_counted(tmp_path, monkeypatch):
    """1 readable row of 6, batch 1: every micro-batch is filled (by the readable row), none is skipped, and the
    count of unreadable rows is the number of reads that failed."""
    from slimsd.train.distill import train

    from helpers import cfg

    (tmp_path / "0.png").write_bytes(png("red"))
    (tmp_path / "0.txt").write_text("a red square")
    for i in range(1, 6):
        (tmp_path / f"{i}.png").write_bytes(CORRUPT)
        (tmp_path / f"{i}.txt").write_text("a broken image")
    reads = recorded_reads(monkeypatch)
    with no_hang():
        result = train(
            cfg(tmp_path, batch_size=1, max_steps=3, data=str(tmp_path), seed=2, max_skipped_fraction=1)
        )
    good = [row for row, ok in reads if ok]
    assert result["steps"] == 3 and good == [0, 0, 0]  # one good read per micro-batch
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["micro_batches"] == 3  # none was skipped for holding no readable row
    failed = len(reads) - len(good)
    assert failed > 0 and result["skipped"] == {"unreadable_image": failed}


def test_a_replacement_depends_on_the_seed_epoch_and_row_alone(tmp_path):
    """An unreadable row's replacement is a readable row with its own preprocessing, the same in another
    Python process (string hashing is randomised per process), and spread over the readable rows."""
    import subprocess
    import sys

    colours = ["red", "blue", "green", "yellow", "white", "black"]
    for i in range(10):  # rows 0-5 readable, 6-9 corrupt (sidecar rows sort by name)
        (tmp_path / f"{i}.png").write_bytes(png(colours[i]) if i < 6 else CORRUPT)
        (tmp_path / f"{i}.txt").write_text(f"a {colours[i]} square" if i < 6 else "a broken image")
    examples = Examples(open_source(str(tmp_path)), resolution=32, random_flip=True, seed=4)
    keys = [(row, epoch) for epoch in range(40) for row in range(6, 10)]
    chosen = []
    for key in keys:
        item = examples[key]
        assert item["failed"][0] == (key[0], "unreadable_image") and 0 <= item["index"] < 6
        own = examples.example(item["index"], key[1])  # the row read as if drawn in that epoch
        assert torch.equal(item["pixels"], own["pixels"]) and item["caption"] == own["caption"]
        chosen.append(item["index"])
    assert set(chosen) == set(range(6))
    code = (
        "import json, sys; from slimsd.train.data import Examples, open_source; "
        "e = Examples(open_source(sys.argv[1]), resolution=32, random_flip=True, seed=4); "
        "print(json.dumps([e[(r, ep)]['index'] for ep in range(40) for r in range(6, 10)]))"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == chosen


def test_data_that_goes_away_in_the_middle_of_a_run_ends_with_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(4)]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for i in range(4):
        (data / f"{i}.png").write_bytes(png("red"))
    args = ["distill", f"data={data}", f"output_dir={tmp_path / 'run'}", "batch_size=2", "resolution=64"]
    args += ["progress=false", "tensorboard=false"]
    with no_hang():
        assert run_cli([*args, "max_steps=1"], capsys)[0] == 0
        for i in range(
            4
        ):  # the files go away (an unmounted disk, a cleaned folder); the index still names them
            (data / f"{i}.png").unlink()
        code, _, err = run_cli([*args, "max_steps=3", "resume=latest"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no row could be read since step 1; skipped 4 rows: missing_image 4" in err


def test_cache_of_data_with_no_readable_row_writes_nothing(tmp_path, capsys):
    for make in (all_corrupt_sidecar, all_captions_missing):
        root = tmp_path / make.__name__
        root.mkdir()
        data, counts = make(root)
        out = tmp_path / f"{make.__name__}-cache"
        cmd = ["cache", "--model", "micro-sd", "--data", data, "--out", str(out), "--resolution", "64"]
        code, _, err = run_cli(cmd, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "skipped 3 rows: " + counts.split(" ")[-2] + " 3" in err
        assert not out.exists() and not list(
            tmp_path.glob(f".{out.name}.*")
        )  # no empty cache, no temp folder

"""Data sources: every format reads its good rows and skips (and counts) a corrupted image and a missing caption."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.train.data import BatchPlan, Examples, collate, open_source, preprocess

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
    examples = Examples(source, resolution=32)
    batch = collate([examples[(i, 0)] for i in range(len(examples))])
    assert batch["skipped"] == ["unreadable_image"]
    assert batch["size"] == 3 and batch["pixels"].shape == (3, 3, 32, 32)
    assert sorted(batch["caption"]) == sorted(c for _, c in GOOD)
    # the colours come through: a red image is red after decoding, resizing and scaling to [-1, 1]
    red = batch["pixels"][batch["caption"].index("a red square")]
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9


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
    with pytest.raises(SlimsdError, match="fewer than one global batch"):
        BatchPlan(3, 2, 2, 0, seed=0)

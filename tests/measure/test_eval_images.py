"""An evaluation's images: shards, and which images are made again."""

from __future__ import annotations

import pytest
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.measure import eval_images
from slimsd.measure.prompts import Prompt
from slimsd.run.pnginfo import settings_from_png


def test_parse_shard():
    assert eval_images.parse_shard("2/4") == (2, 4)
    assert eval_images.parse_shard(None) == (0, 1)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(SlimsdError, match="shard"):
            eval_images.parse_shard(bad)


def test_an_image_made_with_another_deep_cache_is_made_again(tmp_path):
    """deep_cache decides the pixels: an image made with another interval is not reused; one from before the
    option existed (no deep_cache in its PNG info) was made without it, so a run without it reuses it."""
    from slimsd.atomic import atomic_write_bytes
    from slimsd.run.pnginfo import Settings, png_bytes

    prompts = [Prompt(i, name, f"a {name} circle") for i, name in enumerate(("two", "one", "old"))]
    for p, stored in zip(prompts, ({"deep_cache": 2}, {"deep_cache": 1}, None), strict=True):
        settings = Settings(p.caption, steps=2, seed=p.index, model_source="micro-sd", dtype="fp32")
        settings.extra = {"eval_resolution": None, "eval_scheduler": None}
        meta = vars(settings) | (stored or {})
        if stored is None:
            del meta["deep_cache"]
        atomic_write_bytes(
            eval_images.image_path(tmp_path, p), png_bytes(Image.new("RGB", (8, 8)), extra_json=meta)
        )
    assert "deep_cache" not in settings_from_png(eval_images.image_path(tmp_path, prompts[2]))
    for interval, todo, differing in (
        (1, ["two"], {"deep_cache": 1}),
        (2, ["one", "old"], {"deep_cache": 2}),
    ):
        gen = eval_images.GenSettings(steps=2, deep_cache=interval)
        made, counts = eval_images.plan_images(prompts, tmp_path, gen, "micro-sd")
        assert [p.id for p in made] == todo and counts["differing"] == differing

"""Images: the file types slimsd reads, and the one image grid every command draws."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from slimsd.errors import SlimsdError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images tiled row-major, ``cols`` per row (default: a near-square grid), cells sized to the largest."""
    if not images:
        raise SlimsdError("no images to put on a grid")
    cols = max(1, min(cols or math.ceil(math.sqrt(len(images))), len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid

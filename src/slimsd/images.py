"""Images: the file types slimsd reads, and the one image grid every command draws."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.files import file_sha256

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


@dataclass
class InputImage:
    """An image a generation starts from (img2img's init image, an inpainting mask, a ControlNet's control
    image), with what identifies it in the PNG it leads to: the file's name, resolved path and sha256 (an image
    given in memory: no path, the sha256 of its mode, size and pixels)."""

    image: Image.Image
    name: str
    path: str | None
    sha256: str

    def record(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256}


def read_input_image(path: str | Path, what: str) -> InputImage:
    """The image file at PATH as an :class:`InputImage`, or one line naming the file (WHAT: "init image", ...)."""
    path = Path(path)
    if not path.is_file():
        raise SlimsdError(f"{what} {str(path)!r} does not exist (or is not a file)")
    try:
        with Image.open(path) as im:
            im.load()  # the whole file: a truncated one fails here, not halfway through a generation
            image = im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SlimsdError(f"{what} {str(path)!r} is not a readable image: {e}") from None
    return InputImage(image, path.name, str(path.resolve()), file_sha256(path))


def as_input_image(value, what: str) -> InputImage | None:
    """None, an :class:`InputImage`, a file path or a PIL image -> an :class:`InputImage` (or None)."""
    if value is None or isinstance(value, InputImage):
        return value
    if isinstance(value, Image.Image):
        digest = hashlib.sha256(f"{value.mode} {value.width}x{value.height} ".encode() + value.tobytes())
        return InputImage(value, "(in memory)", None, digest.hexdigest())
    if isinstance(value, str | Path):
        return read_input_image(value, what)
    raise SlimsdError(f"{what} {value!r} is not an image file or a PIL image")


def fit(image: Image.Image, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """IMAGE in MODE stretched to WIDTHxHEIGHT with Lanczos (A1111's "Just resize"; no crop, no padding)."""
    image = image.convert(mode)
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)

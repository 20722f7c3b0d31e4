"""Output files: safe names from any text, a running counter, writes that never overwrite, grids."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from io import BytesIO
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from slimsd.atomic import usual_mode
from slimsd.errors import SlimsdError
from slimsd.files import safe_stem
from slimsd.images import make_grid
from slimsd.run.pnginfo import PNG_JSON_KEY, png_bytes


def next_index(folder: Path) -> int:
    """One more than the largest ``NNNNN-`` prefix in FOLDER (A1111's running counter)."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(?:grid-)?(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def write_new_file(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write DATA atomically under a name that did not exist: ``stem.suffix``, else ``stem-1.suffix``, ...

    The bytes go to a temporary file first and are then hard-linked to the final name; ``link`` fails rather
    than replace an existing file, so two writers (e.g. concurrent UI requests) never overwrite each other.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".slimsd-", suffix=".tmp", dir=folder)
    usual_mode(tmp, folder=False)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for n in range(10_000):
            path = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
        raise SlimsdError(f"could not find a free file name for {stem!r} in {str(folder)!r}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_images(results: Sequence, out_dir: str | Path) -> list[Path]:
    """Write each generated image as ``NNNNN-SEED-prompt.png`` (never overwriting); sets ``result.path``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlimsdError(f"output path {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    start = next_index(out)
    paths = []
    for k, r in enumerate(results):
        stem = f"{start + k:05d}-{r.seed}-{safe_stem(r.settings.prompt)}"
        r.path = write_new_file(out, stem, ".png", png_bytes(r.image, r.settings))
        paths.append(r.path)
    return paths


def save_grid(results: Sequence, out_dir: str | Path) -> Path:
    """The grid of RESULTS, with the first image's ``parameters`` and the list of every image's settings."""
    first = results[0]
    data = {"grid": [asdict(r.settings) for r in results]}
    stem = f"grid-{next_index(Path(out_dir)):05d}-{safe_stem(first.settings.prompt)}"
    info = PngInfo()
    info.add_text("parameters", first.settings.a1111_parameters())
    info.add_text(PNG_JSON_KEY, json.dumps(data, ensure_ascii=False, sort_keys=True))
    buf = BytesIO()
    make_grid([r.image for r in results]).save(buf, format="PNG", pnginfo=info)
    return write_new_file(Path(out_dir), stem, ".png", buf.getvalue())

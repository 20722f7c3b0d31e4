"""Output files: safe names from any text, a running counter, writes that never overwrite, grids."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from io import BytesIO
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from slimsd.atomic import write_new_file
from slimsd.errors import SlimsdError
from slimsd.files import safe_stem
from slimsd.images import make_grid
from slimsd.run.pnginfo import PNG_JSON_KEY, png_bytes


def next_index(folder: Path) -> int:
    """One more than the largest ``NNNNN-`` prefix in FOLDER (A1111's running counter)."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(?:grid-)?(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


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

"""What a data source holds, before a run (`slimsd data`): rows found, dropped at indexing and removed by each
``data_filter`` rule, unreadable rows (in a sample of the kept rows, or in all of them), the captions' lengths,
the images' sizes, the metadata columns with their ranges, and a grid of kept images with their captions.

Distributions are given as min, p5, median, p95, max (nearest rank: the value at place round(p·(n−1)) of the
sorted values) and the mean. Column ranges are over the rows found (before the filter), so that a threshold can
be chosen from them.
"""

from __future__ import annotations

import io
import math
import random
import textwrap
from array import array
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from slimsd.errors import SlimsdError
from slimsd.train import filters as F
from slimsd.train import sources as S

CELL = 160  # px: a grid cell's image, and its width
CAPTION_LINES = 3


def spread(values: list) -> dict | None:
    """min, p5, median, p95, max (nearest rank) and mean of numbers; None for none."""
    if not values:
        return None
    s = sorted(values)

    def at(p: float):
        return s[round(p * (len(s) - 1))]

    return {
        "count": len(s),
        "min": s[0],
        "p5": at(0.05),
        "median": at(0.5),
        "p95": at(0.95),
        "max": s[-1],
        "mean": sum(s) / len(s),
    }


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


class ColumnStats:
    """Column ranges gathered row by row while the data is indexed: per column the numbers (a compact array, for
    the median), true / false counts, or the text values' counts (at most MAX_DISTINCT distinct values kept, so
    that an id or URL column cannot fill the memory). Nothing else is kept per row."""

    MAX_DISTINCT = 100_000

    def __init__(self):
        self.rows = 0
        self.order: dict[str, None] = {}
        self.present: Counter = Counter()  # rows with a value, per column
        self.numbers: dict[str, array] = {}
        self.whole: dict[str, bool] = {}  # every number of the column an int
        self.bools: dict[str, list[int]] = {}
        self.texts: dict[str, Counter] = {}
        self.more_text: set = set()  # columns with more distinct values than were kept
        self.other: Counter = Counter()

    def __call__(self, fields: dict) -> None:
        self.rows += 1
        for k, v in fields.items():
            self.order.setdefault(k)
            if _missing(v):
                continue
            self.present[k] += 1
            if isinstance(v, bool):
                self.bools.setdefault(k, [0, 0])[0 if v else 1] += 1
            elif isinstance(v, int | float):
                self.numbers.setdefault(k, array("d")).append(v)
                self.whole[k] = self.whole.get(k, True) and isinstance(v, int)
            elif isinstance(v, str):
                counts = self.texts.setdefault(k, Counter())
                if v in counts or len(counts) < self.MAX_DISTINCT:
                    counts[v] += 1
                else:
                    self.more_text.add(k)
            else:
                self.other[k] += 1

    def ranges(self) -> dict:
        """Per column (not the caption): its kind, how many rows have a value, and its range (numbers), its
        true / false counts, or its distinct values and the three most common (text)."""
        out = {}
        for column in self.order:
            if column == F.CAPTION:
                continue
            nums, bools, texts = self.numbers.get(column), self.bools.get(column), self.texts.get(column)
            kinds = [k for k, v in (("number", nums), ("bool", bools), ("text", texts)) if v]
            present = self.present[column]
            entry: dict = {"values": present, "missing": self.rows - present}
            if len(kinds) != 1 or self.other[column]:
                entry["kind"] = "mixed" if present else "empty"
            elif nums:
                cast = int if self.whole[column] else float
                s = spread(list(nums))
                entry |= {"kind": "number", **{k: cast(s[k]) for k in ("min", "median", "max")}}
            elif bools:
                entry |= {"kind": "bool", "true": bools[0], "false": bools[1]}
            else:
                distinct = f"more than {len(texts)}" if column in self.more_text else len(texts)
                entry |= {
                    "kind": "text",
                    "distinct": distinct,
                    "top": [[v, n] for v, n in texts.most_common(3)],
                }
            out[column] = entry
        return out


def _cell(image: Image.Image, caption: str, font) -> Image.Image:
    """One grid cell: the image fitted in CELL x CELL on black, its caption (wrapped, cut) below."""
    thumb = ImageOps.contain(image, (CELL, CELL))  # small images scaled up too
    line_h = 12
    cell = Image.new("RGB", (CELL, CELL + CAPTION_LINES * line_h + 6), "black")
    cell.paste(thumb, ((CELL - thumb.width) // 2, (CELL - thumb.height) // 2))
    lines = textwrap.wrap(caption, width=26)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][:23] + "..."
    draw = ImageDraw.Draw(cell)
    for k, line in enumerate(lines):
        draw.text((3, CELL + 3 + k * line_h), line, fill="white", font=font)
    return cell


def grid_png(kept: list[tuple[Image.Image, str]]) -> bytes:
    """Kept images with their captions, 4 to a row, as PNG bytes."""
    from slimsd.images import make_grid

    font = ImageFont.load_default()
    grid = make_grid([_cell(im, cap, font) for im, cap in kept], cols=min(4, len(kept)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def read_rows(source: S.Source, indices: list[int], keep: int) -> tuple[Counter, list, list]:
    """Read the rows at ``indices``: unreadable ones by reason, the readable images' sizes, and the first
    ``keep`` readable (image, caption) pairs."""
    unreadable: Counter = Counter()
    sizes, shown = [], []
    for i in indices:
        try:
            image, caption = source.read(source.rows[i])
        except S.BadRow as e:
            unreadable[e.args[0]] += 1
            continue
        sizes.append(image.size)
        if len(shown) < keep:
            shown.append((image, caption))
    return unreadable, sizes, shown


def survey(
    spec: str,
    data_filter=None,
    *,
    sample: int = 64,
    full: bool = False,
    seed: int = 0,
    grid: str | Path | None = None,
    grid_images: int = 16,
) -> dict:
    """The summary `slimsd data` prints (see the module docstring); writes ``grid`` when asked."""
    from slimsd.atomic import atomic_write_bytes

    rules = F.parse_rules(data_filter)
    stats = ColumnStats()
    source = S.index_source(spec, seed, S.Wanted(frozenset(F.wanted(rules)), observe=stats))
    cached = source.kind == "cache"
    columns = stats.ranges()
    if rules:
        S.filter_source(source, rules, str(spec))
    counts = S.row_counts(source)
    found = counts["rows"] + sum(counts["dropped"].values()) + sum(f["removed"] for f in counts["filter"])
    out = {"data": str(spec), "found": found, **counts, "columns": columns}
    if cached:  # latents and embeddings: no captions or images to show
        return out | {"read": None, "captions": None, "image_sizes": None, "grid": None}
    captions = [m[F.CAPTION] for m in source.meta]
    out["captions"] = {
        "characters": spread([len(c) for c in captions]),
        "words": spread([len(c.split()) for c in captions]),
    }
    n = len(source)
    indices = list(range(n)) if full else sorted(random.Random(seed).sample(range(n), min(sample, n)))
    unreadable, sizes, shown = read_rows(source, indices, grid_images if grid else 0)
    out["read"] = {
        "mode": "full" if full else "sample",
        "rows": len(indices),
        "readable": len(sizes),
        "unreadable": dict(unreadable),
    }
    out["image_sizes"] = {
        "width": spread([w for w, _ in sizes]),
        "height": spread([h for _, h in sizes]),
        "short_side": spread([min(s) for s in sizes]),
    }
    out["grid"] = None
    if grid and shown:
        try:
            atomic_write_bytes(grid, grid_png(shown))
        except OSError as e:
            raise SlimsdError(f"grid file {str(grid)!r} cannot be written: {e.strerror}") from None
        out["grid"] = {"path": str(grid), "images": len(shown)}
    return out

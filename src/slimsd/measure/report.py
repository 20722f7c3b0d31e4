"""Reports: the one way slimsd writes a run's results for people to read, used by `slimsd eval` (report.html) and
`slimsd demo` (index.html and the terminal table).

A report's columns are :class:`Column` values (key, title, format, what the column means); the same columns give
the terminal table (:func:`text_table`) and the HTML table (:func:`table`), so the two always show the same
strings. A page (:func:`page`) is one HTML file that opens from the file system with no server: its style is
inline and nothing is fetched from elsewhere (images are inlined, or files beside the page named relatively).
Every cell carries its column's key (``data-metric``), so a test or a script can read a page back.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from slimsd.measure.prompts import Prompt

MISSING = "–"  # a value that was not measured

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:100em}
table{border-collapse:collapse;margin:1em 0}caption{text-align:left;font-weight:bold;padding:4px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td.num{text-align:right}
td img{display:block;max-width:192px}img.sheet{max-width:100%}
pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}dt{font-weight:bold}dd{margin:0 0 .5em 1.5em}"""


@dataclass(frozen=True)
class Column:
    """One column of a report: the row key it shows, its title, the format of a value and what it means."""

    key: str
    title: str
    fmt: str = "{}"
    numeric: bool = True  # right-aligned
    about: str = ""

    def text(self, value) -> str:
        return MISSING if value is None else self.fmt.format(value)


def text_table(columns: Sequence[Column], rows: Iterable[Mapping]) -> list[str]:
    """The terminal table: a header, a rule and a line per row, each column as wide as its widest string."""
    cells = [[c.text(row.get(c.key)) for c in columns] for row in rows]
    widths = [max([len(c.title), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(texts: Sequence[str]) -> str:
        return " ".join(
            t.rjust(w) if c.numeric else t.ljust(w) for c, t, w in zip(columns, texts, widths, strict=True)
        ).rstrip()

    header = line([c.title for c in columns])
    return [header, "-" * len(header), *(line(r) for r in cells)]


def table(table_id: str, columns: Sequence[Column], rows: Iterable[Mapping], caption: str = "") -> str:
    """An HTML table: a header of titles, a row per mapping, each cell tagged with its column's key."""
    e = html.escape
    parts = [f"<table id='{e(table_id)}'>"]
    if caption:
        parts.append(f"<caption>{e(caption)}</caption>")
    parts.append("<thead><tr>")
    parts += [f"<th data-metric='{e(c.key)}'>{e(c.title)}</th>" for c in columns]
    parts.append("</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>")
        parts += [
            f"<td{' class=num' if c.numeric else ''} data-metric='{e(c.key)}'>{e(c.text(row.get(c.key)))}</td>"
            for c in columns
        ]
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def key_values(table_id: str, caption: str, data: Mapping) -> str:
    """A two-column table of settings: the key, and the value (JSON unless a string)."""
    e = html.escape
    rows = [
        f"<tr><th>{e(str(k))}</th><td>{e(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in data.items()
    ]
    return f"<table id='{e(table_id)}'><caption>{e(caption)}</caption><tbody>{''.join(rows)}</tbody></table>"


def legend(columns: Sequence[Column]) -> str:
    """What each column means, as a definition list (columns without an explanation are left out)."""
    e = html.escape
    items = [f"<dt>{e(c.title)}</dt><dd>{e(c.about)}</dd>" for c in columns if c.about]
    return f"<dl id='columns'>{''.join(items)}</dl>"


def page(title: str, body: Iterable[str]) -> str:
    """One HTML document: the title as its heading, then the body's parts in order."""
    t = html.escape(title)
    head = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{t}</title><style>{CSS}</style></head>"
    return "\n".join([head, f"<body><h1>{t}</h1>", *body, "</body></html>"])


# ---------------------------------------------------------------------------------------------------------------
# `slimsd eval`'s report: one self-contained file (images inlined as base64).

MODEL = Column("model", "model", numeric=False)
METRICS = (  # the table shows exactly these strings
    Column("fid", "FID ↓", "{:.3f}"),
    Column("inception_score", "IS ↑", "{:.3f}"),
    Column("inception_score_std", "IS std", "{:.3f}"),
    Column("clip_score", "CLIP score ↑", "{:.3f}"),
    Column("num_images", "images"),
)


def _thumbnail(path: Path, size: int = 192) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _samples(result: dict, out: Path, grid_prompts: Sequence[Prompt]) -> str:
    """The side-by-side grid: a row per prompt, a column per model, each image inlined."""
    e = html.escape
    parts = [
        "<table id='grid'><caption>Samples (same prompt and seed across models)</caption><thead><tr><th>prompt</th>"
    ]
    parts += [f"<th>{e(row['model'])}</th>" for row in result["models"]]
    parts.append("</tr></thead><tbody>")
    for p in grid_prompts:
        seed = result["settings"]["seed"] + p.index
        parts.append(f"<tr><td>{e(p.caption)}<br><small>{e(p.id)} · seed {seed}</small></td>")
        for row in result["models"]:
            path = out / row["images"] / f"{p.id}.png"
            cell = f"<img src='{_thumbnail(path)}' alt='{e(p.caption)}'>" if path.is_file() else "missing"
            parts.append(f"<td>{cell}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def render_report(result: dict, out: str | Path, grid_prompts: Sequence[Prompt]) -> str:
    """The eval report as one HTML string: score table (id ``scores``), side-by-side grid, settings, environment."""
    body = []
    if result.get("protocol"):
        body.append(f"<p>Protocol: <code>{html.escape(result['protocol'])}</code></p>")
    body.append(table("scores", [MODEL, *METRICS], result["models"], "Scores"))
    if grid_prompts:
        body.append(_samples(result, Path(out), grid_prompts))
    body.append(key_values("settings", "Settings", result["settings"]))
    body.append(key_values("environment", "Environment", result["environment"]))
    return page("slimsd eval", body)

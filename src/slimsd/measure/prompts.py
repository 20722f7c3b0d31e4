"""An evaluation's prompts: a CSV with a caption column and an optional id column that names each image."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from slimsd.errors import SlimsdError
from slimsd.run.outputs import safe_stem

CAPTION_COLUMNS = ("caption", "text", "prompt")
ID_COLUMNS = ("id", "file_name", "image_id", "filename")


@dataclass
class Prompt:
    index: int  # row in the prompt file: image ``index`` uses seed S + index
    id: str  # file stem of its image (sanitised)
    caption: str


def read_prompts(
    path: str | Path,
    caption_column: str | None = None,
    id_column: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from a CSV with a header: a caption column (``caption``/``text``/``prompt`` unless named) and an
    optional id column (``id``/``file_name``/``image_id``), which names the image file (sanitised)."""
    path = Path(path)
    if not path.is_file():
        raise SlimsdError(f"prompt file {str(path)!r} does not exist")
    try:
        return _read_prompts(path, caption_column, id_column, limit)
    except UnicodeDecodeError:
        # The reader's offset counts within its buffer: decode the whole file to name the place.
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise SlimsdError(
                f"prompt file {str(path)!r} is not UTF-8 text (byte {data[e.start]:#04x} on line {line}); "
                "save it as UTF-8"
            ) from None
        raise
    except csv.Error as e:
        raise SlimsdError(f"prompt file {str(path)!r} is not a readable CSV: {e}") from None


def _read_prompts(path: Path, caption_column, id_column, limit) -> list[Prompt]:
    # utf-8-sig: the byte-order mark a spreadsheet may write is not part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if caption_column is None:
            caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
            if caption_column is None:
                raise SlimsdError(
                    f"prompt file {str(path)!r} has no caption column: columns {columns}; "
                    f"expected one of {', '.join(CAPTION_COLUMNS)} or --caption-column"
                )
        elif caption_column not in columns:
            raise SlimsdError(f"caption column {caption_column!r} not in {str(path)!r}; columns: {columns}")
        if id_column is None:
            id_column = next((c for c in ID_COLUMNS if c in columns), None)
        elif id_column not in columns:
            raise SlimsdError(f"id column {id_column!r} not in {str(path)!r}; columns: {columns}")
        prompts, seen = [], set()
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            value = row[id_column] or "" if id_column else ""
            pid = safe_stem(
                Path(value).stem if "." in value else value,
                120,
                keep="._-",
                sep="_",
                lower=False,
                fallback="",
            )
            pid = pid or f"{i:06d}"
            if pid in seen:
                raise SlimsdError(
                    f"id {pid!r} appears twice in {str(path)!r} (row {i + 2}); ids name image files"
                )
            seen.add(pid)
            prompts.append(Prompt(i, pid, row[caption_column] or ""))
    if not prompts:
        raise SlimsdError(f"prompt file {str(path)!r} has no prompts")
    return prompts

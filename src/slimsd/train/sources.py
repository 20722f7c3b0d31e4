"""Image + caption data: the rows of a data source, with their metadata, selected by ``data_filter``.

Sources (``open_source(spec)``), all map-style so that the trainer owns the order (exact resume, and the same
examples whether one process or several read them):

- ``shapes:N``: N procedural images of the shapes world (``slimsd.toy.shapes.make_dataset``);
- a folder with ``metadata.jsonl`` (the Hugging Face imagefolder convention: ``file_name`` + ``text``/``caption``);
- a folder of images with ``.txt`` caption sidecars (same stem);
- webdataset ``.tar`` shards (a path, a glob, or a folder of them): members grouped by key, an image
  (jpg/jpeg/png/webp) plus ``.txt`` or ``.json`` (``caption``/``text``);
- parquet (a file or a folder of them): an image column (bytes, or a struct with ``bytes``) and a caption column
  (their names in any case: LAION's metadata says ``TEXT``);
- a latent cache written by ``slimsd cache`` (``slimsd.train.cache``; a folder with ``cache.json``): VAE latents
  and text embeddings, so training skips the VAE encoder and the text encoder(s).

Rows carry metadata: parquet's scalar columns, a webdataset sample's ``.json`` sidecar, a ``metadata.jsonl``
line's fields (nested objects as ``a.b``), and always ``caption``. ``data_filter`` rules (``slimsd.train.filters``)
select rows by it when the source is indexed; each rule's removed rows are counted under ``filter: RULE``.

A row whose caption is missing is dropped when the source is indexed; a row whose image cannot be decoded is
dropped when it is read. Both are counted by reason (``skipped``), never a crash. Data with too few rows left
after indexing (``check_rows``), or whose every row has failed to read (``slimsd.train.data.ReadGuard``), ends the
run with one line that names what was skipped and why.

This module imports no torch (``slimsd data`` reads data in a few seconds); the trainer's examples and batch
plan are ``slimsd.train.data``.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.images import IMAGE_SUFFIXES
from slimsd.train import filters as F

CAPTION_KEYS = ("text", "caption", "prompt")
IMAGE_COLUMNS = ("image", "jpg", "png", "image_bytes", "img")
CACHE_FORMAT = 1
FILTER_PREFIX = "filter: "  # a data_filter rule's removed rows in ``skipped`` (run summary, slimsd.json)


class BadRow(Exception):
    """A row that cannot be used; ``args[0]`` is the reason that is counted."""


@dataclass
class Wanted:
    """The metadata an index keeps: the values of ``names`` (casefolded; a filter's columns) per row, and every
    column of every row shown to ``observe`` (`slimsd data`'s column ranges, gathered without keeping them)."""

    names: frozenset = frozenset()
    observe: object = None  # callable(fields: dict) -> None, or None


@dataclass
class Source:
    """Rows by index. ``rows[i]`` is whatever ``read(row)`` needs; ``skipped`` counts rows dropped at indexing."""

    kind: str
    rows: list
    read: object  # callable(row) -> (PIL.Image, caption) or a dict of cached tensors
    skipped: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)
    columns: list = field(default_factory=lambda: [F.CAPTION])  # the metadata columns the rows carry
    meta: list | None = None  # per row, the metadata a filter or a survey reads ({column: value})
    filtered: list = field(default_factory=list)  # per rule: {"rule", "removed", "no_value", "left"}

    def __len__(self) -> int:
        return len(self.rows)


def _caption(value) -> str | None:
    if isinstance(value, dict):
        for k in CAPTION_KEYS:
            if isinstance(value.get(k), str):
                return _caption(value[k])
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _flat(value: dict, prefix: str = "") -> dict:
    """A JSON object's scalar fields, nested objects as ``a.b`` (lists are no column)."""
    out = {}
    for k, v in value.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        elif v is None or isinstance(v, str | int | float | bool):
            out[f"{prefix}{k}"] = v
    return out


def _keep(fields: dict, want: Wanted, caption: str) -> dict:
    """What an index keeps of one row's metadata (the columns a filter reads, and the caption); every field is
    shown to ``want.observe`` first."""
    if want.observe is not None:
        want.observe(fields)
    return {k: v for k, v in fields.items() if k.casefold() in want.names} | {F.CAPTION: caption}


def _decode(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes
        raise BadRow("unreadable_image") from e


def _open_image(path: Path) -> Image.Image:
    try:
        return _decode(path.read_bytes())
    except OSError as e:
        raise BadRow("missing_image") from e


# --- sources ---------------------------------------------------------------------------------------------------


def _shapes_source(n: int, seed: int, want: Wanted | None) -> Source:
    from slimsd.toy.shapes import make_dataset

    rows = make_dataset(n, seed=seed)
    metas = [{F.CAPTION: c} for _, c in rows] if want else None
    return Source("shapes", rows, lambda row: row, meta=metas)


def _imagefolder_source(folder: Path, want: Wanted | None) -> Source:
    skipped: Counter = Counter()
    rows, metas, columns = [], [], {F.CAPTION: None}
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError:
            skipped["bad_metadata_line"] += 1
            continue
        name = meta.get("file_name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            skipped["bad_metadata_line"] += 1
            continue
        fields = _flat({k: v for k, v in meta.items() if k != "file_name"}) if want else {}
        columns |= dict.fromkeys(fields)
        caption = _caption(meta)
        if caption is None:
            skipped["missing_caption"] += 1
            continue
        rows.append((folder / name, caption))
        if want:
            metas.append(_keep(fields, want, caption))
    read = lambda row: (_open_image(row[0]), row[1])  # noqa: E731
    return Source("imagefolder", rows, read, skipped, columns=list(columns), meta=metas if want else None)


def _sidecar_source(folder: Path, want: Wanted | None) -> Source:
    skipped: Counter = Counter()
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = path.with_suffix(".txt")
        caption = _caption(txt.read_text(errors="replace")) if txt.is_file() else None
        if caption is None:
            skipped["missing_caption"] += 1
            continue
        rows.append((path, caption))
    metas = [{F.CAPTION: c} for _, c in rows] if want else None
    return Source("sidecar", rows, lambda row: (_open_image(row[0]), row[1]), skipped, meta=metas)


def _tar_paths(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    if any(c in spec for c in "*?["):
        return [Path(x) for x in sorted(glob.glob(spec))]
    return [p] if p.is_file() else []


def _webdataset_source(paths: list[Path], want: Wanted | None) -> Source:
    """Index the shards' members (offsets only); read an image's bytes on demand by seeking into the tar. A
    sample's ``.json`` is its metadata (and its caption when it has no ``.txt``)."""
    skipped: Counter = Counter()
    rows, metas, columns = [], [], {F.CAPTION: None}
    for path in paths:
        try:
            tar = tarfile.open(path)  # noqa: SIM115 (closed by the `with tar:` below)
        except (tarfile.TarError, OSError) as e:
            raise SlimsdError(f"data shard {str(path)!r} is not a readable tar file: {e}") from None
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)  # webdataset: the key ends at the first dot of the basename
                key = f"{m.name.rsplit('/', 1)[0]}/{stem}" if "/" in m.name else stem
                groups.setdefault(key, {})[ext.lower()] = m
            for key, members in groups.items():
                image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
                if image is None:
                    skipped["missing_image"] += 1
                    continue
                caption, parsed = None, None
                if "json" in members and (want or "txt" not in members):
                    try:
                        parsed = json.loads(tar.extractfile(members["json"]).read())
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        parsed = None
                fields = _flat(parsed) if want and isinstance(parsed, dict) else {}
                columns |= dict.fromkeys(fields)
                if "txt" in members:
                    caption = _caption(tar.extractfile(members["txt"]).read().decode("utf-8", "replace"))
                elif parsed is not None:
                    caption = _caption(parsed)
                if caption is None:
                    skipped["missing_caption"] += 1
                    continue
                rows.append((path, image.offset_data, image.size, caption, key))
                if want:
                    metas.append(_keep(fields, want, caption))

    def read(row):
        path, offset, size, caption, _ = row
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:  # the shard went away after indexing
            raise BadRow("missing_image") from e
        return _decode(data), caption

    return Source("webdataset", rows, read, skipped, columns=list(columns), meta=metas if want else None)


def _scalar(t) -> bool:
    import pyarrow as pa

    kinds = ("integer", "floating", "boolean", "string", "large_string", "decimal")
    return any(getattr(pa.types, f"is_{k}")(t) for k in kinds)


def _parquet_source(paths: list[Path], want: Wanted | None) -> Source:
    import pyarrow.parquet as pq

    skipped: Counter = Counter()
    rows, metas, columns = [], [], {F.CAPTION: None}
    for path in paths:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        # the first known name, in any case (LAION's metadata says TEXT)
        image_col = next((n for c in IMAGE_COLUMNS for n in names if n.casefold() == c), None)
        caption_col = next((n for c in CAPTION_KEYS for n in names if n.casefold() == c), None)
        if image_col is None or caption_col is None:
            raise SlimsdError(
                f"parquet file {str(path)!r} has columns {names}; it needs an image column (one of "
                f"{', '.join(IMAGE_COLUMNS)}) and a caption column (one of {', '.join(CAPTION_KEYS)})"
            )
        scalar = [f.name for f in pf.schema_arrow if f.name != image_col and _scalar(f.type)]
        columns |= dict.fromkeys(scalar)
        read_meta = (
            [c for c in scalar if c != caption_col and (want.observe or c.casefold() in want.names)]
            if want
            else []
        )
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=[caption_col, *read_meta])
            captions = table.column(0).to_pylist()
            values = {c: table.column(c).to_pylist() for c in read_meta}
            for r, c in enumerate(captions):
                caption = _caption(c)
                if caption is None:
                    skipped["missing_caption"] += 1
                    continue
                rows.append((str(path), g, r, image_col, caption))
                if want:
                    metas.append(
                        _keep({caption_col: c} | {k: v[r] for k, v in values.items()}, want, caption)
                    )

    cache: dict = {}

    def read(row):
        path, g, r, col, caption = row
        if cache.get("key") != (path, g):  # rows come mostly in order within a row group: keep the last one
            try:
                cache["column"] = pq.ParquetFile(path).read_row_group(g, columns=[col]).column(0)
            except OSError as e:  # the file went away or broke after indexing (pyarrow's errors are OSErrors)
                raise BadRow("missing_image") from e
            cache["key"] = (path, g)
        value = cache["column"][r].as_py()
        if isinstance(value, dict):
            value = value.get("bytes")
        if not isinstance(value, bytes | bytearray):
            raise BadRow("missing_image")
        return _decode(bytes(value)), caption

    return Source("parquet", rows, read, skipped, columns=list(columns), meta=metas if want else None)


def _cache_source(folder: Path) -> Source:
    from safetensors import safe_open

    info = json.loads((folder / "cache.json").read_text())
    if info.get("format") != CACHE_FORMAT:
        raise SlimsdError(
            f"latent cache {str(folder)!r} has format {info.get('format')!r}; expected {CACHE_FORMAT}"
        )
    rows = [(shard, i) for shard, n in info["shards"] for i in range(n)]
    handles: dict = {}

    def read(row):
        shard, i = row
        if shard not in handles:
            handles[shard] = safe_open(str(folder / shard), framework="pt")
        f = handles[shard]
        return {k: f.get_slice(k)[i : i + 1][0] for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    # rows a data_filter removed when the cache was written (their counts are in skipped too)
    filtered = list(info.get("filter", []))
    return Source("cache", rows, read, Counter(info.get("skipped", {})), info, filtered=filtered)


def open_source(spec: str, seed: int = 0, data_filter: list[str] | str | None = None) -> Source:
    """The data source for ``spec`` (see the module docstring), its rows selected by ``data_filter``."""
    rules = F.parse_rules(data_filter)
    source = index_source(spec, seed, Wanted(F.wanted(rules)) if rules else None)
    if rules:
        filter_source(source, rules, str(spec))
    source.meta = None  # read by the filter only
    return source


def filter_source(source: Source, rules: list[F.Rule], spec: str) -> None:
    """Keep the rows that pass every rule; count each rule's removed rows in ``skipped`` (``filter: RULE``). A
    rule on a column the data lacks is one line naming it and the columns the data has."""
    if (
        source.kind == "cache"
    ):  # a cache holds no metadata: it was filtered when written (cache.json says how)
        made = source.info.get("data_filter") or None
        if [r.text for r in rules] != made:
            raise F.FilterError(
                f"data {spec!r} is a latent cache made with data_filter {made}, not {[r.text for r in rules]}; "
                "a cache holds no metadata to filter: write the cache with these rules (slimsd cache --filter)"
            )
        return
    kept, source.filtered = F.select(rules, source.meta, source.columns, spec)
    source.rows = [source.rows[i] for i in kept]
    source.meta = [source.meta[i] for i in kept]
    for r in source.filtered:
        source.skipped[FILTER_PREFIX + r["rule"]] += r["removed"]


def index_source(spec: str, seed: int = 0, want: Wanted | None = None) -> Source:
    """Every usable row of ``spec``, with the metadata ``want`` asks for (None: none)."""
    spec = str(spec)
    if spec.startswith("shapes:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise SlimsdError(f"data {spec!r}: expected shapes:N with N >= 1")
        return _shapes_source(n, seed, want)
    p = Path(spec)
    if p.is_dir():
        if (p / "cache.json").is_file():
            return _cache_source(p)
        if (p / "metadata.jsonl").is_file():
            return _imagefolder_source(p, want)
        if list(p.glob("*.parquet")):
            return _parquet_source(sorted(p.glob("*.parquet")), want)
        if list(p.glob("*.tar")):
            return _webdataset_source(sorted(p.glob("*.tar")), want)
        return _sidecar_source(p, want)
    if p.suffix == ".parquet" and p.is_file():
        return _parquet_source([p], want)
    if spec.endswith(".tar") or any(c in spec for c in "*?["):
        paths = _tar_paths(spec)
        if paths:
            return _webdataset_source(paths, want)
    raise SlimsdError(
        f"data {spec!r}: not found or not understood; allowed: shapes:N, an image folder (metadata.jsonl or .txt "
        "sidecars), webdataset .tar shard(s) (path or glob), a .parquet file or folder, a `slimsd cache` folder"
    )


def describe_skipped(skipped: Counter | dict) -> str:
    """ "missing_caption 3, unreadable_image 2" (by reason; a filter rule as ``filter 'RULE' 5``), or "none"."""

    def name(k: str) -> str:
        return f"filter {k[len(FILTER_PREFIX) :]!r}" if k.startswith(FILTER_PREFIX) else k

    return ", ".join(f"{name(k)} {v}" for k, v in sorted(skipped.items())) or "none"


def row_counts(source: Source) -> dict:
    """What a run would read: rows usable, rows dropped at indexing by reason, each filter rule's count."""
    dropped = {k: v for k, v in source.skipped.items() if not k.startswith(FILTER_PREFIX)}
    return {"kind": source.kind, "rows": len(source), "dropped": dropped, "filter": source.filtered}


def check_rows(source: Source, spec: str, global_batch: int) -> None:
    """Before any work: the rows left after indexing fill at least one global batch (else one line that says
    which rows were dropped, and why)."""
    if len(source) < global_batch:
        raise SlimsdError(
            f"data {spec!r}: {len(source)} usable rows, fewer than one global batch ({global_batch}); "
            f"skipped: {describe_skipped(source.skipped)}"
        )


def nothing_readable(spec: str, rows: Counter, step: int = 0) -> SlimsdError:
    """The one line for data that yields nothing: ``rows`` counts its rows by the reason each was skipped."""
    since = f" since step {step}" if step else ""
    return SlimsdError(
        f"data {spec!r}: no row could be read{since}; skipped {sum(rows.values())} rows: {describe_skipped(rows)}"
    )

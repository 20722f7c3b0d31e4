"""File names and file identity, for every layer: the one file-name sanitiser (outputs, LoRA exports, eval
folders) and a file's sha256 (input images, LoRA files), cached while the file is unchanged."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import unicodedata
from pathlib import Path


def safe_stem(
    text: str,
    max_len: int = 60,
    *,
    keep: str = "",
    sep: str = "-",
    lower: bool = True,
    fallback: str = "image",
) -> str:
    """The one file-name sanitiser: a name fragment from any text (a prompt, an id, a model name).

    ASCII letters and digits, the characters in ``keep``, and ``sep`` for every other run of characters; no path
    separators or control characters, no leading or trailing dots or separators (never '.' or '..'), at most
    ``max_len`` characters, ``fallback`` when nothing is left."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(rf"[^A-Za-z0-9{re.escape(keep)}]+", sep, text).strip(f"{sep}.")
    text = text.lower() if lower else text
    return text[:max_len].rstrip(f"{sep}.") or fallback


def file_sha256(path) -> str:
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

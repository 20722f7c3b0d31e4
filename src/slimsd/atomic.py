"""Writes that are never seen half-done: build in a temporary sibling, then rename into place.

Temporary and set-aside names carry the writer's process id (``.NAME.tmp-PID-XXXX``, ``.NAME.old-PID-XXXX``), so
that the leftovers of a killed writer can be told from the work of a live one and removed on the next start.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimsd.errors import SlimsdError

# ".NAME.tmp-PID-..." / ".NAME.old-PID-..."; older slimsd versions wrote ".NAME.tmp-XXXX" without a pid.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?")


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def usual_mode(path: str | Path, folder: bool) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; what is renamed into place gets the mode a plain
    open()/mkdir() would have given it, so outputs are as shareable as the user's other files."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a temporary or set-aside name of these writers."""
    return _LEFTOVER.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_leftovers(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporary files and folders that a killed writer left in ``folder`` (only those of ``name``
    when given); a live process's are kept. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _LEFTOVER.match(entry.name)
        if not m or (name is not None and m["name"] != name) or (m["pid"] and _alive(int(m["pid"]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to a fresh ``.NAME.old-PID-XXXX`` sibling in one step; returns the new name."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
    os.replace(path, aside)  # a folder may replace the empty folder just made
    return aside


def remove_dir(path: str | Path) -> None:
    """Delete a folder as one step that readers see: rename it aside, then delete it (a kill in between leaves
    only an ``.old-`` sibling, which :func:`clean_leftovers` removes)."""
    shutil.rmtree(_set_aside(Path(path)), ignore_errors=True)


def check_output_dir(out: str | Path, overwrite: bool, marker: str | None = None, command: str = "") -> Path:
    """Refuse an existing, non-empty output folder unless ``overwrite`` (checked before any work starts).

    With ``marker`` (a file only ``slimsd COMMAND`` writes there, e.g. ``cache.json``), an earlier output of that
    command is named as such, and ``overwrite`` replaces only such a folder: a folder the command did not write
    is never deleted.
    """
    out = Path(out)
    if not out.exists():
        return out
    if not out.is_dir():
        raise SlimsdError(f"output path {str(out)!r} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return out
    if marker is None:
        if not overwrite:
            raise SlimsdError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
        return out
    if marker not in entries:
        raise SlimsdError(
            f"output folder {str(out)!r} is not empty and is not a `slimsd {command}` output (no {marker}; it "
            f"holds {entries[0]!r}); choose another --out"
        )
    if not overwrite:
        raise SlimsdError(
            f"output folder {str(out)!r} holds an earlier `slimsd {command}` output; pass --overwrite to replace it"
        )
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    On failure the temporary folder is removed and ``out`` (if it existed) is untouched. A killed earlier
    writer's temporary folders beside ``out`` are removed first.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    usual_mode(tmp, folder=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _set_aside(out) if out.exists() else None
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    usual_mode(tmp, folder=False)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))

"""Writes that are never seen half-done and survive a crash: build in a temporary sibling, fsync it, rename it
into place, fsync the folder that holds it.

Temporary and set-aside names carry the writer's process id (``.NAME.tmp-PID-XXXX``, ``.NAME.old-PID-XXXX``,
``.NAME.del-PID-XXXX``), so that the leftovers of a killed writer can be told from the work of a live one and
dealt with on the next start: a ``.tmp-`` is unfinished (removed), a ``.del-`` was being deleted (removed), an
``.old-`` is the previous complete copy set aside for its replacement: removed once the replacement is in
place, restored when a kill came between the set-aside and the replacement (never the only complete copy lost).

Durability: every file and folder written is fsynced before the rename, and the parent folder after it, so that
after an OS crash or a power loss ``out`` is the old copy or the new one, whole; callers that delete older copies
(checkpoints) do so only after ``atomic_dir`` returns.
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

# ".NAME.tmp-PID-..." / ".NAME.old-PID-..." / ".NAME.del-PID-..."; older slimsd versions wrote ".NAME.tmp-XXXX"
# without a pid, and set folders aside for deletion as ".old-" too.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?:(?P<pid>\d+)-)?")


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


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents (a folder's: its entries, i.e. the renames into it) to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (``root`` included), children before their folder."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
    fsync_path(root)


def make_dirs(folder: str | Path) -> None:
    """``mkdir -p`` whose new folders are on the disk: each one's entry fsynced in its parent."""
    missing, p = [], Path(folder)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        fsync_path(p.parent)


def _dead_leftovers(folder: Path, name: str | None) -> list[tuple[Path, re.Match]]:
    found = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        m = _LEFTOVER.match(entry.name)
        if m and (name is None or m["name"] == name) and not (m["pid"] and _alive(int(m["pid"]))):
            found.append((entry, m))
    return found


def _newest(paths: list[Path]) -> Path:
    return max(paths, key=lambda p: (p.lstat().st_mtime_ns, p.name))


def restore_set_aside(path: str | Path) -> bool:
    """Put back the ``.old-`` copy of a missing ``path`` that a writer killed between its set-aside and its
    replacement left (the last complete copy). Safe to run in several processes at once: one rename wins, the
    others find it gone or ``path`` there. Returns whether ``path`` was restored by this call."""
    path = Path(path)
    olds = [e for e, m in _dead_leftovers(path.parent, path.name) if m["kind"] == "old"]
    if not olds or path.exists() or path.is_symlink():
        return False
    try:
        os.replace(_newest(olds), path)
    except OSError:  # another process restored it first
        return False
    fsync_path(path.parent)
    return True


def clean_leftovers(folder: str | Path, name: str | None = None, restore: bool = True) -> list[Path]:
    """Deal with what killed writers left in ``folder`` (only the leftovers of ``name`` when given; a live
    process's are kept): an ``.old-`` copy whose name is missing is renamed back into place (it is the last
    complete copy: a kill came between the set-aside and the replacement; ``restore=False`` where the folder's
    entries are only ever set aside to be deleted, by older slimsd versions too), every other leftover is
    removed. Returns what was removed."""
    folder = Path(folder)
    if restore:
        for target in sorted({m["name"] for _, m in _dead_leftovers(folder, name)}):
            restore_set_aside(folder / target)
    removed = []
    for entry, _ in _dead_leftovers(folder, name):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _set_aside(path: Path, kind: str = "old") -> Path:
    """Rename ``path`` to a fresh ``.NAME.KIND-PID-XXXX`` sibling in one step; returns the new name."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.{kind}-{os.getpid()}-", dir=path.parent))
    os.replace(path, aside)  # a folder may replace the empty folder just made
    return aside


def remove_dir(path: str | Path) -> None:
    """Delete a folder as one step that readers see: rename it aside (``.del-``), then delete it (a kill in
    between leaves only the ``.del-`` sibling, which :func:`clean_leftovers` removes)."""
    shutil.rmtree(_set_aside(Path(path), "del"), ignore_errors=True)


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
    """Yields a temporary folder beside ``out``; on success it is fsynced (every file and folder) and replaces
    ``out`` in one rename, and the parent folder is fsynced: when this returns, the new copy is on the disk.

    On failure the temporary folder is removed and ``out`` (if it existed) is untouched. A killed earlier
    writer's leftovers beside ``out`` are dealt with first (its set-aside complete copy restored when ``out`` is
    missing, so the check of ``out`` and the caller see it).
    """
    out = Path(out)
    clean_leftovers(out.parent, out.name)
    out = check_output_dir(out, overwrite)
    make_dirs(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    usual_mode(tmp, folder=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _set_aside(out) if out.exists() else None
    os.replace(tmp, out)
    fsync_path(out.parent)  # both renames on the disk before the old copy goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _durable_temp(path: Path, data: bytes) -> str:
    """DATA in a fsynced temporary sibling of PATH (``.NAME.tmp-PID-XXXX``: a killed writer's leftover is
    recognised as such); returns the temporary file's path."""
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    usual_mode(tmp, folder=False)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename (file and folder
    fsynced)."""
    path = Path(path)
    tmp = _durable_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_new_file(folder: str | Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write DATA durably under a name that did not exist: ``stem.suffix``, else ``stem-1.suffix``, ...

    The bytes go to a fsynced temporary file first and are then hard-linked to the final name; ``link`` fails
    rather than replace an existing file, so two writers (e.g. concurrent UI requests) never overwrite each other.
    """
    folder = Path(folder)
    tmp = _durable_temp(folder / f"{stem}{suffix}", data)
    try:
        for n in range(10_000):
            path = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            fsync_path(folder)
            return path
        raise SlimsdError(f"could not find a free file name for {stem!r} in {str(folder)!r}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))

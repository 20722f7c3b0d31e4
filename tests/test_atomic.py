"""slimsd.atomic: what is renamed into place has the mode a plain open()/mkdir() gives, not mkstemp's private one;
every file and folder written is fsynced and the parent after the rename; a kill at any point of a replacement
leaves a complete copy, which the next start sees."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slimsd.atomic import atomic_dir, atomic_write_bytes, clean_leftovers, remove_dir, write_new_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_modes_of_plain_files_and_folders(tmp_path, umask_022):
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_bytes(b"x")
    plain_dir.mkdir()
    assert (mode(plain_file), mode(plain_dir)) == (0o644, 0o755)  # what this umask gives

    atomic_write_bytes(tmp_path / "a.bin", b"data")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
    png = write_new_file(tmp_path / "images", "00000-1-a-red-circle", ".png", b"png")
    assert mode(tmp_path / "a.bin") == mode(plain_file)
    assert mode(tmp_path / "folder") == mode(plain_dir)
    assert mode(png) == mode(plain_file)


def test_a_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"data")
        with atomic_dir(tmp_path / "folder"):
            pass
    finally:
        os.umask(old)
    assert (mode(tmp_path / "a.bin"), mode(tmp_path / "folder")) == (0o600, 0o700)


# --- durability: fsync of every file and folder, the parent after the rename --------------------------------


def record_fsyncs(monkeypatch, watch: Path) -> list[tuple[str, bool]]:
    """Every fsync as (the path of the fd, whether ``watch`` existed at that moment)."""
    calls, real = [], os.fsync

    def fsync(fd):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), watch.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_every_file_and_folder_is_fsynced_before_the_rename_and_the_parent_after_it(tmp_path, monkeypatch):
    out = tmp_path / "new" / "out"  # "new" does not exist yet: its entry in tmp_path must be made durable too
    calls = record_fsyncs(monkeypatch, out)
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub" / "deeper").mkdir(parents=True)
        (tmp / "sub" / "b.bin").write_bytes(b"b")
        (tmp / "sub" / "deeper" / "c").write_bytes(b"c")
    before = {p.replace(str(tmp), str(out)) for p, existed in calls if not existed and p.startswith(str(tmp))}
    written = {str(p) for p in out.rglob("*")} | {str(out)}
    assert before == written  # each file and folder, while still the temporary copy
    assert (str(out.parent), True) in calls  # the rename itself, after it happened
    assert (str(tmp_path), False) in calls  # the new folder's entry

    calls.clear()
    atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert [p for p, _ in calls][-1] == str(tmp_path)  # the file's rename
    assert any(p.startswith(str(tmp_path / ".f.bin.tmp-")) for p, _ in calls)  # the file, before


# --- a kill at each point of a replacement: a complete copy survives, and the next start sees it ----------------

KILLER = """
import os, signal, sys
from pathlib import Path
from slimsd.atomic import atomic_dir

out, point = Path(sys.argv[1]), sys.argv[2]
real, calls = os.replace, []

def replace(a, b):  # 1: out set aside, 2: the new copy into place
    calls.append(b)
    if point == f"before-{len(calls)}":
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
    if point == f"after-{len(calls)}":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
with atomic_dir(out, overwrite=True) as tmp:
    (tmp / "a.txt").write_text("new")
    if point == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
    (tmp / "b.txt").write_text("new")
"""
POINTS = {  # kill point -> the copy the next start must see, and what the kill left beside it
    "writing": ("old", {"out", ".tmp-"}),
    "before-1": ("old", {"out", ".old-", ".tmp-"}),  # written, out not yet set aside (its new name made)
    "after-1": ("old", {".old-", ".tmp-"}),  # between the set-aside and the replacement: out is missing
    "after-2": ("new", {"out", ".old-"}),  # replaced, the old copy not yet deleted
}


def kinds(folder: Path) -> set[str]:
    return {"out" if p.name == "out" else p.name[4:9] for p in folder.iterdir()}


def contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_of_a_replacement_leaves_a_complete_copy_that_the_next_start_sees(
    tmp_path, point
):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "b.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), point], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    want, left = POINTS[point]
    assert kinds(tmp_path) == left  # the kill came where it was meant to
    expected = {"a.txt": want, "b.txt": want}

    with atomic_dir(out, overwrite=True) as tmp:  # the next start (another process: the killed pid is dead)
        seen = contents(out)
        (tmp / "a.txt").write_text("third")
    assert seen == expected
    assert kinds(tmp_path) == {"out"} and contents(out) == {"a.txt": "third"}


def test_a_start_restores_a_set_aside_copy_and_never_a_deleted_one(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".final.old-{dead.pid}-x").mkdir()
    (tmp_path / f".final.old-{dead.pid}-x" / "model").write_text("complete")
    (tmp_path / f".final.tmp-{dead.pid}-y").mkdir()  # the unfinished replacement
    (tmp_path / f".run.del-{dead.pid}-z").mkdir()  # a folder being deleted (remove_dir)
    (tmp_path / f".gone.old-{dead.pid}-w").mkdir()  # set aside, its name is there: the old copy goes
    (tmp_path / "gone").mkdir()
    (tmp_path / f".live.old-{os.getpid()}-v").mkdir()  # a live writer's: left alone
    removed = clean_leftovers(tmp_path)
    assert sorted(p.name[:6] for p in removed) == [".final", ".gone.", ".run.d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".live.old-{os.getpid()}-v", "final", "gone"]
    assert (tmp_path / "final" / "model").read_text() == "complete"

    remove_dir(tmp_path / "gone")
    assert clean_leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir())[1:] == ["final"]

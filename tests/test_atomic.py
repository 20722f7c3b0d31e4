"""slimsd.atomic: what is renamed into place has the mode a plain open()/mkdir() gives, not mkstemp's private one."""

from __future__ import annotations

import os
import stat

import pytest

from slimsd.atomic import atomic_dir, atomic_write_bytes
from slimsd.run.outputs import write_new_file


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

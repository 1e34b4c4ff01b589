"""rfbench.results.atomic: the one atomic write (mode from the umask, no symlinks, no half files)."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from rfbench.errors import DataError
from rfbench.results.atomic import atomic_write, file_mode, temporary_owner, write_text


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_written_file_has_the_umask_mode(tmp_path, umask_027):
    path = write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask_027 == 0o640
    assert file_mode() == 0o640
    # the same as a plain open() would give
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(plain.stat().st_mode) == stat.S_IMODE(path.stat().st_mode)


def test_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.txt"
    write_text(path, "one")
    write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_text(tmp_path / "r.txt", "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_temporary_names_are_unique_per_process(tmp_path):
    seen = []

    def record(tmp):
        seen.append(os.path.basename(tmp))
        open(tmp, "w").close()

    atomic_write(tmp_path / "r", record)
    atomic_write(tmp_path / "r", record)
    assert seen[0] != seen[1] and all(f".r.{os.getpid()}@" in s and s.endswith(".tmp") for s in seen)
    # the name says whose it is, so start-up deletes only the temporaries of dead writers
    assert {temporary_owner(tmp_path / s) for s in seen} == {(socket.gethostname(), os.getpid())}
    assert temporary_owner(tmp_path / ".r.123.tmp") is None


def test_refuses_to_write_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(DataError, match="symbolic link"):
        write_text(link, "new")
    assert target.read_text() == "keep me" and link.is_symlink()

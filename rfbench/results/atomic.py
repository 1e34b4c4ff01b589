"""The one atomic file write of rfbench (results, captures, report pages).

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary file beside ``path`` whose name
is unique to this process and call (``.<name>.<pid>@<host>.<random>.tmp``, created with O_EXCL,
so two writers sharing a folder never write to one file, and ``temporary_owner`` can tell whose
it is), flushes it to disk (fsync), gives it the
mode an ordinary ``open()`` would (0o666 masked by the umask: mkstemp alone leaves 0600, which
another user of a shared results folder could not read) and moves it onto ``path`` with
``os.replace`` (atomic on POSIX): a reader sees the old file or the new one, never half of one.
A killed write leaves only a ``.*.tmp`` file, which readers ignore (and which
``rfbench.results.store.remove_stale_temporaries`` deletes once its owner is dead).

``path`` must not be a symbolic link: replacing it would silently cut the link (or, written in
place, write through it into a file elsewhere); DataError says so instead.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from rfbench.errors import DataError

TMP_SUFFIX = ".tmp"
_OWNER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[^@/]+)\.[^.]+\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is racy)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file: what ``open(path, "w")`` would give (0o666 & ~umask)."""
    return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then move the file onto ``path`` atomically; return ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_symlink():
        raise DataError(f"{path} is a symbolic link; rfbench does not write through links (remove it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{os.getpid()}@{_host()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every filesystem lets a folder be fsync'ed
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary file of an unfinished write (readers skip these)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def _host() -> str:
    return socket.gethostname().replace("@", "_").replace("/", "_")


def temporary_owner(path: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of the writer of a temporary file, or None when its name does not say
    (files of older rfbench versions)."""
    m = _OWNER.match(Path(path).name)
    return None if m is None else (m["host"], int(m["pid"]))

"""Many writers, one results folder: cell claims with a heartbeat, the folder lock, owners.

    with Claims(out, run_id) as claims:
        if claims.claim(cell):          # False: another live writer holds it
            ...compute, store.write_cell(...)
            claims.release(cell)

A writer claims a cell before computing it by creating ``<out>/claims/<cell>.claim`` with
``O_CREAT | O_EXCL`` (exactly one creator wins, on a local disk and on NFS alike). The file holds
its owner (host, pid, run id); a thread refreshes the mtime of every claim it holds each
``heartbeat_s`` seconds. A claim is *stale*, and may be taken over, when its owner is a process
of this host that no longer exists (at once), or when its heartbeat is older than
``stale_after_s`` (default ``STALE_AFTER_S``, 120 s: a writer on another host that died, or was
frozen that long). Taking over happens under the folder lock and re-checks staleness there, so
two writers never both take one stale claim.

The folder lock (``folder_lock``: ``fcntl.flock`` on ``<out>/.rfbench.lock``) also serialises
consolidation and the quarantine of damaged files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from rfbench.results.atomic import file_mode

CLAIMS_DIR = "claims"
LOCK_FILE = ".rfbench.lock"
#: Seconds without a heartbeat after which a claim by a process of another host is stale.
STALE_AFTER_S = 120.0


def host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(owner_host: str | None, pid: int | None, mtime: float, stale_after_s: float) -> bool:
    """Whether a file's writer is gone: a dead process of this host, or silent for too long."""
    if owner_host == host() and pid is not None and not pid_alive(pid):
        return True
    return time.time() - mtime > stale_after_s


@contextlib.contextmanager
def folder_lock(out: str | os.PathLike):
    """Hold the folder's exclusive lock (blocking) for the ``with`` block."""
    path = Path(out) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_claim(path: Path) -> dict | None:
    """The owner and mtime of a claim file (None when it is gone); ``{}`` fields when unreadable."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:  # being written this instant, or damaged: judged by its age alone
        owner = {}
    if not isinstance(owner, dict):
        owner = {}
    return {**owner, "mtime": mtime}


def claim_is_stale(info: dict, stale_after_s: float | None = None) -> bool:
    pid = info.get("pid")
    limit = STALE_AFTER_S if stale_after_s is None else stale_after_s
    return owner_gone(info.get("host"), pid if isinstance(pid, int) else None, info["mtime"], limit)


def list_claims(out: str | os.PathLike) -> dict[str, dict]:
    """``{cell: owner}`` of the claims in a folder (the cells being computed now), each owner
    with ``host``, ``pid``, ``run_id``, ``mtime`` (last heartbeat) and ``stale``."""
    folder = Path(out) / CLAIMS_DIR
    found = {}
    for p in sorted(folder.glob("*.claim")) if folder.is_dir() else []:
        info = read_claim(p)
        if info is not None:
            found[p.stem] = {**info, "stale": claim_is_stale(info)}
    return found


class Claims:
    """The claims of one writer (``run_id``) in results folder ``out``; see the module doc."""

    def __init__(
        self,
        out: str | os.PathLike,
        run_id: str,
        *,
        stale_after_s: float | None = None,
        heartbeat_s: float | None = None,
    ):
        self.folder = Path(out) / CLAIMS_DIR
        self.out = Path(out)
        self.run_id = run_id
        self.stale_after_s = float(STALE_AFTER_S if stale_after_s is None else stale_after_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(self.stale_after_s / 8, 0.05)
        self.held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, cell: str) -> Path:
        return self.folder / f"{cell}.claim"

    # ------------------------------------------------------------------ claiming
    def claim(self, cell: str) -> bool:
        """Claim ``cell``; False when another live writer holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._create(cell):
            return True
        info = read_claim(self.path(cell))
        if info is not None and not claim_is_stale(info, self.stale_after_s):
            return False
        with folder_lock(self.out):  # take over a stale claim: re-judged under the lock
            info = read_claim(self.path(cell))
            if info is not None:
                if not claim_is_stale(info, self.stale_after_s):
                    return False
                self.path(cell).unlink(missing_ok=True)
            return self._create(cell)

    def _create(self, cell: str) -> bool:
        try:
            fd = os.open(self.path(cell), os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        except FileExistsError:
            return False
        try:
            owner = {"host": host(), "pid": os.getpid(), "run_id": self.run_id, "time": time.time()}
            os.write(fd, json.dumps(owner).encode())
        finally:
            os.close(fd)
        with self._lock:
            self.held.add(cell)
        return True

    def release(self, cell: str) -> None:
        """Give ``cell`` up (after its file is written, or when it turned out to be done)."""
        with self._lock:
            self.held.discard(cell)
        info = read_claim(self.path(cell))
        if info is not None and info.get("run_id") == self.run_id:
            self.path(cell).unlink(missing_ok=True)

    # ------------------------------------------------------------------ heartbeat
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                held = list(self.held)
            for cell in held:
                with contextlib.suppress(OSError):  # released meanwhile, or the disk is gone
                    os.utime(self.path(cell))

    def __enter__(self) -> Claims:
        self._thread = threading.Thread(target=self._beat, name="rfbench-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for cell in list(self.held):
            with contextlib.suppress(OSError):
                self.release(cell)

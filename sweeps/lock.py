"""One sweep, one driver: the driver running a sweep holds an exclusive lock on
``<sweep folder>/driver.lock``, and the file names the holder (host, pid, start time) in JSON so
that a second driver is refused with a line a user can act on.

The lock is an ``flock(2)`` lock, held by the kernel for as long as the driver's file stays open:
a driver that dies (SIGKILL, a crash) releases it with its last file descriptor, so a stale
``driver.lock`` never blocks the next ``--resume`` (its JSON is just overwritten). Across nodes
the lock holds where the shared file system carries it: Linux's NFS client turns ``flock`` into
an NFS byte-range lock on the whole file (NFSv4, or NFSv3 with the lock manager), released by the
server when the holder's lease expires (NFSv4: 90 s by default) if the holding node is lost;
mounts with ``local_lock=flock|all`` and file systems without distributed locks (some FUSE
mounts, Lustre without ``-o flock``) keep the lock per node, and then only the holder's JSON is
shared.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from sweeps.errors import UsageError

LOCK_NAME = "driver.lock"


class SweepLock:
    """The held lock of one sweep folder; :meth:`release` (or the process's end) lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def forget(self) -> None:
        """Close this process's copy after a fork without unlocking: the other copy holds it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


def holder(path: Path) -> dict:
    """The JSON a lock file's holder wrote ({} if unreadable: it was being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    """``pid P on host H since TIME`` for a holder's JSON."""
    if not info:
        return "another driver (its details are not written yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} since {started}"


def acquire(folder: Path, flag: str) -> SweepLock:
    """Hold ``folder``'s lock (creating the folder and the file) or raise :class:`UsageError`
    naming the driver that holds it; ``flag`` (``--resume NAME``, ``--name NAME``) starts the
    message. The file descriptor is not inherited by Ray's processes (PEP 446)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{flag}: the sweep in {folder} is being run by {describe(holder(path))}; "
                         f"wait for it to end or stop it, then resume") from None
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "argv": sys.argv})
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    return SweepLock(path, fd)

"""One run per run folder: an exclusive OS lock on ``RUNDIR/.lock`` for as long as ``train`` runs.

The lock is a POSIX record lock (``fcntl.lockf``) on a file in the run folder: the kernel
releases it when the process ends, however it ends (``kill -9`` included), so a stale lock
cannot outlive its holder, and NFS (with ``lockd``) honours it across machines. The file
itself stays (removing it would race with the next holder) and holds one JSON line naming
the holder: host, pid, start time and command. Under DDP rank 0 holds the lock for the run.

Two things follow from the lock being per process (POSIX semantics): a process that holds
it must not open the file again (closing any descriptor of it releases the lock), so the
holder remembers its folders in ``_HELD`` and refuses a second run of its own without
opening the file; and a forked DataLoader worker does not inherit it.

On a file system without locks (some FUSE and object-store mounts), taking the lock fails
with ``ENOLCK`` / ``EOPNOTSUPP``: the run goes on with a warning that nothing stops a second
run on the same folder.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..data.remote import redact
from .errors import UserError, warn

__all__ = ["LOCK_NAME", "RunFolderLock", "describe_holder"]

LOCK_NAME = ".lock"
_HELD: set[str] = set()  # run folders this process holds (resolved paths)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_BUSY = {errno.EACCES, errno.EAGAIN}


def describe_holder(text: str) -> str:
    """``pid P on host H, started T`` from a lock file's JSON line ('another process' if unreadable)."""
    try:
        holder = json.loads(text.strip().splitlines()[0])
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(holder["started"])))
        return f"pid {int(holder['pid'])} on host {holder['host']}, started {started}"
    except (ValueError, KeyError, TypeError, IndexError):
        return "another process (it has not written its name yet)"


class RunFolderLock:
    """The exclusive lock of one run folder.

    Args:
        folder: the run folder (``--out``).

    ``acquire(create=False)`` takes the lock only if the lock file exists (it writes nothing:
    a start that is refused later leaves the folder as it was); ``acquire(create=True)``
    creates the folder and the file when missing, takes the lock and writes the holder's line.
    Both raise ``UserError`` naming the holder when another process has it.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.supported = True
        self.written = False  # our line is in the file

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _key(self) -> str:
        return str(self.folder.resolve())

    def _refuse(self, holder: str) -> UserError:
        return UserError(
            f"the run folder {self.folder} is in use by another run ({holder}); wait for it to end or stop it "
            "(its checkpoint is kept), or choose another --out"
        )

    def acquire(self, create: bool, check: Callable[[], object] | None = None) -> None:
        """Take the lock (see the class); with ``create``, run ``check`` (which may refuse) and write our line."""
        if self.fd is None and self.supported:
            self._take(create)
        if create and check is not None:
            check()
        if create and self.fd is not None and not self.written:
            self._write_holder()

    def _take(self, create: bool) -> None:
        if self._key() in _HELD:
            raise self._refuse(f"pid {os.getpid()} on host {socket.gethostname()}: this process")
        if not create and not self.path.is_file():
            return
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            return  # removed since the check: taken with create=True later
        try:
            import fcntl

            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            os.close(fd)
            self._unsupported("this platform has no fcntl")
            return
        except OSError as error:
            holder = ""
            if error.errno in _BUSY:
                with open(fd, encoding="utf-8", errors="replace", closefd=True) as handle:
                    holder = handle.read(4096)
                raise self._refuse(describe_holder(holder)) from None
            os.close(fd)
            if error.errno in _NO_LOCKS:
                self._unsupported(os.strerror(error.errno or 0))
                return
            raise
        self.fd = fd
        _HELD.add(self._key())

    def _write_holder(self) -> None:
        """Our line in the lock file (written in place: the lock is on this very file)."""
        assert self.fd is not None
        line = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.time(),
                "command": redact(" ".join(sys.argv))[:500],  # no credentials of a --data URL
            }
        )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (line + "\n").encode(), 0)
        self.written = True

    def _unsupported(self, why: str) -> None:
        self.supported = False
        warn(
            f"the file system of {self.folder} does not lock files ({why}): nothing stops a second run on this "
            "folder, so start one run per --out"
        )

    def release(self) -> None:
        """Let the lock go (the file stays, naming the last holder)."""
        if self.fd is None:
            return
        _HELD.discard(self._key())
        try:
            os.close(self.fd)  # closing releases the POSIX lock
        finally:
            self.fd, self.written = None, False

"""One run per run folder: an exclusive OS lock on ``RUNDIR/.lock`` for as long as ``train`` (or ``embed``) runs.

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

A first start that is refused once it holds the lock (W&B or TensorBoard cannot start) takes
back what it created: the lock file and the folders it made, so the refusal leaves no trace.
Removing a lock file is safe because a taker checks, once locked, that the path still names
the file it locked, and starts over when it does not.
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


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not removed, not replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


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
            "(a stopped train or embed keeps what it saved and continues with --resume), or choose another --out"
        )

    def acquire(self, create: bool, check: Callable[[], object] | None = None) -> None:
        """Take the lock (see the class); with ``create``, run ``check`` (which may refuse) and write our line.

        When ``check`` refuses, the lock file and the folders this call created are removed again.
        """
        created: list[Path] = []
        if self.fd is None and self.supported:
            created = self._take(create)
        if create and check is not None:
            try:
                check()
            except BaseException:
                self._take_back(created)
                raise
        if create and self.fd is not None and not self.written:
            self._write_holder()

    def _take(self, create: bool) -> list[Path]:
        """Lock the file; returns what it created (folders, outermost first, then the lock file)."""
        for _ in range(100):  # another taker's refused first start may remove the file under us
            created = self._take_once(create)
            if created is not None:
                return created
        raise UserError(f"could not lock {self.path}: it is removed and made again without end; choose another --out")

    def _take_back(self, created: list[Path]) -> None:
        """Undo a refused start: let the lock go; remove the lock file and the folders this process created."""
        if created and created[-1] == self.path:
            self.path.unlink(missing_ok=True)  # while locked: a taker that opened it meanwhile starts over
        self.release()  # a refused start on an existing folder too (the process may go on: a test, a script)
        for folder in reversed([path for path in created if path != self.path]):
            try:
                folder.rmdir()  # only while empty: anything another process put there stays
            except OSError:
                break

    def _take_once(self, create: bool) -> list[Path] | None:
        """One try of ``_take``: ``None`` when the file locked is no longer the one at the path."""
        if self._key() in _HELD:
            raise self._refuse(f"pid {os.getpid()} on host {socket.gethostname()}: this process")
        if not create and not self.path.is_file():
            return []
        created: list[Path] = []
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if create:  # a folder that cannot be made raises here, as it is
            created = [folder for folder in (self.folder, *self.folder.parents) if not folder.exists()][::-1]
            self.folder.mkdir(parents=True, exist_ok=True)
        try:
            if create:
                try:
                    fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                    created.append(self.path)
                except FileExistsError:
                    fd = os.open(self.path, flags)
            else:
                fd = os.open(self.path, flags)
        except FileNotFoundError:  # removed since the check
            if create and not self.folder.is_dir():
                raise
            return None if create else []  # (without create: taken with create=True later)
        try:
            import fcntl

            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            os.close(fd)
            self._unsupported("this platform has no fcntl")
            return created
        except OSError as error:
            holder = ""
            if error.errno in _BUSY:
                with open(fd, encoding="utf-8", errors="replace", closefd=True) as handle:
                    holder = handle.read(4096)
                raise self._refuse(describe_holder(holder)) from None
            os.close(fd)
            if error.errno in _NO_LOCKS:
                self._unsupported(os.strerror(error.errno or 0))
                return created
            raise
        if not _same_file(fd, self.path):  # a refused first start removed it while we waited: start over
            os.close(fd)
            return None
        self.fd = fd
        _HELD.add(self._key())
        return created

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

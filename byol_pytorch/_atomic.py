"""Atomic file writes: a temp file in the same folder, fsynced, then renamed over the target.

``os.replace`` is atomic on POSIX and Windows: a crash or a kill while writing leaves the previous
file intact. Temp files of writers that were killed mid-write are removed on the next write.
Shared by the data layer (the folder index cache) and the training runtime (checkpoints, exports).
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ._modules import PathLike

__all__ = ["STALE_TEMP_SECONDS", "atomic_write", "names_the_file", "remove_stale_temps"]

STALE_TEMP_SECONDS = 3600.0
_CAN_PROBE_PIDS = os.name != "nt"  # on Windows signal 0 is CTRL_C_EVENT: it would interrupt, not probe
"""A temp file without a recognisable writer older than this is removed as stale."""


def _current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this machine; None where that cannot be asked (Windows)."""
    if pid == os.getpid():
        return True
    if not _CAN_PROBE_PIDS:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Remove the temp files an interrupted ``atomic_write`` of ``path`` left behind.

    Temp files are named ``.{name}.{pid}.{random}.tmp``: one whose writer process is gone
    (killed during a save) is removed; one of a live process is kept (it may be writing
    right now). Older names without a pid, and every temp file where a process cannot be
    asked about (Windows), are removed after ``STALE_TEMP_SECONDS``.

    Args:
        path: the final file whose stale temp files to remove.

    Returns:
        The files removed.
    """
    path = Path(path)
    removed: list[Path] = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for temp in candidates:
        middle = temp.name[len(path.name) + 2 : -len(".tmp")]
        pid_text = middle.split(".", 1)[0]
        try:
            alive = _pid_alive(int(pid_text)) if pid_text.isdigit() and "." in middle else None
            if alive is None:  # no pid in the name, or no way to ask: by age
                stale = time.time() - temp.lstat().st_mtime > STALE_TEMP_SECONDS
            else:
                stale = not alive
            if stale and temp.is_file():
                temp.unlink()
                removed.append(temp)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _refuse_special(path: Path) -> None:
    """An ``OSError`` for a device, FIFO or socket at ``path`` itself (a rename would put a file in place of
    ``/dev/null`` when run as root); a symbolic link is replaced, as ever, never its target."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there yet (or nothing we may look at: the write will say)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise OSError(errno.EINVAL, "not a file but a device, FIFO or socket, which a write would replace", str(path))


def atomic_write(path: PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(temp_path)``, fsync the file, then rename it to ``path``.

    The temp file (``.{name}.{pid}.XXXX.tmp`` in the same folder) gets the mode a plain
    ``open`` would give (``0o666`` minus the umask) before the rename; temp files of
    earlier writes that were killed mid-save are removed first (``remove_stale_temps``).

    Args:
        path: the final file; its folder is created when missing.
        write: writes the content to the temporary path it is given.

    Returns:
        ``path`` as a ``Path``.

    A symbolic link at ``path`` is replaced by the file (its target is left as it was).

    Raises:
        OSError: the folder cannot be created or written (full disk, read-only file
            system, permissions), or ``path`` is a device, FIFO or socket; ``path`` is then
            left as it was.
    """
    path = Path(path)
    _refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # the folder takes no file: name the file asked for, not the temp
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_current_umask())
        os.replace(temp, path)
    except BaseException as error:
        if os.path.exists(temp):
            os.remove(temp)
        if isinstance(error, OSError) and error.errno is not None and error.filename in (None, temp):
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error  # name the file
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


@contextmanager
def names_the_file(path: PathLike) -> Iterator[None]:
    """An ``OSError`` without a file name inside (a write to an open file: a full disk) gets ``path``.

    The command line's one error line then says which file, or which folder, the error is about.
    """
    try:
        yield
    except OSError as error:
        if error.errno is not None and error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise

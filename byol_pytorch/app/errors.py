"""How the command line speaks to its user: one-line errors and warnings.

This module imports nothing of the package, so every command can use it without
pulling in the others (and without import circles).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "PROG",
    "UserError",
    "before_the_group",
    "debug_enabled",
    "describe_os_error",
    "is_out_of_memory",
    "last_line",
    "launched_processes",
    "one_line",
    "prints_node_errors",
    "signals_raise",
    "warn",
]

PROG = "byol-pytorch"


class UserError(Exception):
    """Bad input from the user: the command prints the message as one line and exits 1."""


def launched_processes() -> int:
    """The processes a launcher (torchrun) started for this job, from ``WORLD_SIZE``: 1 outside one."""
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() and int(world) > 1 else 1


def prints_node_errors() -> bool:
    """Whether this process prints an error that every process of its node meets alike, before the processes can
    agree on who prints (bad flags, a command that runs in one process, a device the node lacks): outside a
    launcher, yes; under torchrun, only the node's first process (``LOCAL_RANK`` 0), so that each node's log
    has the line once."""
    return launched_processes() == 1 or os.environ.get("LOCAL_RANK", "0") == "0"


def before_the_group(error: BaseException) -> BaseException:
    """``error``, met before the process group exists: quiet (``cli.main`` exits 1 without the line) unless this
    process ``prints_node_errors``."""
    if not prints_node_errors():
        error.byol_pytorch_quiet = True  # type: ignore[attr-defined]
    return error


def one_line(message: object) -> str:
    """The message with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())


def is_out_of_memory(error: BaseException) -> bool:
    """Python's ``MemoryError``, CUDA's ``torch.OutOfMemoryError`` or the CPU allocator's out-of-memory error."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "DefaultCPUAllocator" in text


def last_line(error: BaseException) -> str:
    """The message of ``error`` without a loader worker's or a collective's traceback text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == type(error).__name__ else last


def warn(message: str) -> None:
    """One warning line on stderr, prefixed like the command's errors (above a progress bar, not inside it)."""
    line = f"{PROG}: warning: {one_line(message)}"
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, file=sys.stderr, flush=True)
        return
    tqdm.write(line, file=sys.stderr)


DEBUG_ENV = "BYOL_PYTORCH_DEBUG"

# errno -> (what happened, what to do); "{path}" is the file or folder the call named.
_FREE_SPACE = "free space there or choose another --out"
_PERMISSIONS = "fix its permissions or choose another location"
_FEWER_FILES = "lower --workers, or raise the limit ('ulimit -n') or close other programs"
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device holding {path}", _FREE_SPACE),
    errno.EDQUOT: ("the disk quota is exhausted for {path}", _FREE_SPACE),
    errno.EROFS: ("{path} is on a read-only file system", "choose a writable --out (or remount it read-write)"),
    errno.EACCES: ("permission denied for {path}", _PERMISSIONS),
    errno.EPERM: ("operation not permitted on {path}", _PERMISSIONS),
    errno.EEXIST: ("{path} already exists and is not a folder", "remove it or choose another --out"),
    errno.ENOTDIR: ("a part of {path} is a file, not a folder", "choose a path whose parents are folders"),
    errno.EISDIR: ("{path} is a folder where a file was expected", "pass a file"),
    errno.ENOENT: ("{path} does not exist", "check the path"),
    errno.EIO: ("an input/output error on {path}", "check the disk or network file system, then retry"),
    errno.EMFILE: ("too many open files in this process (at {path})", _FEWER_FILES),
    errno.ENFILE: ("too many open files on the system (at {path})", _FEWER_FILES),
    errno.ENAMETOOLONG: ("the name {path} is too long", "choose a shorter path"),
}


def describe_os_error(error: OSError) -> str:
    """One line for an ``OSError``: the problem, the path it concerns, and the fix.

    Args:
        error: e.g. ``OSError(ENOSPC)`` from a checkpoint save.

    Returns:
        The message (without the ``byol-pytorch: error:`` prefix). Files saved before
        the error are said to be intact: every write of ours is atomic.
    """
    path = error.filename if error.filename is not None else "a file"
    path = repr(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    known = _OS_ERRORS.get(error.errno) if error.errno is not None else None
    if known is None:
        reason = error.strerror or str(error) or type(error).__name__
        return one_line(f"{reason} ({path}); check the path and the file system (files saved earlier are intact)")
    what, fix = known
    return one_line(f"{what.format(path=path)}: {fix} (files saved earlier are intact)")


def debug_enabled(flag: bool = False) -> bool:
    """Whether errors show their traceback: ``--debug`` or ``BYOL_PYTORCH_DEBUG=1``."""
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def signals_raise(signals: tuple[int, ...], stop: Callable[[int], BaseException]) -> Iterator[None]:
    """Inside the block, each of ``signals`` raises ``stop(signum)`` at once (in the main thread; elsewhere nothing
    changes), so that the work in progress unwinds through its clean-up; the handlers are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise stop(signum)

    previous = [(sig, signal.signal(sig, handler)) for sig in signals]
    try:
        yield
    finally:
        for sig, old in previous:
            signal.signal(sig, old)

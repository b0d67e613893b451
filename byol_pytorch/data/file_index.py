"""The file list of an image folder, compact and cacheable: one bytes blob, one offset array.

A Python list of ``Path`` objects costs hundreds of bytes per image in the process that
builds it, and every DataLoader worker that reads the list writes to the objects'
reference counts, so the operating system copies their pages into each worker
(benchmarks/results/data_index.md has the figures). ``FileIndex`` keeps the
relative paths as one ``uint8`` array of their UTF-8 (file system encoded) bytes and one
``int64`` array of offsets: a few tens of bytes per image, nothing a reader writes to, and a
path is made on demand.

The scan (``index_images``) lists each folder once with ``os.scandir`` and decides from
the directory entry's type whether an entry is a regular file, a folder or a link; only
links are followed with a ``stat``. The order is the order of the sorted ``Path`` list the
package always used: component by component.

The cache (``load_or_scan``): the index is saved to a file with its key, the resolved
root and, for every folder walked, its ``st_mtime_ns`` and inode. Adding, removing or
renaming an entry changes the modification time of the folder holding it, so a later
start only ``stat``s the folders it recorded (no per-file work) and reuses the index when
none changed. Edits to the content of existing files do not change a folder's time and
are not detected: they need not be, since only names are indexed (a file that turned
unreadable is passed over when loaded, as always). Not covered: links to files or
folders outside the indexed tree changing where they point outside it. A folder modified
less than ``RACY_NS`` before its scan began is not trusted (its time may not have
changed within the clock's resolution), so such an index is rebuilt on the next start.
A cache file that cannot be read, fails its checks or belongs to another folder is
ignored and rewritten: it is never trusted, and never an error.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write
from .._modules import PathLike, user_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "INDEX_CACHE_NAME",
    "RACY_NS",
    "FileIndex",
    "TarsBesideImagesWarning",
    "check_folder",
    "index_images",
    "load_cached_index",
    "load_or_scan",
    "scan_with_cache",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".jfif",  # JPEG as Windows browsers save it
    ".jpe",
    ".avif",  # decoded where PIL.features.check("avif"); elsewhere passed over (counted) as unreadable
)

INDEX_CACHE_NAME = "file_index.npz"
"""The file name ``byol-pytorch train`` keeps the index under in its run folder."""

RACY_NS = 2_000_000_000
"""Folders modified less than 2 s before the scan began are not trusted in a cache (FAT's
time resolution is 2 s; ext4, XFS, btrfs and APFS record nanoseconds)."""

_FORMAT_VERSION = 3  # 2: run folders under the root left out (a cache of version 1 may list their pictures);
# 3: links to folders above the root not walked (a cache of version 2 may list images reached through one)
_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)


def _empty(dtype: type) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


class FileIndex:
    """Relative paths of image files under ``root``, stored as one bytes blob and offsets.

    ``index[i]`` is ``root / relative_path_i`` (a ``Path`` made on demand); no
    per-file Python object is kept, so DataLoader workers that read every entry share
    the arrays' pages with the main process instead of copying them.

    Args:
        root: the folder the paths are relative to (kept as given).
        blob: ``uint8`` array, the relative paths' bytes (``os.fsencode``, ``/``-separated)
            one after the other.
        offsets: ``int64`` array of ``len + 1`` entries; path ``i`` is
            ``blob[offsets[i]:offsets[i + 1]]``.
        passed_over: entries with an image suffix that were not regular files.

    Examples:
        >>> index = FileIndex.from_relative("data", ["a/x.jpg", "b.png"])
        >>> len(index), index[1].as_posix(), index.relative(0)
        (2, 'data/b.png', 'a/x.jpg')
    """

    def __init__(self, root: PathLike, blob: np.ndarray, offsets: np.ndarray, passed_over: int = 0) -> None:
        self.root = Path(root)
        self.blob = np.ascontiguousarray(blob, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.passed_over = int(passed_over)

    @classmethod
    def from_relative(cls, root: PathLike, relative: list[str], passed_over: int = 0) -> FileIndex:
        """An index of ``relative`` paths (``/``-separated, in the order given)."""
        encoded = [os.fsencode(name) for name in relative]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return cls(root, blob.copy(), offsets, passed_over)

    @classmethod
    def concat(cls, root: PathLike, parts: list[tuple[str, FileIndex]]) -> FileIndex:
        """One index of several: each part's paths prefixed with its folder name and ``/``."""
        blobs, lengths, passed_over = [], [], 0
        for prefix, part in parts:
            head = np.frombuffer(os.fsencode(prefix) + b"/", dtype=np.uint8)
            sizes = np.diff(part.offsets)
            owner = np.repeat(np.arange(len(part), dtype=np.int64), sizes)  # the entry each byte belongs to
            body = np.empty(len(part.blob) + len(part) * len(head), dtype=np.uint8)
            body[np.arange(len(part.blob), dtype=np.int64) + (owner + 1) * len(head)] = part.blob
            starts = part.offsets[:-1] + np.arange(len(part), dtype=np.int64) * len(head)  # (n,)
            body[starts[:, None] + np.arange(len(head))] = head  # (n, len(head))
            blobs.append(body)
            lengths.append(sizes + len(head))
            passed_over += part.passed_over
        all_lengths = np.concatenate(lengths) if lengths else _empty(np.int64)
        offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
        np.cumsum(all_lengths, out=offsets[1:])
        return cls(root, np.concatenate(blobs) if blobs else _empty(np.uint8), offsets, passed_over)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _bounds(self, index: int) -> tuple[int, int]:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for {n} files")
        i %= n
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def relative(self, index: int) -> str:
        """The path of entry ``index`` relative to ``root``, ``/``-separated."""
        start, end = self._bounds(index)
        return os.fsdecode(self.blob[start:end].tobytes())

    def __getitem__(self, index: int) -> Path:
        return self.root / self.relative(index)

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"FileIndex({str(self.root)!r}, {len(self)} files, {self.nbytes} bytes)"

    @property
    def nbytes(self) -> int:
        """Bytes held by the two arrays."""
        return int(self.blob.nbytes + self.offsets.nbytes)

    def digest(self) -> str:
        """SHA-256 of the file list (names and order, not contents), as hex."""
        sha = hashlib.sha256()
        sha.update(self.offsets.data)  # the arrays' buffers, not copies of them
        sha.update(self.blob.data)
        return sha.hexdigest()

    def same_files(self, other: FileIndex) -> bool:
        """Whether both hold the same relative paths in the same order (roots may differ)."""
        return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.blob, other.blob)


_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
_PLAIN_TARS = "shards are plain .tar files: decompress them (e.g. gunzip) and pass the .tar files"


def check_folder(root: Path) -> None:
    """Raise ``ValueError`` unless ``root`` is an existing folder."""
    if not root.exists():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        if root.name.lower().endswith(_COMPRESSED_TARS):
            raise ValueError(f"{str(root)!r} is a compressed tar; {_PLAIN_TARS}")
        raise ValueError(f"{str(root)!r} is not a folder; pass the folder that holds the images")


def _cifar_hint(root: Path) -> str:
    """``--data cifar10:ROOT`` (or cifar100) when a folder without images holds CIFAR's python batches."""
    for kind, folder, marker in (
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
        ("cifar100", "cifar-100-python", "meta"),
    ):
        inside = (root / folder / marker).is_file() or (root.name == folder and (root / marker).is_file())
        if inside or (kind == "cifar10" and (root / marker).is_file()):
            return f"; it holds CIFAR's python batches: pass --data {kind}:{root}"
    return ""


def _archive_hint(root: Path) -> str:
    """What to do when a folder without images holds tar files (compressed ones, or .tar beside other files), or
    CIFAR's python batches."""
    cifar = _cifar_hint(root)
    if cifar:
        return cifar
    try:
        names = [e.name.lower() for e in os.scandir(root) if not e.name.startswith(".") and e.is_file()]
    except OSError:
        return ""
    compressed = sum(n.endswith(_COMPRESSED_TARS) for n in names)
    plain = sum(n.endswith(".tar") for n in names)
    others = len(names) - plain - compressed - sum(n.endswith(".json") for n in names)
    if compressed:
        return f"; it holds {compressed} compressed tar file(s): {_PLAIN_TARS}"
    if plain and others:
        return (
            f"; it holds {plain} .tar file(s) beside {others} other file(s): a folder is read as shards only when "
            "it holds nothing else (.json files and hidden ones aside); move the others out, or pass a brace "
            "pattern (train-{000000..000099}.tar)"
        )
    if plain:
        return f"; it holds {plain} .tar file(s): shards, not images (commands that read data take them as --data)"
    return ""


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk(followlinks=True); no stat for a plain entry
    except OSError:
        return False


def _is_regular(entry: os.DirEntry) -> bool:
    """A regular file after following links: the entry's type for a plain entry, a stat for a link."""
    try:
        if entry.is_symlink():
            return stat.S_ISREG(os.stat(entry.path).st_mode)  # a broken or looping link raises
        return entry.is_file(follow_symlinks=False)
    except (OSError, ValueError):
        return False


@dataclass
class _Scan:
    """What one walk found: relative image paths in order, the folders walked and their times."""

    names: list[str] = field(default_factory=list)
    passed_over: int = 0
    folders: list[str] = field(default_factory=list)  # relative, "" for the root
    mtimes: list[int] = field(default_factory=list)
    inodes: list[int] = field(default_factory=list)
    unlisted: list[tuple[str, str]] = field(default_factory=list)  # folders that could not be listed, and why
    runs: list[str] = field(default_factory=list)  # run folders left out (``is_run_folder``)
    tars: list[str] = field(default_factory=list)  # the root's .tar files (shards beside images are not read)


RUN_FOLDER_FILES = ("metrics.jsonl", ".lock", "last.pt", "curves.png")
"""What a ``byol-pytorch`` run folder holds: its metrics log, and its lock file, checkpoint or curves (a demo's)."""


def is_run_folder(names: Iterable[str]) -> bool:
    """Whether a folder holding the files ``names`` is a ``byol-pytorch`` run folder (``train`` or ``demo``).

    Its ``curves.png`` and ``views.png`` are no training images: a run folder under ``--data``
    (``train --data . --out runs/byol``) is left out of every scan.

    Examples:
        >>> is_run_folder(["metrics.jsonl", ".lock", "curves.png"]), is_run_folder(["cat.png", "metrics.jsonl"])
        (True, False)
    """
    present = set(names)
    return RUN_FOLDER_FILES[0] in present and any(name in present for name in RUN_FOLDER_FILES[1:])


def _folders_above(real: str) -> set[str]:
    """The folders that hold ``real`` (a resolved path), up to the file system's root.

    Examples:
        >>> sorted(_folders_above("/data/images/cat")) == sorted(["/", "/data", "/data/images"])
        True
    """
    above = set()
    parent = os.path.dirname(real)
    while parent != real:
        above.add(parent)
        real, parent = parent, os.path.dirname(parent)
    return above


def _walk(root: str) -> _Scan:
    """Depth first, each folder's entries sorted by name: the component-by-component order.

    Hidden entries are skipped; a folder reached twice (a link cycle, two links to one
    folder) is walked the first time only, and a link to a folder above ``root`` is not walked
    (it leads back into ``root``, and into its siblings: a class folder's scan would take the
    other classes' images); a folder that cannot be listed is skipped (as ``os.walk``) and
    recorded in ``unlisted``.
    """
    scan = _Scan()
    seen: set[str] = set()
    above = _folders_above(os.path.realpath(root))
    stack: list[tuple[str, Iterator[os.DirEntry]]] = []

    def enter(relative: str) -> None:
        path = os.path.join(root, relative) if relative else root
        real = os.path.realpath(path)
        if real in seen or real in above:
            return
        seen.add(real)
        try:
            status = os.stat(path)  # before the listing: a change during it shows as a later time
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            scan.unlisted.append((relative or ".", error.strerror or type(error).__name__))
            return
        if relative and is_run_folder(entry.name for entry in entries):
            scan.runs.append(relative)
            return
        scan.folders.append(relative)
        scan.mtimes.append(status.st_mtime_ns)
        scan.inodes.append(status.st_ino)
        stack.append((relative, iter(entries)))

    enter("")
    while stack:
        relative, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = entry.name
        if name.startswith(".") or name == "lost+found":  # a file system's own folder, root's alone
            continue
        child = f"{relative}/{name}" if relative else name
        if _is_dir(entry):
            enter(child)
        elif os.path.splitext(name)[1].lower() in _EXTENSIONS:
            if _is_regular(entry):
                scan.names.append(child)
            else:
                scan.passed_over += 1
        elif not relative and name.lower().endswith(".tar"):  # the root's own: shards beside images
            scan.tars.append(child)
    return scan


class NoImagesError(ValueError):
    """``index_images`` of a folder with no image in it (a held-out split's class folder may be one)."""


def _no_images(root: Path, passed_over: int) -> NoImagesError:
    special = f"; {passed_over} entries were not regular files (FIFOs, sockets, broken links)"
    return NoImagesError(
        f"no images found under {str(root)!r} (searched recursively for "
        f"{', '.join(IMAGE_EXTENSIONS)} in any case; hidden files and folders are skipped"
        f"{special if passed_over else ''}){_archive_hint(root)}"
    )


def _few(named: list[str]) -> str:
    """The first three of ``named``, joined, with ", ..." when there are more (a warning's list of folders)."""
    return ", ".join(named[:3]) + (", ..." if len(named) > 3 else "")


def _warn_unlisted(root: Path, unlisted: list[tuple[str, str]]) -> None:
    """One warning for the folders a scan could not list: their images are not in the index."""
    shown = _few([f"{name!r} ({why})" for name, why in unlisted])
    warnings.warn(
        f"{len(unlisted)} folder(s) under {str(root)!r} could not be listed and their images are left out: "
        f"{shown}; give this user read and execute permission on them to include them",
        stacklevel=4,
    )


class TarsBesideImagesWarning(UserWarning):
    """``index_images`` of a folder whose own ``.tar`` files (shards, perhaps) are not read: it holds images too."""


def _warn_tars(root: Path, tars: list[str], images: int) -> None:
    """One warning for .tar files in the root beside images: the folder is read as images, the tar files not at all
    (a probe: one picture put beside a folder of shards made every command read that one image). Archives in
    sub-folders, and compressed ones, are no shards a user meant to pass: not named."""
    shown = _few([repr(name) for name in tars])
    warnings.warn(
        f"{str(root)!r} holds {len(tars)} .tar file(s) ({shown}) beside {images} image(s): it is read as a folder "
        "of images and the .tar files are not read; to read them as shards, pass them alone (a folder holding only "
        ".tar files, or a brace pattern such as train-{000000..000099}.tar)",
        TarsBesideImagesWarning,
        stacklevel=4,
    )


def warn_run_folders(root: Path, runs: list[str]) -> None:
    """One warning for the run folders a scan left out."""
    shown = _few([repr(name) for name in runs])
    warnings.warn(
        f"{len(runs)} byol-pytorch run folder(s) under {str(root)!r} are left out of the images: {shown} (their "
        "curves and views are no training data); keep --out outside --data to silence this",
        stacklevel=4,
    )


def _scan(root: Path) -> tuple[FileIndex, _Scan]:
    check_folder(root)
    scan = _walk(str(root))
    if scan.unlisted and scan.unlisted[0][0] == ".":
        raise ValueError(f"image folder {str(root)!r} cannot be listed ({scan.unlisted[0][1]}); check its permissions")
    if scan.unlisted:
        _warn_unlisted(root, scan.unlisted)
    if scan.runs:
        warn_run_folders(root, scan.runs)
    if not scan.names:
        raise _no_images(root, scan.passed_over)
    if scan.tars:
        _warn_tars(root, scan.tars, len(scan.names))
    index = FileIndex.from_relative(root, scan.names, scan.passed_over)
    scan.names = []  # the index holds them now
    return index, scan


def index_images(root: PathLike) -> FileIndex:
    """All image files under ``root``, recursively, as a compact ``FileIndex``.

    Suffixes are matched case-insensitively against ``IMAGE_EXTENSIONS``. Files and
    folders whose name starts with a dot are skipped. Symbolic links to folders are
    followed once (a link cycle is not walked twice; of two links to one folder, the
    first in sorted order is walked; a link to a folder above ``root`` is not walked).
    Only regular files (after following links) are kept: FIFOs, sockets, devices and
    broken links are passed over and counted in ``passed_over``. A sub-folder that cannot
    be listed (no read permission) is left out with a warning naming it (``lost+found``, a
    file system's own, is skipped), and so is a ``byol-pytorch`` run folder of ``train``
    or ``demo`` (``is_run_folder``). Contents are not opened. The order is that of the
    sorted ``Path`` objects: component by component (``a/b.png`` before ``a-b.png``).

    Args:
        root: the folder to search.

    Returns:
        The index; ``index[i]`` is ``root`` joined with the ``i``-th relative path.

    Raises:
        ValueError: ``root`` does not exist, is not a folder, cannot be listed, or holds no
            image files.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in ("a-b.png", "a/b.png", "notes.txt"):
        ...     (folder / name).parent.mkdir(exist_ok=True)
        ...     (folder / name).touch()
        >>> [index_images(folder).relative(i) for i in range(2)]
        ['a/b.png', 'a-b.png']
    """
    return _scan(user_path(root))[0]


def _strings(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = FileIndex.from_relative(".", values)
    return index.blob, index.offsets


def _root_key(root: Path) -> np.ndarray:
    return np.frombuffer(os.fsencode(os.path.realpath(root)), dtype=np.uint8)


def _save_index(path: PathLike, index: FileIndex, scan: _Scan, scanned_ns: int) -> Path:
    """Write ``index`` and its key (resolved root, folders' times) to ``path`` atomically (``.npz``)."""
    folder_blob, folder_offsets = _strings(scan.folders)
    arrays: dict[str, np.ndarray] = {
        "version": np.array([_FORMAT_VERSION], dtype=np.int64),
        "extensions": np.frombuffer(" ".join(IMAGE_EXTENSIONS).encode(), dtype=np.uint8),
        "root": _root_key(index.root),
        "blob": index.blob,
        "offsets": index.offsets,
        "passed_over": np.array([index.passed_over], dtype=np.int64),
        "digest": np.frombuffer(bytes.fromhex(index.digest()), dtype=np.uint8),
        "folder_blob": folder_blob,
        "folder_offsets": folder_offsets,
        "mtimes": np.array(scan.mtimes, dtype=np.int64),
        "inodes": np.array(scan.inodes, dtype=np.uint64),
        "scanned_ns": np.array([scanned_ns], dtype=np.int64),
    }
    arrays["unlisted_blob"], arrays["unlisted_offsets"] = _strings([name for name, _ in scan.unlisted])

    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # a handle: a name would get ".npz" added

    return atomic_write(path, write)


def _array(arrays: Any, key: str, dtype: type, size: int | None = None) -> np.ndarray:
    value = arrays[key]
    if value.dtype != dtype or value.ndim != 1 or (size is not None and len(value) != size):
        raise ValueError(f"{key}: {value.dtype} {value.shape}")
    return value


def _check_offsets(blob: np.ndarray, offsets: np.ndarray) -> None:
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets do not describe the blob")


def _unchanged(root: Path, folders: FileIndex, mtimes: np.ndarray, inodes: np.ndarray, scanned_ns: int) -> bool:
    """Every recorded folder still has its time and inode, and none was racy at the scan."""
    if len(mtimes) != len(folders) or len(inodes) != len(folders) or len(folders) == 0:
        return False
    if int(mtimes.max()) >= scanned_ns - RACY_NS:
        return False
    for i in range(len(folders)):
        relative = folders.relative(i)
        status = os.stat(os.path.join(root, relative) if relative else root)
        if status.st_mtime_ns != mtimes[i] or status.st_ino != inodes[i] or not stat.S_ISDIR(status.st_mode):
            return False
    return True


def load_cached_index(path: PathLike, root: PathLike) -> FileIndex | None:
    """The index saved at ``path`` when it is intact and still describes ``root``; else None.

    Only folders are ``stat``ed (those recorded at the scan); no file is looked at. A
    missing, truncated, corrupt or foreign file (another root, another format or
    extension list) gives None, never an error.
    """
    root = user_path(root)
    try:
        with np.load(user_path(path), allow_pickle=False) as arrays:
            version = _array(arrays, "version", np.int64, 1)
            extensions = _array(arrays, "extensions", np.uint8).tobytes()
            if int(version[0]) != _FORMAT_VERSION or extensions != " ".join(IMAGE_EXTENSIONS).encode():
                return None
            if not np.array_equal(_array(arrays, "root", np.uint8), _root_key(root)):
                return None
            blob, offsets = _array(arrays, "blob", np.uint8), _array(arrays, "offsets", np.int64)
            folder_blob = _array(arrays, "folder_blob", np.uint8)
            folder_offsets = _array(arrays, "folder_offsets", np.int64)
            for b, o in ((blob, offsets), (folder_blob, folder_offsets)):
                _check_offsets(b, o)
            passed_over = int(_array(arrays, "passed_over", np.int64, 1)[0])
            index = FileIndex(root, blob, offsets, passed_over)
            digest = _array(arrays, "digest", np.uint8, 32).tobytes().hex()
            if len(index) == 0 or passed_over < 0 or digest != index.digest():
                return None
            folders = FileIndex(root, folder_blob, folder_offsets)
            mtimes = _array(arrays, "mtimes", np.int64)
            inodes = _array(arrays, "inodes", np.uint64)
            scanned_ns = int(_array(arrays, "scanned_ns", np.int64, 1)[0])
            unlisted = []
            if "unlisted_blob" in arrays:  # written since 1.2.0's warning for folders that cannot be listed
                names = FileIndex(
                    root, _array(arrays, "unlisted_blob", np.uint8), _array(arrays, "unlisted_offsets", np.int64)
                )
                unlisted = [names.relative(i) for i in range(len(names))]
        if not _unchanged(root, folders, mtimes, inodes, scanned_ns):
            return None
    except Exception:  # a cache is only a shortcut: anything wrong with it means "scan again"
        return None
    still = _still_unlisted(root, unlisted)
    if still is None:  # a folder the scan could not list can be now: scan again
        return None
    if still:
        _warn_unlisted(root, still)
    return index


def _still_unlisted(root: Path, names: list[str]) -> list[tuple[str, str]] | None:
    """``(name, why)`` of the folders a cached scan could not list that still cannot be; None when one can now."""
    still = []
    for name in names:
        try:
            with os.scandir(root / name):
                return None
        except OSError as error:
            still.append((name, error.strerror or type(error).__name__))
    return still


def load_or_scan(root: PathLike, cache: PathLike | None = None) -> FileIndex:
    """``index_images(root)``, reusing the index saved at ``cache`` when it is still valid.

    A missing, stale or unreadable cache is replaced by a fresh scan, written atomically;
    a cache that cannot be written (read-only folder, full disk) only costs a warning.

    Args:
        root: the image folder.
        cache: the cache file (``.npz``); None scans without a cache.

    Returns:
        The index, with ``root`` as given (a leading ``~`` expanded).

    Raises:
        ValueError: see ``index_images``.
    """
    index, save = scan_with_cache(root, cache)
    if save is not None:
        save()
    return index


def scan_with_cache(root: PathLike, cache: PathLike | None) -> tuple[FileIndex, Callable[[], None] | None]:
    """As ``load_or_scan``, but the cache is written only when the returned ``save()`` is called.

    ``byol-pytorch train`` calls it once every check that can refuse the run has passed, so a
    refused start leaves the run folder as it was.

    Returns:
        ``(index, save)``; ``save`` is None when the cache was valid (or there is none).
    """
    root = user_path(root)
    if cache is None:
        return index_images(root), None
    cache = user_path(cache)
    check_folder(root)
    cached = load_cached_index(cache, root)
    if cached is not None:
        return cached, None
    scanned_ns = time.time_ns()
    index, scan = _scan(root)

    def save() -> None:
        try:
            _save_index(cache, index, scan, scanned_ns)
        except OSError as error:
            warnings.warn(
                f"could not save the file index to {cache} ({error}); the next start scans again", stacklevel=3
            )

    return index, save

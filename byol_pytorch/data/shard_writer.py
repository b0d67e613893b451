"""Writing tar shards: ``byol-pytorch shards make`` (a folder of images to shards) and ``shards index``.

``make_shards`` packs every readable image of a folder (searched recursively, as training
reads it) into webdataset shards ``OUT/train-000000.tar``, ... of at most ``shard_size``
bytes each (tar rounds files up to 10240 bytes; a single larger image gets a shard of its own):

* the members hold the original encoded bytes (no re-encoding);
* each sample's key is its file's path relative to the folder, ``%`` and ``.`` written
  ``%25`` and ``%2E`` (webdataset's key ends at the first dot of the name): the member of
  ``cats/a.b.jpg`` is ``cats/a%2Eb%2Ejpg.jpg``, one sample per file, never two merged; a key
  that starts with ``__`` (a class ``__background__``) starts ``%5F_``, as webdataset skips a
  first part ``__NAME__`` as metadata;
* the samples go in an order shuffled by ``seed`` (``shuffle=False``: the sorted paths), so that
  a shard and a shuffle buffer hold a mix of the folder's classes, not one class each;
* files that do not decode as images are skipped and counted (not written);
* each shard is written to a hidden temporary file and renamed into place once complete,
  so a shard that exists is whole; ``OUT/index.json`` (webdataset's ``wids`` index, see
  ``remote_shards.load_index``) lists the shards and their sample counts;
* with ``labels`` (a folder of class sub-folders), each sample also holds ``KEY.cls``, its
  class index, and ``OUT/classes.json`` names the classes.

``write_index`` counts the samples of shards (local ones from their tar headers, remote ones
by reading them once) and writes such an index.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import os
import re
import tarfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write, names_the_file
from .._modules import PathLike, inside_folder
from .file_index import index_images
from .folder import BrokenImageError, LabelledImageFolder, apply_pixel_limit, decode_image, loose_images
from .remote import is_remote, redact
from .remote_shards import count_shards, expand_remote, index_document
from .shards import INCOMPLETE_NAME, expand_shards, shard_samples
from .sources import held_out_split

__all__ = ["CLASSES_NAME", "INDEX_NAME", "MadeShards", "make_shards", "parse_size", "sample_key", "write_index"]

INDEX_NAME = "index.json"
CLASSES_NAME = "classes.json"  # shards made with labels: the class names, classes[i] naming label i
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes of a size such as ``1GB``, ``500MB``, ``64MiB`` or ``1000000``.

    Examples:
        >>> parse_size("1GB"), parse_size("1.5 MB"), parse_size("64KiB")
        (1000000000, 1500000, 65536)
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--shard-size: {text!r} is not a size (e.g. 1GB, 500MB, 64MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def sample_key(relative: str) -> str:
    """The webdataset key of a file: its relative path, ``%`` and ``.`` escaped (module doc).

    Examples:
        >>> sample_key("cats/a.b.jpg"), sample_key("__background__/c.png")
        ('cats/a%2Eb%2Ejpg', '%5F_background__/c%2Epng')
    """
    key = relative.replace("%", "%25").replace(".", "%2E")
    return "%5F" + key[1:] if key.startswith("__") else key  # webdataset skips "__NAME__/..." as metadata


@dataclass
class MadeShards:
    """What ``make_shards`` wrote: shard files, samples per shard, the broken files passed over."""

    shards: list[Path] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    bytes: int = 0
    index: Path | None = None
    unlabelled: int = 0  # with labels: images outside the class sub-folders, left out


def _member_info(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    return info


def _member_size(name: str, data: bytes) -> int:
    """Bytes of a tar member as ``_ShardSink`` writes it: its headers (a PAX header for a long or
    non-ASCII name included: the very bytes tarfile writes), then the data padded to 512."""
    header = _member_info(name, data).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    return len(header) + (len(data) + 511) // 512 * 512


def _file_size(members: int) -> int:
    """Bytes of a tar file of ``members`` bytes of members: the end marker, rounded up to tar's 10240-byte records."""
    return (members + 1024 + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE


class _ShardSink:
    """One shard being written: a hidden temporary tar, renamed into place by ``close``."""

    def __init__(self, path: Path) -> None:
        self.path, self.temporary = path, path.with_name(f".{path.name}.tmp")
        self.tar = tarfile.open(self.temporary, "w", format=tarfile.PAX_FORMAT)
        self.count = self.size = 0

    def fits(self, members: Sequence[tuple[str, bytes]], limit: int) -> bool:
        """Whether the file stays within ``limit`` bytes with this sample's members (an empty shard takes any)."""
        return not self.count or _file_size(self.size + sum(_member_size(n, d) for n, d in members)) <= limit

    def add(self, members: Sequence[tuple[str, bytes]]) -> None:
        """One sample: its members (``(name, data)``: the image, and its ``.cls`` label when labelled)."""
        with names_the_file(self.path):
            for name, data in members:
                self.tar.addfile(_member_info(name, data), io.BytesIO(data))
                self.size += _member_size(name, data)
        self.count += 1

    def close(self) -> None:
        with names_the_file(self.path):
            self.tar.close()
            with open(self.temporary, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        """Give the shard up (an error or a stop while writing it): its temporary file is removed."""
        try:
            self.tar.fileobj.close()  # not tar.close(): it would write the end marker
        except OSError:
            pass
        self.temporary.unlink(missing_ok=True)


def _readable(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        decode_image(data, 8, 3, name=str(path))
        return data
    except (OSError, BrokenImageError):
        return None


def make_shards(
    folder: PathLike,
    out: PathLike,
    shard_size: int,
    prefix: str = "train",
    labels: bool = False,
    *,
    shuffle: bool = True,
    seed: int = 0,
) -> MadeShards:
    """Pack the readable images of ``folder`` into shards of at most ``shard_size`` bytes under ``out``.

    With ``labels``, ``folder`` holds one sub-folder per class (as ``LabelledImageFolder`` reads
    it): each sample gets a ``.cls`` member with its class index, and ``OUT/classes.json`` names
    the classes (``classes[i]`` is label i), so ``eval`` and ``embed`` read the labels.

    The samples go in an order shuffled by ``seed`` (the same folder and seed give the same
    shards); ``shuffle=False`` keeps the sorted paths, each class in one run of samples. An
    error or a stop removes what the call wrote (a killed process leaves the incomplete marker).

    Raises:
        ValueError: no image in the folder, ``labels`` without class sub-folders or of a folder split
            into ``train/`` and ``val/`` (or ``test/``), ``out``
            already holds shards (or is ``folder``), ``shard_size`` below 1, or ``prefix`` is
            not a plain file-name part.
        TypeError: ``shard_size`` or ``seed`` is not an int (``parse_size("1GB")`` makes one).
            A negative ``seed`` is a ValueError.
        OSError: ``out`` cannot be written.
    """
    apply_pixel_limit()
    _check_make_arguments(folder, out, shard_size, prefix, seed)
    root, target = Path(folder), Path(out)
    if labels and inside_folder(target, root):  # a probe: the shards' folder then read as a class of the data
        raise ValueError(
            f"--out {target} is inside --data {root}: with --labels, its folder would be read as a class of the data "
            "from then on (eval, embed --labels, shards make); write the shards outside --data"
        )
    split = held_out_split(root, "folder") if labels else None
    if split is not None:  # a probe: classes.json was ["train", "val"], every label a split
        raise ValueError(
            f"--data {root} is split into train/ and {split}/, so --labels would label the images by split: make the "
            f"shards of each split on its own, --data {root / 'train'} --labels and --data {root / split} --labels, "
            "each with its own --out"
        )
    with warnings.catch_warnings():  # its images outside the class folders are counted below (unlabelled)
        warnings.filterwarnings("ignore", message=r".* belong to no class and are left out")
        labelled = LabelledImageFolder(root, 8) if labels else None
    files = labelled.paths if labelled is not None else index_images(root)
    targets = labelled.targets if labelled is not None else None
    # images not in a class folder (a count of the whole tree would differ: a folder linked as two classes is
    # read once by index_images and once per class by LabelledImageFolder)
    left_out = len(loose_images(root)) if labelled is not None else 0
    target.mkdir(parents=True, exist_ok=True)
    marker = target / INCOMPLETE_NAME
    if marker.exists():
        raise ValueError(
            f"--out {target} holds what a `shards make` killed before it ended wrote ({INCOMPLETE_NAME} is there): "
            f"remove its .tar files, its hidden .tar.tmp files and {INCOMPLETE_NAME}, then run it again"
        )
    held = [".tar files"] if any(target.glob("*.tar")) else []
    held += [name for name in (INDEX_NAME, CLASSES_NAME) if (target / name).exists()]
    if held:
        raise ValueError(f"--out {target} already holds {' and '.join(held)} of shards; choose an empty folder")
    order = np.random.default_rng(seed).permutation(len(files)) if shuffle else range(len(files))
    with names_the_file(marker):
        marker.write_text("byol-pytorch shards make is writing this folder, or was stopped before it ended\n")
    made = MadeShards(unlabelled=left_out)
    try:
        _write_samples(root, files, order, targets, target / prefix, shard_size, made)
        if not made.shards:
            raise ValueError(f"{root} has no readable image ({len(made.broken)} broken files); no shard written")
        made.index = _write_json(target / INDEX_NAME, index_document([p.name for p in made.shards], made.counts))
        if labelled is not None:
            _write_json(target / CLASSES_NAME, {"classes": list(labelled.classes)})
    except BaseException:  # an error, Ctrl-C, SIGTERM: what this call wrote goes, so that it can run again
        for path in [*made.shards, target / INDEX_NAME, target / CLASSES_NAME, marker]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    marker.unlink()  # the set is whole
    return made


def _check_make_arguments(folder: PathLike, out: PathLike, shard_size: object, prefix: str, seed: object) -> None:
    """``make_shards``' checks before it writes anything (see its Raises)."""
    text = os.fspath(folder) if isinstance(folder, (str, os.PathLike)) else ""
    if is_remote(text):
        raise ValueError(
            f"--data {redact(text)}: shards make packs a local folder of images; copy the images here first"
        )
    if not text.strip():
        raise ValueError("--data is empty: name the folder of images to pack")
    for name, value, hint in (("shard_size", shard_size, " (bytes: parse_size('1GB'))"), ("seed", seed, "")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int{hint}, got {value!r}")
    if seed < 0:  # type: ignore[operator]
        raise ValueError(f"--seed must be 0 or more, got {seed}")
    if shard_size < 1:  # type: ignore[operator]
        raise ValueError(f"--shard-size must be a positive number of bytes (e.g. 64MB, 1GB), got {shard_size}")
    if not prefix or prefix != Path(prefix).name or prefix.startswith("."):
        raise ValueError(
            f"--prefix {prefix!r}: give the start of the shards' file names (no '/', not empty, not hidden), e.g. train"
        )
    if Path(out).exists() and Path(folder).exists() and os.path.samefile(out, folder):
        raise ValueError(f"--out {os.fspath(out)} is --data: write the shards to a folder of their own")


def _write_samples(
    root: Path,
    files: Any,
    order: Iterable[int],
    targets: Sequence[int] | None,
    stem: Path,
    shard_size: int,
    made: MadeShards,
) -> None:
    """The readable files, in ``order``, as samples of shards ``STEM-000000.tar``, ...; a shard being written
    when an error or a stop comes is discarded (no temporary file left)."""
    sink = None
    try:
        for number in order:
            number = int(number)
            relative = files.relative(number)
            data = _readable(root / relative)
            if data is None:
                made.broken.append(relative)
                continue
            members = [(f"{sample_key(relative)}.{relative.rsplit('.', 1)[-1].lower()}", data)]
            if targets is not None:
                members.append((f"{sample_key(relative)}.cls", str(targets[number]).encode("ascii")))
            if sink is not None and not sink.fits(members, shard_size):
                _finish(sink, made)
                sink = None
            if sink is None:
                sink = _ShardSink(stem.with_name(f"{stem.name}-{len(made.shards):06d}.tar"))
            sink.add(members)
        if sink is not None:
            _finish(sink, made)
            sink = None
    except BaseException:
        if sink is not None:
            sink.discard()
        raise


def _finish(sink: _ShardSink, made: MadeShards) -> None:
    sink.close()
    made.shards.append(sink.path)
    made.counts.append(sink.count)
    made.bytes += sink.path.stat().st_size


def _write_json(path: Path, document: dict) -> Path:
    """``document`` as ``path``, atomically (fsynced; a full disk leaves no temp file and names ``path``)."""
    text = json.dumps(document, indent=1) + "\n"
    return atomic_write(path, lambda temp: Path(temp).write_text(text))


def write_index(spec: str, out: PathLike) -> tuple[Path, Sequence[int]]:
    """Count the samples of the shards of ``spec`` and write their ``wids`` index to ``out``.

    Local shards are named relative to the index's folder when they lie under it (absolute
    otherwise); remote ones by their (redacted) URL. Returns ``(index path, counts)``.
    """
    target = Path(out)
    if target.suffix.lower() == ".tar" or (target.exists() and tarfile.is_tarfile(target)):
        raise ValueError(f"--out {out} is a tar file (a shard?): name the index a .json file, e.g. index.json")
    if is_remote(spec):
        locations = expand_remote(spec)
        counts = count_shards(locations)
        return _write_json(target, index_document(locations, counts)), counts
    paths = expand_shards(spec)
    counts = [shard_samples(p) for p in paths]
    base = target.resolve().parent
    names = [
        os.path.relpath(p.resolve(), base) if p.resolve().is_relative_to(base) else str(p.resolve()) for p in paths
    ]
    return _write_json(target, index_document(names, counts)), counts

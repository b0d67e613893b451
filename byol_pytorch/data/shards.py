"""Tar shards (the webdataset layout) for pretraining: split between processes and workers, resumable.

A shard is an uncompressed ``.tar`` file of samples in webdataset's layout: the files of
one sample are consecutive members sharing a key (``000123.jpg``, ``000123.json``; the
key is the name up to its first dot, webdataset's ``base_plus_ext``). The image is the
sample's first file whose last suffix is an image suffix (``jpg``, ``png``, ``webp``, ...).

``ShardDataset`` is an ``IterableDataset`` that hands out whole batches ``(uint8 (B, C,
S, S), skipped)``, the items ``collate_images`` makes for an image folder, so
``step_batches`` and the run's skipped-file count treat both alike. Load it with
``batch_size=None`` (``make_shard_loader``).

The order of an epoch is a pure function of (seed, epoch):

* **Readers.** Each process has ``max(1, workers)`` readers (its loader's workers);
  reader ``g = rank * W + w`` of ``G = world_size * W`` reads the shards
  ``order[g::G]`` of the epoch's shard permutation: every shard is read by exactly one
  worker of one process per epoch. Fewer shards than readers is an error.
* **Shuffle.** Within a shard, samples pass through a shuffle buffer of
  ``shuffle_buffer`` entries seeded by (seed, epoch, shard). The buffer holds tar header
  positions, not bytes: an image is read and decoded only when it leaves the buffer.
* **Length.** Sample counts come from the tar headers when the dataset is built (one
  pass over the headers, no image read). Every reader yields the same number of
  batches each epoch: as many whole batches as its ``S // G`` smallest shards hold, so
  that batch ``k`` of a process's epoch always comes from its worker ``k % W``
  (DataLoader's round robin). Samples past that are dropped for the epoch, like
  ``drop_last``: shards of even size, as many as a multiple of the readers, waste nothing;
  3 shards for 2 readers leave a third of each epoch unread (``shard_workers`` picks a
  worker count that wastes little, and ``byol-pytorch train`` warns when an epoch reads
  less than 90% of the samples).
* **Broken samples** (undecodable bytes, no image file) are replaced by the next
  readable sample of the reader's stream (that sample is also used at its own place),
  and counted in ``skipped``, as ``ImageFolder`` replaces a broken file by the next.

**Resume is exact.** Batch ``k`` of an epoch determines how many samples each reader
has consumed, so ``set_epoch(epoch, start_batch=k)`` alone restarts every reader where it
was: finished shards are not opened, the current shard's headers are read again to
rebuild its shuffle buffer, and the samples already used are dropped without being read
or decoded. A resumed run sees bitwise the batches an uninterrupted one would, as long
as the shards, the process count and the worker count are the same.

Python use (``pip install "byol-pytorch[shards]"``)::

    from byol_pytorch.data.shards import ShardDataset, make_shard_loader

    data = ShardDataset("shards/train-{000000..000099}.tar", load_size=256, batch_size=64, workers=4)
    loader = make_shard_loader(data)
    for epoch in range(10):
        data.set_epoch(epoch)
        for images, skipped in loader:  # uint8 (64, 3, 256, 256), broken samples passed over
            ...
"""

from __future__ import annotations

import copy
import itertools
import json
import numbers
import os
import random
import re
import tarfile
import warnings
from collections import deque
from collections.abc import Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .._modules import PathLike, user_path, whole_number
from .folder import (
    IMAGE_EXTENSIONS,
    BrokenImageError,
    NoReadableImagesError,
    apply_pixel_limit,
    check_load_size,
    decode_image,
)
from .loader import make_loader
from .sampling import checked_epoch

__all__ = [
    "INCOMPLETE_NAME",
    "SHARDS_MISSING",
    "ShardDataset",
    "ShardSamples",
    "epoch_batches",
    "expand_shards",
    "is_shard_spec",
    "make_shard_loader",
    "shard_names",
    "shard_samples",
    "shard_workers",
]

SHARDS_MISSING = 'tar shards need the webdataset package: pip install "byol-pytorch[shards]"'
IMAGE_SUFFIXES = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def _brace_pattern(spec: str) -> bool:
    """Whether ``spec`` holds a brace pattern to expand: a path that exists as written is taken literally."""
    return bool(_BRACES.search(spec)) and not os.path.lexists(spec)


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them

# A sample as the headers describe it: its key and, per suffix, (offset, size) of the member's bytes.
_Sample = tuple[str, dict[str, tuple[int, int]]]


def _webdataset() -> Any:
    try:
        import braceexpand
        import webdataset.tariterators
    except ImportError as error:
        raise ImportError(SHARDS_MISSING) from error
    return braceexpand, webdataset.tariterators


INCOMPLETE_NAME = ".shards-make-incomplete"
"""Written by ``shards make`` into its --out first and removed once the index is written: a folder that still
holds it was stopped mid-way (its shards hold part of the images)."""


def _check_complete(folders: Iterable[Path]) -> None:
    """A ``ValueError`` when one of ``folders`` is what an interrupted ``shards make`` left."""
    for folder in folders:
        if (folder / INCOMPLETE_NAME).exists():
            raise ValueError(
                f"{str(folder)!r} holds the shards of a `byol-pytorch shards make` that was stopped before it ended "
                f"({INCOMPLETE_NAME} is there): they hold part of the images; run it again into an empty folder"
            )


def _is_tar_folder(path: Path) -> bool:
    try:
        names = [e for e in os.scandir(path) if not e.name.startswith(".") and not e.name.endswith(".json")]
    except OSError:
        return False
    return bool(names) and all(e.name.endswith(".tar") and e.is_file() for e in names)


def is_shard_spec(spec: str | None) -> bool:
    """Whether a data argument names tar shards.

    Shards are: a brace pattern (``train-{000000..000099}.tar``, ``{a,b}.tar``; a path that
    exists as written, braces and all, is not one), a path
    ending in ``.tar`` that is not a folder, or a folder whose entries (hidden ones
    and ``.json`` files such as a shard index aside) are all ``.tar`` files. Any other folder is an image folder.

    Examples:
        >>> is_shard_spec("shards/train-{000000..000099}.tar"), is_shard_spec("photos/")
        (True, False)
    """
    if not spec:
        return False
    if _brace_pattern(spec):
        return True
    path = Path(spec)
    return (spec.endswith(".tar") and not path.is_dir()) or _is_tar_folder(path)


def expand_shards(spec: str | Sequence[PathLike]) -> list[Path]:
    """The shard files of a spec (see ``is_shard_spec``) or a list of paths; each must exist.

    Raises:
        ImportError: webdataset is not installed (the message says how to install it).
        ValueError: no shard, a shard that is not a file, or shards of an interrupted ``shards make``.
    """
    if isinstance(spec, str):
        spec = os.fspath(user_path(spec)) if spec.startswith("~") else spec  # a pattern otherwise as given
        braceexpand, _ = _webdataset()
        if _brace_pattern(spec):
            paths = [Path(p) for p in braceexpand.braceexpand(spec)]
        elif _is_tar_folder(Path(spec)):
            paths = sorted(p for p in Path(spec).iterdir() if not p.name.startswith(".") and p.suffix == ".tar")
        elif Path(spec).is_dir():
            _check_complete([Path(spec)])  # a make stopped before its first shard leaves the marker alone
            if not any(not e.name.startswith(".") for e in os.scandir(spec)):
                raise ValueError(f"no shards in {spec!r}: the folder is empty")
            raise ValueError(
                f"{spec!r} is a folder that holds other files than .tar shards (a folder of images? "
                f"`byol-pytorch shards make --data {spec} --out SHARDS` packs one)"
            )
        else:
            paths = [Path(spec)]
    else:
        _webdataset()
        paths = [user_path(p) for p in spec]
    _check_complete(dict.fromkeys(p.parent for p in paths))
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise ValueError(
            f"{len(missing)} of the {len(paths)} shards of {str(spec)!r} are missing, e.g. {str(missing[0])!r}; "
            "check the pattern (train-{000000..000099}.tar) or the folder of .tar files"
            if missing
            else f"no shards in {str(spec)!r}"
        )
    return paths


def _samples(path: Path) -> list[_Sample]:
    """The samples of one shard, from its headers only: members grouped by webdataset's key."""
    _, tariterators = _webdataset()
    samples: list[_Sample] = []
    end = 0  # where the last member's data ends
    try:
        length = path.stat().st_size
        tar = tarfile.open(path, "r:")
    except tarfile.TarError as error:
        raise ValueError(f"{str(path)!r} is not an uncompressed tar file ({error}); shards are plain .tar") from None
    except OSError as error:
        raise ValueError(f"cannot read the shard {str(path)!r}: {error.strerror or error}") from None
    with tar:
        try:
            for member in tar:
                end = max(end, member.offset_data + member.size)
                if not member.isreg() or _META.match(member.name):
                    continue
                key, suffix = tariterators.base_plus_ext(member.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][suffix.lower()] = (member.offset_data, member.size)
        except tarfile.TarError as error:  # members were read, then a header (group: pax header, its data, header)
            if length % tarfile.BLOCKSIZE or end > length or length - tar.offset <= _HEADER_GROUP:
                raise ValueError(_cut_short(path, length)) from None  # the file stops
            raise ValueError(
                f"{str(path)!r} is damaged after byte {end} ({error}); copy or write the shard again"
            ) from None
        except OSError as error:
            raise ValueError(f"cannot read the shard {str(path)!r}: {error.strerror or error}") from None
        last = tar.offset  # the block after the last member
        tar.fileobj.seek(last)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    # Python's tarfile takes a header cut short, a missing one or one of garbage for the archive's end: a whole tar
    # ends in a block of zeros.
    if len(block) < tarfile.BLOCKSIZE:
        raise ValueError(_cut_short(path, length))
    if any(block):
        raise ValueError(
            f"{str(path)!r} is damaged at byte {last}: a block that is neither a tar header nor the archive's end; "
            "copy or write the shard again"
        )
    return samples


_HEADER_GROUP = 4 * tarfile.BLOCKSIZE  # a header that fails this close to the file's end was cut, not garbled


def _cut_short(path: Path, length: int) -> str:
    """The error of a shard that was cut short (a copy or an upload that stopped)."""
    return (
        f"{str(path)!r} is cut short: it stops at byte {length}, before the tar's end (a member or the "
        "end-of-archive block is missing); copy or write the shard again"
    )


def shard_samples(path: PathLike) -> int:
    """Samples in one shard, counted from its tar headers (no image is read).

    Raises:
        ImportError: webdataset is not installed.
        ValueError: not an uncompressed tar file.
    """
    return len(_samples(Path(path)))


def _counted(paths: Sequence[Path]) -> list[int]:
    """Every shard's sample count, with one warning when files named with dots merged into one sample.

    One image is read per sample, and webdataset's key ends at the first dot of a member's
    name: files named with dots (``photo.2023.0001.jpg``) merge into one sample, most of them
    unread. Told from a sample's own several images (``000.jpg`` and its mask ``000.seg.png``)
    by the numbers in what follows the key.
    """
    counts: list[int] = []
    warned = False
    for path in paths:
        samples = _samples(path)
        counts.append(len(samples))
        merged = None if warned else next(filter(None, map(_merged_images, samples)), None)
        if merged is not None:
            warned = True
            key, images = merged
            shown = ", ".join(f"{key}.{suffix}" for suffix in images[:3]) + (", ..." if len(images) > 3 else "")
            warnings.warn(
                f"shard {str(path)!r}: sample {key!r} holds {len(images)} image files ({shown}) and one image is "
                "read per sample: a sample's key ends at the first dot of a file's name, so files named with dots "
                "merge into one sample; rename them without dots, or build the shards with "
                "'byol-pytorch shards make', which keeps one image per sample",
                UserWarning,
                stacklevel=4,
            )
    return counts


def _merged_images(sample: _Sample) -> tuple[str, list[str]] | None:
    """``(key, image suffixes)`` of a sample that files named with dots merged (``img.0001.png``, ``img.0002.png``);
    None for one image, or an image and its mask (``000.jpg``, ``000.seg.png``)."""
    key, members = sample
    images = [suffix for suffix in members if suffix.rsplit(".", 1)[-1] in IMAGE_SUFFIXES]
    numbered = [suffix for suffix in images if any(c.isdigit() for c in suffix.rsplit(".", 1)[0])]
    return (key, images) if len(numbered) > 1 else None


def _shuffled(samples: list[_Sample], size: int, rng: random.Random) -> Iterator[_Sample]:
    """The samples through a shuffle buffer of ``size`` entries (none below 2)."""
    if size < 2:
        yield from samples
        return
    buffer: list[_Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


class _Files:
    """Open shard files of one reader (the current one and the one a look-ahead reached)."""

    def __init__(self) -> None:
        self.open: dict[Path, IO[bytes]] = {}

    def read(self, path: Path, offset: int, size: int) -> bytes:
        if path not in self.open:
            if len(self.open) >= 2:
                self.open.pop(next(iter(self.open))).close()
            self.open[path] = open(path, "rb")
        file = self.open[path]
        file.seek(offset)
        return file.read(size)

    def close(self) -> None:
        for file in self.open.values():
            file.close()
        self.open.clear()


class ShardDataset(IterableDataset):
    """Batches of decoded images from tar shards, split between processes and workers (module doc).

    Args:
        shards: a spec (``"train-{000000..000099}.tar"``, a folder of ``.tar`` files, one
            ``.tar``) or a list of shard paths.
        load_size: side ``S`` of the square images (``load_size_for(image_size)``).
        batch_size: images per batch (of one process).
        channels: 1 or 3.
        rank: this process's rank.
        world_size: number of processes.
        workers: the loader's worker processes (0: read in the calling process).
        seed: the run's seed (the same on every rank).
        shuffle_buffer: samples in each shard's shuffle buffer (below 2: tar order).
        multiple_of: batches per epoch are a multiple of this (gradient accumulation).

    Raises:
        ImportError: webdataset is not installed.
        ValueError: missing or unreadable shards, fewer shards than readers, too few samples.

    Attributes:
        paths, counts: the shards and their sample counts.
        readers: readers in all processes (``world_size * max(1, workers)``).
        batches_per_reader: batches each reader yields per epoch.
        batches_per_epoch: batches of one process per epoch.

    Examples:
        >>> ShardDataset("no/such-{0..3}.tar", load_size=64, batch_size=8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: 4 of the 4 shards of 'no/such-{0..3}.tar' are missing, e.g. 'no/such-0.tar'; ...
    """

    yields_batches = True  # make_loader: batch_size=None

    def __init__(
        self,
        shards: str | Sequence[PathLike],
        load_size: int,
        batch_size: int,
        channels: int = 3,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        multiple_of: int = 1,
    ) -> None:
        check_load_size(load_size, channels)
        _check_reading(batch_size, rank, world_size, workers, multiple_of)
        apply_pixel_limit()  # a bad BYOL_PYTORCH_MAX_IMAGE_PIXELS stops here, not in a loader worker
        self.paths, self.counts = self._locate(shards)
        self.load_size, self.channels, self.batch_size = load_size, channels, batch_size
        self.rank, self.world_size, self.multiple_of = rank, world_size, multiple_of
        self.seed = whole_number("seed", seed, -(2**63))  # 1.5 was cut to 1
        self.shuffle_buffer = whole_number("shuffle_buffer", shuffle_buffer, 0, " (below 2: tar order)")
        self._plan(workers)
        self.epoch, self.start_batch = 0, 0

    def _plan(self, workers: int) -> None:
        """The readers and the epoch's length for ``workers`` loader workers per process."""
        self.workers, self.per_rank = workers, max(1, workers)
        self.readers = self.world_size * self.per_rank
        if len(self.paths) < self.readers:
            fewer = "" if self.per_rank == 1 else f"lower --workers to {max(1, len(self.paths) // self.world_size)} or "
            raise ValueError(
                f"{len(self.paths)} shards cannot be split between {self.world_size} process(es) x {self.per_rank} "
                f"loader worker(s) = {self.readers} readers (each reads whole shards); {fewer}split the data into "
                f"more shards{'' if fewer else ' or start fewer processes'}"
            )
        least = sum(sorted(self.counts)[: len(self.paths) // self.readers])  # what any reader gets, at least
        self.batches_per_reader = least // self.batch_size
        self.batches_per_epoch = epoch_batches(self.counts, self.world_size, workers, self.batch_size, self.multiple_of)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{sum(self.counts)} samples in {len(self.paths)} shards are fewer than one optimizer step needs: "
                f"each of {self.readers} readers gets at least {least} samples, and a batch is {self.batch_size} "
                f"(x {self.multiple_of} accumulation); lower --batch-size, --workers or add samples"
            )

    def with_workers(self, workers: int) -> ShardDataset:
        """This dataset read by ``workers`` loader workers per process (the counts are not read again)."""
        _check_reading(self.batch_size, self.rank, self.world_size, workers, self.multiple_of)
        view = copy.copy(self)
        view._plan(workers)
        return view

    def epoch_samples(self) -> int:
        """The samples an epoch reads, over every process (the rest of each reader's shards is dropped)."""
        return self.batches_per_epoch * self.batch_size * self.world_size

    def _locate(self, shards: str | Sequence[PathLike]) -> tuple[list[Any], list[int]]:
        """The shards and their sample counts (local files: counted from their tar headers)."""
        paths = expand_shards(shards)
        return paths, _counted(paths)

    def where(self) -> str:
        """Where the shards are, for messages."""
        return str(Path(self.paths[0]).parent)

    def __len__(self) -> int:
        return sum(self.counts)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and this process's first batch of it (0 unless resuming)."""
        self.epoch, self.start_batch = checked_epoch(epoch, start_batch, self.batches_per_epoch)

    def shard_order(self, epoch: int) -> list[int]:
        """The epoch's permutation of shard indices (identical on every rank)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.paths), generator=generator).tolist()

    def reader_shards(self, epoch: int, reader: int) -> list[int]:
        """The shards reader ``reader`` (``rank * W + worker``) reads in ``epoch``, in order."""
        return self.shard_order(epoch)[reader :: self.readers]

    def _stream(self, epoch: int, reader: int, skip: int) -> Iterator[tuple[Path, _Sample]]:
        """The reader's samples in order, the first ``skip`` dropped unread (whole shards unopened)."""
        for shard in self.reader_shards(epoch, reader):
            if skip >= self.counts[shard]:
                skip -= self.counts[shard]
                continue
            rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + shard)
            for sample in _shuffled(_samples(self.paths[shard]), self.shuffle_buffer, rng):
                if skip:
                    skip -= 1
                    continue
                yield self.paths[shard], sample

    def _decode(self, files: _Files, path: Path, sample: _Sample) -> torch.Tensor | None:
        key, members = sample
        image = next((s for s in members if s.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)
        try:
            if image is None:
                raise BrokenImageError(Path(f"{path}:{key}"), f"no image file (has: {', '.join(members) or 'none'})")
            data = files.read(path, *members[image])
            return decode_image(data, self.load_size, self.channels, name=f"{path}:{key}.{image}")
        except BrokenImageError:
            return None

    def _images(self, stream: Iterator[tuple[Path, _Sample]], files: _Files) -> Iterator[tuple[torch.Tensor, int]]:
        """``(image, skipped)`` per sample; a broken one replaced by the next readable sample."""
        ahead: deque[torch.Tensor | None] = deque()  # decoded samples after the current one
        end = object()
        last: torch.Tensor | None = None

        def pull(i: int) -> Any:
            while len(ahead) <= i:
                item = next(stream, None)
                if item is None:
                    return end
                ahead.append(self._decode(files, *item))
            return ahead[i]

        while (image := pull(0)) is not end:
            ahead.popleft()
            skipped = int(image is None)  # each broken sample counts once, however far its replacement is
            ahead_at = 0
            while image is None:  # broken: the next readable sample takes its place
                image = pull(ahead_at)
                ahead_at += 1
                if image is end:
                    image = last
                    if image is None:
                        raise NoReadableImagesError(f"no readable image left in the shards of {self.where()}")
            last = image
            yield image, skipped

    def reader_batches(self, epoch: int, reader: int, start: int = 0) -> Iterator[tuple[torch.Tensor, int]]:
        """Batches ``start`` .. ``batches_per_reader - 1`` of a reader: ``(uint8 (B, C, S, S), skipped)``."""
        files = _Files()
        try:
            images = self._images(self._stream(epoch, reader, start * self.batch_size), files)
            for _ in range(start, self.batches_per_reader):
                found = [next(images, None) for _ in range(self.batch_size)]
                batch = [item for item in found if item is not None]
                if len(batch) < self.batch_size:
                    raise NoReadableImagesError(
                        f"the shards of reader {reader} hold fewer samples than counted at the start; "
                        f"were the shards under {self.where()} changed during the run?"
                    )
                yield torch.stack([image for image, _ in batch]), sum(s for _, s in batch)
        finally:
            files.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, count = (0, 1) if info is None else (info.id, info.num_workers)
        if count != self.per_rank:
            raise ValueError(
                f"this ShardDataset was built for {self.workers} loader workers and is read by {count}; "
                "give the DataLoader num_workers=workers (make_shard_loader does)"
            )
        # Batch k of the epoch comes from reader k % W; a resumed epoch starts at batch
        # start_batch, so worker w takes the reader whose turn is w batches later.
        local = (worker + self.start_batch) % self.per_rank
        done = (self.start_batch - local + self.per_rank - 1) // self.per_rank  # its batches already used
        yield from self.reader_batches(self.epoch, self.rank * self.per_rank + local, done)


def _check_reading(batch_size: int, rank: int, world_size: int, workers: int, multiple_of: int) -> None:
    """A ``TypeError`` / ``ValueError`` for a ``ShardDataset`` argument out of range (a probe: ``batch_size=0`` was a
    ZeroDivisionError, ``rank=5`` of 2 blamed shards changed during the run)."""
    least = {"batch_size": 1, "world_size": 1, "workers": 0, "multiple_of": 1, "rank": 0}
    given = {"batch_size": batch_size, "world_size": world_size, "workers": workers, "multiple_of": multiple_of}
    for name, value in {**given, "rank": rank}.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < least[name]:
            raise ValueError(f"{name} must be at least {least[name]}, got {value}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}: ranks are 0 to {world_size - 1}")


def _label(data: bytes) -> int:
    """A webdataset ``.cls`` member: an integer written as text."""
    return int(data.decode("ascii").strip())


LABEL_PROBE = 20  # samples read to tell whether shards are labelled: one bad .cls does not decide


def first_label_problem(labels: Iterable[tuple[str, bytes | None]]) -> str | None:
    """None when one of the first ``LABEL_PROBE`` ``(key, .cls data)`` pairs holds a class index; else why the
    first holds none ("no samples" when there is none)."""
    first = None
    for key, data in itertools.islice(labels, LABEL_PROBE):
        problem = label_problem(key, data)
        if problem is None:
            return None
        first = first or problem
    return first or "no samples"


def label_problem(key: str, data: bytes | None) -> str | None:
    """Why sample ``key``'s ``.cls`` member (``data``; None: it has none) is no class index, or None when it is one."""
    if data is None:
        return f"sample {key} has no .cls member"
    try:
        if _label(data) >= 0:
            return None
    except (ValueError, UnicodeDecodeError):
        pass
    return f"sample {key}'s .cls holds {data[:40]!r}, not a class index (0, 1, 2, ...)"


def sample_label(key: str, data: bytes | None, optional: bool = False) -> int:
    """The class index in sample ``key``'s ``.cls`` member (``data``; None: it has none): a ``ValueError`` naming
    why there is none (``label_problem``), or -1 when labels are ``optional`` (``embed`` without ``--labels``)."""
    problem = label_problem(key, data)
    if problem is None:
        return _label(data)  # type: ignore[arg-type]  # not None: label_problem names a missing member
    if optional:
        return -1
    raise ValueError(problem)


def no_labels_error(source: str, problem: str) -> ValueError:
    """The one-line error of labelled shards (evaluation) whose first sample has no usable label."""
    return ValueError(
        f"the shards of {source!r} have no labels ({problem}); labels are needed here (eval, embed --labels, "
        "train --val-data): "
        "shards whose samples hold a .cls file with the class index, a folder with one sub-folder per class, "
        "cifar10:ROOT or an hf: dataset with a label column"
    )


def _class_names(paths: Sequence[Path]) -> list[str] | None:
    """``classes.json`` beside the shards (``shards make --labels`` writes it), when they all lie in one folder."""
    folders = {Path(p).parent for p in paths}
    if len(folders) != 1:
        return None
    try:
        names = json.loads((folders.pop() / "classes.json").read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


class ShardSamples(IterableDataset):
    """Every sample of tar shards once, in order, with its key and label: for evaluation and ``embed``.

    Shards are read in the order given (a spec expands sorted); loader worker ``w`` of ``W``
    reads shards ``w, w + W, ...``. Items are ``(image, label, key, ok)``: the ``uint8 (C, S, S)``
    image, the ``.cls`` label (-1 when not ``labelled``), ``SHARD:KEY``, and False for a broken
    sample (undecodable, no image file, a bad label), whose image is zeros: consumers leave it out.

    Args:
        shards: a spec or a list of shard paths (see ``expand_shards``).
        load_size: side ``S`` of the images.
        channels: 1 or 3.
        labelled: read the ``.cls`` member as the label; a sample without one (or with one that is no class
            index) is left out as broken, unless ``labels_optional``: then its label is -1 (``embed`` without
            ``--labels``, whose vectors are wanted whether labelled or not).
        keep: ``keep(shard_index, position_in_shard)`` selects samples (None: all); a deterministic
            split that does not depend on the worker count.

    Raises:
        ImportError: webdataset is not installed.
        ValueError: missing or unreadable shards; with ``labelled``, a sample without ``.cls``.
    """

    def __init__(
        self,
        shards: str | Sequence[PathLike],
        load_size: int,
        channels: int = 3,
        labelled: bool = False,
        keep: Any = None,
        labels_optional: bool = False,
    ) -> None:
        check_load_size(load_size, channels)
        apply_pixel_limit()  # a bad BYOL_PYTORCH_MAX_IMAGE_PIXELS stops here, not as unreadable samples
        self.paths = expand_shards(shards)
        self.names = shard_names(self.paths)  # the SHARD of each sample id
        self.load_size, self.channels, self.labelled, self.keep = load_size, channels, labelled, keep
        self.labels_optional = labels_optional
        self.skip: Container[str] = frozenset()  # ``SHARD:KEY`` ids to pass over unread (a resumed embed)
        self.source = str(shards) if isinstance(shards, str) else f"{len(self.paths)} shards"
        self.counts = _counted(self.paths)
        self.length = self._kept()
        problem = self._label_problem() if labelled else None
        if problem is not None:
            raise no_labels_error(self.source, problem)
        self.classes = _class_names(self.paths) if labelled else None  # names of labels 0, 1, ...; None: unknown

    def _label_problem(self) -> str | None:
        """Why none of the first samples' ``.cls`` holds a class index (None: one does; ``first_label_problem``)."""
        files = _Files()

        def labels() -> Iterator[tuple[str, bytes | None]]:
            for k, path in enumerate(self.paths):
                for key, members in _samples(path):
                    yield f"{self.names[k]}:{key}", files.read(path, *members["cls"]) if "cls" in members else None

        try:
            return first_label_problem(labels())
        finally:
            files.close()

    def labelled_available(self) -> bool:
        """Whether the first samples' ``.cls`` hold class indices (webdataset's convention for class labels)."""
        return self._label_problem() is None

    def with_keep(self, keep: Any) -> ShardSamples:
        """These samples selected by ``keep`` (see the class), without reading the shards' headers again."""
        view = copy.copy(self)
        view.keep, view.skip = keep, self.skip
        view.length = view._kept()
        return view

    def _kept(self) -> int:
        """How many samples ``keep`` selects (all without one)."""
        keep = self.keep
        return sum(sum(1 for i in range(n) if keep is None or keep(k, i)) for k, n in enumerate(self.counts))

    def __len__(self) -> int:
        return self.length

    def _item(self, files: _Files, k: int, sample: _Sample) -> tuple[torch.Tensor, int, str, bool]:
        key, members = sample
        path, name = self.paths[k], f"{self.names[k]}:{key}"
        image = next((s for s in members if s.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)
        try:
            if image is None:
                raise BrokenImageError(Path(name), "no image file")
            label = -1
            if self.labelled:
                data = files.read(path, *members["cls"]) if "cls" in members else None
                label = sample_label(name, data, self.labels_optional)
            pixels = decode_image(files.read(path, *members[image]), self.load_size, self.channels, name=name)
            return pixels, label, name, True
        except (BrokenImageError, ValueError, UnicodeDecodeError):
            return torch.zeros(self.channels, self.load_size, self.load_size, dtype=torch.uint8), -1, name, False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str, bool]]:
        info = get_worker_info()
        worker, count = (0, 1) if info is None else (info.id, info.num_workers)
        files = _Files()
        try:
            for k in range(worker, len(self.paths), count):
                for i, sample in enumerate(_samples(self.paths[k])):
                    if (self.keep is None or self.keep(k, i)) and f"{self.names[k]}:{sample[0]}" not in self.skip:
                        yield self._item(files, k, sample)
        finally:
            files.close()


def shard_names(locations: Sequence[object]) -> list[str]:
    """How sample ids (``SHARD:KEY``) name each shard: its file name, or its path below the common folder.

    The file name alone while no two shards share one (``train-000001.tar``); else every shard's
    path below the folder they all share (``a/s.tar`` and ``b/s.tar``), so that no two samples of
    different shards get one id.

    Examples:
        >>> shard_names(["data/a/s.tar", "data/b/s.tar"]), shard_names(["x/0.tar", "x/1.tar"])
        (['a/s.tar', 'b/s.tar'], ['0.tar', '1.tar'])
    """
    parts = [str(location).replace(os.sep, "/").split("/") for location in locations]
    names = [p[-1] for p in parts]
    if len(set(names)) == len(names):
        return names
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def epoch_batches(counts: Sequence[int], world_size: int, workers: int, batch_size: int, multiple_of: int = 1) -> int:
    """Batches per process in an epoch of shards of ``counts`` samples (``ShardDataset``'s rule; 0 when none).

    Each of the ``world_size x max(1, workers)`` readers reads whole shards and yields as many
    batches as the smallest share of shards any reader can get.
    """
    per_rank = max(1, workers)
    readers = world_size * per_rank
    if len(counts) < readers:
        return 0
    least = sum(sorted(counts)[: len(counts) // readers])
    return per_rank * (least // batch_size) // multiple_of * multiple_of


def shard_workers(
    counts: Sequence[int], world_size: int, most: int, batch_size: int, multiple_of: int = 1, least: int = 1
) -> int:
    """The loader workers per process, ``least`` to ``most`` (fewer only when none of those makes a step),
    for shards of ``counts`` samples.

    The most workers whose epoch reads at least 90% of what the best worker count's reads:
    readers take whole shards, so a worker count that does not divide the shards evenly can
    leave much of each epoch unread (3 shards, 2 workers: a third to a half).
    """
    top = max(1, most)
    reads = {w: epoch_batches(counts, world_size, w, batch_size, multiple_of) for w in range(min(least, top), top + 1)}
    best = max(reads.values())
    if best == 0 and least > 1:  # no count from ``least`` up makes a step: fewer workers, down to one
        return shard_workers(counts, world_size, most, batch_size, multiple_of)
    return max(w for w, batches in reads.items() if batches >= 0.9 * best)


def make_shard_loader(dataset: ShardDataset, pin_memory: bool = False) -> DataLoader:
    """The DataLoader of a ``ShardDataset``: its workers, batches made in them, in round-robin order.

    Workers are started anew each epoch (not persistent), so each sees the epoch set by
    ``set_epoch``. The loader has its own seeded generator, so starting an epoch draws
    nothing from torch's global one.
    """
    return make_loader(
        dataset,
        None,
        dataset.workers,
        shuffle=False,
        seed=dataset.seed * 1000 + dataset.rank,
        pin_memory=pin_memory,
        persistent=False,
    )

"""Tar shards in an object store or on a web server: training and evaluation data streamed through ``remote``.

A remote spec is a URL (``https://host/train-{000000..000099}.tar``, ``s3://bucket/train-{0..9}.tar``,
``gs://...``) or ``pipe:CMD`` (webdataset's form: the command writes one shard to its standard
output; braces expand in the whole command). It is split between processes and workers and
ordered per epoch exactly like local shards (``ShardDataset``); only the reading differs:

* **Sequential.** Each shard is read front to back once (``remote.read_shard``), a background
  thread one shard ahead (``remote.Prefetcher``, at most ``remote.READ_AHEAD`` bytes).
* **Shuffle buffer of bytes.** The shuffle buffer holds each sample's encoded image bytes (not
  header offsets as for local files): memory per loader worker is about ``--shuffle-buffer`` x
  the mean encoded image size, plus ``READ_AHEAD`` and fsspec's ``BLOCK``. Images are decoded
  when they leave the buffer.
* **Counts.** Sample counts come from an index (``--shard-index FILE``, webdataset's ``wids``
  format, see ``load_index``; ``byol-pytorch shards index`` writes one): start-up then reads no
  shard at all. Without one, every shard is read once to count its samples and the counts are
  cached (``BYOL_PYTORCH_CACHE`` or ``~/.cache/byol-pytorch``, ``shard-counts/``, keyed by the URLs).
* **Resume** is exact, as for local shards: finished shards are not opened; the current shard
  is read again from its start and the samples already used are dropped after reading.
* **Faults.** A failed read is retried with backoff (``remote.ReadPolicy``); a shard failing past
  that is skipped with a warning naming its (redacted) URL, its remaining samples counted as
  skipped files; too many failures stop the run (``remote.FaultBudget``), as do errors no retry
  heals (a missing object or bucket, denied access).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .._atomic import atomic_write
from .folder import BrokenImageError, apply_pixel_limit, check_load_size, decode_image
from .remote import (
    AGAIN,
    FaultBudget,
    Prefetcher,
    ReadPolicy,
    RemoteReadError,
    ShardFailed,
    is_remote,
    read_shard,
    redact,
)
from .shards import (
    IMAGE_SUFFIXES,
    ShardDataset,
    _shuffled,
    _webdataset,
    first_label_problem,
    no_labels_error,
    sample_label,
    shard_names,
)

__all__ = [
    "RemoteShardDataset",
    "RemoteShardSamples",
    "SHARD_COUNTS_NAME",
    "count_shards",
    "counts_with_cache",
    "expand_remote",
    "index_document",
    "load_index",
    "remote_counts",
    "shard_file_name",
    "write_index",
]

INDEX_VERSION = 1
SHARD_COUNTS_NAME = "shard_counts.json"
"""A training run's copy of its remote shards' counts (a ``wids`` index), in the run folder."""


def expand_remote(spec: str) -> list[str]:
    """The shard locations of a remote spec (webdataset's brace patterns expanded).

    Examples:
        >>> expand_remote("https://host/a-{00..02}.tar")
        ['https://host/a-00.tar', 'https://host/a-01.tar', 'https://host/a-02.tar']
    """
    braceexpand, _ = _webdataset()
    locations = list(braceexpand.braceexpand(spec))
    if not spec.startswith("pipe:"):
        odd = [u for u in locations if not (u.endswith(".tar") or _path_of(u).endswith(".tar"))]
        if odd:
            raise ValueError(
                f"remote data must be tar shards ending in .tar, before or after a query (a brace pattern such as "
                f"https://host/train-{{000000..000099}}.tar), got {redact(odd[0])!r}"
            )
    return locations


def _path_of(location: str) -> str:
    """A URL without its query and fragment (a pre-signed URL's ``?X-Amz-Signature=...``)."""
    return location.split("#", 1)[0].split("?", 1)[0]


def _shard_label(location: str) -> str:
    """What names a remote shard in sample ids: its redacted URL, the query left out where the path names the tar."""
    shown = redact(location)
    return _path_of(shown) if _path_of(shown).endswith(".tar") else shown


def _is_image(suffix: str) -> bool:
    return suffix.rsplit(".", 1)[-1] in IMAGE_SUFFIXES


def _first_image(suffix: str, members: dict[str, Any]) -> bool:
    """``wanted`` of a training read: the sample's first image member only."""
    return _is_image(suffix) and not any(_is_image(s) and v is not None for s, v in members.items())


def _image_and_label(suffix: str, members: dict[str, Any]) -> bool:
    return suffix == "cls" or _first_image(suffix, members)


def _nothing(suffix: str, members: dict[str, Any]) -> bool:
    return False


def count_shards(locations: Sequence[str], policy: ReadPolicy | None = None) -> list[int]:
    """Samples per shard, counted by reading each one through (no member's bytes kept)."""
    counts = []
    for location in locations:
        try:
            counts.append(sum(1 for _ in read_shard(location, None, _nothing, policy)))
        except ShardFailed as failure:
            raise RemoteReadError(
                f"cannot count the samples of the shards: {failure}; check the network and the storage (train also "
                "takes --shard-index, which byol-pytorch shards index writes, and then counts nothing)"
            ) from None
    return counts


def index_document(locations: Sequence[str], counts: Sequence[int], name: str | None = None) -> dict[str, Any]:
    """A shard index in webdataset's ``wids`` format (URLs redacted).

    Examples:
        >>> index_document(["https://u:p@h/a.tar"], [12])
        {'wids_version': 1, 'shardlist': [{'url': 'https://***@h/a.tar', 'nsamples': 12}]}
    """
    document: dict[str, Any] = {"wids_version": INDEX_VERSION}
    if name:
        document["name"] = name
    document["shardlist"] = [{"url": redact(u), "nsamples": int(n)} for u, n in zip(locations, counts)]
    return document


def _read_bytes(location: str) -> bytes:
    """A local or remote file; a remote read that may heal (a 5xx, a dropped connection) is retried."""
    if not is_remote(location) or location.startswith("pipe:"):
        return Path(location).read_bytes()
    from .remote import _filesystem, _permanent, for_scheme

    policy, attempt = for_scheme(ReadPolicy(), location), 0
    while True:
        try:
            fs, path = _filesystem(location, policy)
            with fs.open(path, "rb") as file:
                return file.read()
        except ImportError:
            raise
        except Exception as error:
            attempt += 1
            if _permanent(error, location, at_start=False) is not None or attempt > policy.retries:
                raise
            time.sleep(policy.wait(attempt))


def shard_file_name(location: str) -> str:
    """The part of a shard's location after the last ``/``: of an http(s) URL its path's, without the query or
    fragment (an object store's key may hold ``?`` or ``#``: ``s3://`` and ``gs://`` keys are taken whole)."""
    if location.lower().startswith(("http://", "https://")):
        location = urllib.parse.unquote(_path_of(location))  # 'a%20b.tar' is 'a b.tar'
    return location.rsplit("/", 1)[-1]


def load_index(index: str, locations: Sequence[str]) -> list[int]:
    """The sample counts of ``locations`` from an index file (local path or URL).

    The format is webdataset's ``wids`` shard index: ``{"wids_version": 1, "shardlist":
    [{"url": "train-000000.tar", "nsamples": 1000}, ...]}``. A shard is found by its full URL,
    else by its name (the part after the last ``/``; of an http(s) URL, its path's, so a
    pre-signed URL's query does not count), so an index of relative names fits the shards wherever they
    are served.

    Raises:
        ValueError: unreadable or malformed index, or a shard it does not list.
    """
    try:
        data = _read_bytes(index)
    except ImportError:
        raise
    except Exception as error:  # not there, not answered, not allowed: the file, not its format
        from .remote import _reason

        raise ValueError(
            f"--shard-index {redact(index)}: cannot be read ({_reason(error)}); check its path or URL and the server"
        ) from None
    try:
        document = json.loads(data.decode("utf-8"))
        entries = document["shardlist"]
        by_url = {str(e["url"]): int(e["nsamples"]) for e in entries}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"--shard-index {redact(index)}: not a readable shard index ({type(error).__name__}: {error}); "
            'expected {"wids_version": 1, "shardlist": [{"url": ..., "nsamples": ...}]} '
            "(byol-pytorch shards index writes one)"
        ) from None
    by_name = {shard_file_name(url): n for url, n in by_url.items()}
    counts, missing = [], []
    for location in locations:
        count = by_url.get(redact(location), by_name.get(shard_file_name(location)))
        if count is None:
            missing.append(location)
        counts.append(count or 0)
    if missing:
        raise ValueError(
            f"--shard-index {redact(index)} lists {len(locations) - len(missing)} of the {len(locations)} shards, "
            f"not e.g. {redact(missing[0])}; write it again with byol-pytorch shards index"
        )
    return counts


def _cache_file(locations: Sequence[str]) -> Path:
    root = Path(os.environ.get("BYOL_PYTORCH_CACHE") or Path.home() / ".cache" / "byol-pytorch")
    digest = hashlib.sha256("\n".join(locations).encode()).hexdigest()[:32]
    return root / "shard-counts" / f"{digest}.json"


def remote_counts(locations: Sequence[str], index: str | None = None, policy: ReadPolicy | None = None) -> list[int]:
    """Sample counts of remote shards: from ``index``, else a cached count, else counted now (and cached)."""
    if index:
        return load_index(index, locations)
    cache = _cache_file(locations)
    try:
        return load_index(str(cache), locations)
    except ValueError:
        pass
    counts = count_shards(locations, policy)
    try:
        write_index(cache, locations, counts)
    except OSError:
        pass  # no cache: counted again next time
    return counts


def write_index(path: str | Path, locations: Sequence[str], counts: Sequence[int]) -> None:
    """Write ``index_document(locations, counts)`` to ``path`` atomically (``OSError`` leaves it as it was)."""
    document = json.dumps(index_document(locations, counts))

    def write(temporary: str) -> None:
        Path(temporary).write_text(document)

    atomic_write(path, write)


def counts_with_cache(
    locations: Sequence[str], index: str | None, run_file: str | Path
) -> tuple[list[int], Callable[[], None] | None]:
    """A run's shard counts: ``run_file`` (the run folder's copy) first, else ``remote_counts``.

    Returns ``(counts, save)``: ``save()`` writes ``run_file`` atomically (a wids index) when it
    was missing or stale and no ``index`` was given; the caller runs it once the run is sure to
    start (a refused start writes nothing into the run folder). A resumed run reads its counts
    from there: no shard is counted again, whatever became of the user cache.
    """
    if index:
        return load_index(index, locations), None
    try:
        return load_index(str(run_file), locations), None
    except ValueError:
        pass
    counts = remote_counts(locations, None)
    return counts, functools.partial(write_index, run_file, locations, counts)


def _decode_sample(sample: Any, load_size: int, channels: int, where: str) -> tuple[torch.Tensor | None, str]:
    """``(image or None when broken, name)`` of a streamed sample (None: skipped by a failed read)."""
    if sample is None:
        return None, f"{where}:?"
    key, members = sample
    name = f"{where}:{key}"
    image = next((s for s, v in members.items() if v is not None and _is_image(s)), None)
    if image is None:
        return None, name
    try:
        return decode_image(members[image], load_size, channels, name=f"{name}.{image}"), name
    except BrokenImageError:
        return None, name


def _fetched(prefetcher: Prefetcher, number: int, expected: int, budget: FaultBudget) -> Iterator[Any]:
    """Job ``number``'s samples; after a failure past its retries, None for each sample not read."""
    delivered = 0
    try:
        for sample in prefetcher.shard(number):
            delivered += 1
            yield sample
    except ShardFailed as failure:
        budget.failure(failure, expected - delivered)
        for _ in range(expected - delivered):
            yield None
        return
    budget.ok()


class RemoteShardDataset(ShardDataset):
    """``ShardDataset`` of remote shards (module doc): the same batches, split and order, read as streams.

    Args:
        shards: a remote spec (``is_remote``).
        index: a ``wids`` shard index with the sample counts (see ``load_index``); None: counted once, cached.
        policy: retries, backoff and timeouts of the reads.
        counts: the shards' sample counts when already known (a training run's rank 0 sends them).
        Others: see ``ShardDataset``.
    """

    def __init__(
        self,
        shards: str,
        load_size: int,
        batch_size: int,
        channels: int = 3,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        multiple_of: int = 1,
        *,
        index: str | None = None,
        policy: ReadPolicy | None = None,
        counts: Sequence[int] | None = None,
    ) -> None:
        self.spec, self.index, self.policy = shards, index, policy or ReadPolicy()
        self.known = None if counts is None else [int(n) for n in counts]
        super().__init__(
            shards, load_size, batch_size, channels, rank, world_size, workers, seed, shuffle_buffer, multiple_of
        )

    def _locate(self, shards: Any) -> tuple[list[Any], list[int]]:
        locations = expand_remote(str(shards))
        if self.known is not None and len(self.known) == len(locations):
            return locations, self.known
        return locations, remote_counts(locations, self.index, self.policy)

    def where(self) -> str:
        return redact(self.spec)

    def _stream(self, epoch: int, reader: int, skip: int) -> Iterator[tuple[Any, Any]]:
        jobs: list[int] = []
        for shard in self.reader_shards(epoch, reader):
            if skip >= self.counts[shard] and not jobs:
                skip -= self.counts[shard]  # finished before a resume: not opened
                continue
            jobs.append(shard)
        prefetcher = Prefetcher([(self.paths[s], self.counts[s]) for s in jobs], _first_image, self.policy)
        budget = FaultBudget()
        try:
            for number, shard in enumerate(jobs):
                rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + shard)
                samples = _fetched(prefetcher, number, self.counts[shard], budget)
                for sample in _shuffled(samples, self.shuffle_buffer, rng):  # type: ignore[arg-type]
                    if skip:
                        skip -= 1
                        continue
                    yield self.paths[shard], sample
            if budget.opened and budget.failed == budget.opened:
                raise RemoteReadError(
                    f"none of the {budget.opened} shards this loader worker opened could be read, the last "
                    f"{budget.last}; check the network and the storage, then run it again ({AGAIN})"
                )
        finally:
            prefetcher.close()

    def _decode(self, files: Any, path: Any, sample: Any) -> torch.Tensor | None:
        return _decode_sample(sample, self.load_size, self.channels, redact(path).rsplit("/", 1)[-1])[0]


class RemoteShardSamples(IterableDataset):
    """Every sample of remote shards once, in order: ``(image, label, key, readable)`` like ``ShardSamples``.

    Loader worker ``w`` of ``W`` reads shards ``w, w + W, ...``. The length needs the sample
    counts (an index, or counted once and cached): it is asked for only by ``len()``.
    """

    def __init__(
        self,
        shards: str,
        load_size: int,
        channels: int = 3,
        labelled: bool = False,
        index: str | None = None,
        policy: ReadPolicy | None = None,
        labels_optional: bool = False,
    ) -> None:
        check_load_size(load_size, channels)
        apply_pixel_limit()  # a bad BYOL_PYTORCH_MAX_IMAGE_PIXELS stops here, not as unreadable samples
        self.spec, self.paths = shards, expand_remote(shards)
        self.names = dict(zip(self.paths, shard_names([_shard_label(location) for location in self.paths])))
        self.load_size, self.channels, self.labelled = load_size, channels, labelled
        self.labels_optional = labels_optional  # a sample without a class index: label -1, still read (embed)
        self.index, self.policy = index, policy or ReadPolicy()
        self.source = redact(shards)
        self.skip: Container[str] = frozenset()
        self._length: int | None = None
        problem = self._label_problem() if labelled else None  # one sample read: refused before any run
        if problem is not None:
            raise no_labels_error(self.source, problem)

    def _label_problem(self) -> str | None:
        """Why none of the first samples' ``.cls`` holds a class index (None: one does; reads the first shards'
        first ``LABEL_PROBE`` samples).

        Raises:
            ValueError: a shard cannot be read (one line, the location redacted).
        """

        def labels() -> Iterator[tuple[str, bytes | None]]:
            for location in self.paths:
                for key, members in read_shard(location, None, _image_and_label, self.policy):
                    yield f"{self.names[location]}:{key}", members.get("cls")

        try:
            return first_label_problem(labels())
        except (ShardFailed, RemoteReadError) as error:
            raise ValueError(redact(str(error))) from None

    def labelled_available(self) -> bool:
        """Whether the first sample's ``.cls`` holds a class index (reads the first shard's first sample)."""
        return self._label_problem() is None

    counts_lazily = True  # ``len()`` may read every shard (no index, no cache): ``make_loader`` does not ask

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(remote_counts(self.paths, self.index, self.policy))
        return self._length

    def counted_by(self) -> tuple[str, str]:
        """Where ``len()``'s sample counts come from, and how to count again: for a message when the shards held
        other counts (they changed since)."""
        if self.index:
            return f"--shard-index {redact(self.index)}", "write it again with byol-pytorch shards index"
        return f"the counts cached in {_cache_file(self.paths)}", "remove that file to count the shards again"

    def _item(self, location: str, sample: Any) -> tuple[torch.Tensor, int, str, bool]:
        image, name = _decode_sample(sample, self.load_size, self.channels, self.names[location])
        label = -1
        if image is not None and self.labelled:
            try:
                label = sample_label(name, sample[1].get("cls"), self.labels_optional)
            except ValueError:
                image = None  # no class index: left out, as a broken sample
        if image is None:
            return torch.zeros(self.channels, self.load_size, self.load_size, dtype=torch.uint8), -1, name, False
        return image, label, name, True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str, bool]]:
        info = get_worker_info()
        worker, count = (0, 1) if info is None else (info.id, info.num_workers)
        wanted = _image_and_label if self.labelled else _first_image
        budget = FaultBudget()
        for location in self.paths[worker::count]:
            try:
                for sample in read_shard(location, None, wanted, self.policy):
                    item = self._item(location, sample)
                    if item[2] not in self.skip:
                        yield item
                budget.ok()
            except ShardFailed as failure:
                budget.failure(failure, None)  # its unknown rest is not handed out: a warning, or the stop

"""``byol-pytorch embed``: the representation of every image of a dataset, streamed to disk.

    byol-pytorch embed --data SPEC --checkpoint RUNDIR/last.pt --out DIR

writes into DIR:

* ``embeddings.npy``: (N, D) float16 (``--dtype float32`` for full precision), one row per readable
  image, the vector ``learner(x, return_embedding=True, return_projection=False)`` gives for the
  image in eval mode (the backbone's pooled features at the hidden layer); ``np.load(path,
  mmap_mode="r")`` maps it without reading it;
* ``ids.txt``: the sample id of each row, one per line (a folder's relative file paths,
  ``SPLIT:INDEX`` for CIFAR and ``hf:`` rows, ``SHARD:KEY`` for tar shards);
* ``labels.npy``: (N,) int64 labels, where the source has them (CIFAR, an ``hf:`` label column,
  shards with ``.cls`` files, a folder of class sub-folders with ``--labels``);
* ``embed.json``: what was embedded (data, checkpoint, step, model, rows, broken images left out; with
  labels, the class names where the source has them: label i is ``classes[i]``).

Rows are written as they are computed, through a plain file (no memory map, no list of
vectors): memory stays flat whatever the dataset's size. Every ``--flush-every`` batches the
files are flushed and ``embed_state.json`` records how far they are; a run stopped on the way
continues where it was with ``--resume`` (map-style data skips the items done; tar shards skip
the samples done before decoding them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .._atomic import atomic_write, names_the_file
from ..batchnorm import recalibrate_batchnorm
from ..data import (
    embedding_items,
    make_loader,
    match_channels,
    open_labelled,
    open_unlabelled,
    sample_images,
)
from ..data.cifar import parse_cifar_spec
from ..data.hf import UnlabelledRowsError, parse_hf_spec
from ..data.remote import is_remote, redact
from ..data.remote_shards import RemoteShardSamples
from ..data.shards import ShardSamples
from ..data.sources import check_shard_index, held_out_split, local_path
from ..training.models import learner_from_checkpoint
from ..training.recipe import Recipe
from ..training.validation import clean_input
from .devices import resolve_device
from .errors import UserError
from .runlock import RunFolderLock

__all__ = ["NpyRows", "add_embed_arguments", "run_embed"]

STATE = "embed_state.json"
_MAGIC = b"\x93NUMPY\x01\x00"


class RowsOverflow(ValueError):
    """More rows than an ``NpyRows`` was opened for."""


class NpyRows:
    """An ``.npy`` file of (N, *shape) rows written one batch at a time, N fixed when it is closed.

    The header is written first for the largest N and rewritten, at the same length, when the
    file is finished with fewer rows; the file is then cut to them. ``np.load`` reads it like any
    ``.npy``. A write that stops (``close(final=False)``) leaves the header of the rows written,
    so a stopped run's file reads as those rows; its resume writes the largest N's header again
    (a run killed outright leaves that one, and more bytes than it says).

    Args:
        path: the file.
        capacity: the largest number of rows it will hold.
        shape: the shape of one row (``(D,)`` or ``()``).
        dtype: the rows' dtype.
        rows: rows already in the file (a resumed write appends after them).
    """

    def __init__(self, path: Path, capacity: int, shape: tuple[int, ...], dtype: np.dtype, rows: int = 0) -> None:
        self._describe(path, capacity, shape, dtype)
        fresh = rows == 0
        if not fresh:
            self._check_resumed(rows)
        self.file: BinaryIO = open(path, "w+b" if fresh else "r+b")  # noqa: SIM115 (closed by close())
        self.file.write(self._header(capacity, pad=self.header_len))  # a resumed one's said the rows it had
        if fresh:
            rows = 0
        self.rows = rows
        self.file.seek(self.header_len + rows * self.row_bytes)
        self.file.truncate()

    def _describe(self, path: Path, capacity: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype, self.capacity = path, tuple(shape), np.dtype(dtype), capacity
        self.header_len = len(self._header(capacity, pad=0))
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def check(cls, path: Path, capacity: int, shape: tuple[int, ...], dtype: np.dtype, rows: int) -> None:
        """The ``ValueError`` opening the stopped run's file for ``rows`` rows would raise, without opening it
        (a resume checks every file before it touches one)."""
        probe = cls.__new__(cls)
        probe._describe(path, capacity, shape, dtype)
        probe._check_resumed(rows)

    def _check_resumed(self, rows: int) -> None:
        """The file a stopped run left: our header and at least its ``rows`` rows, else a ``ValueError``.

        The header is the one for ``capacity`` rows, or the finished one for ``rows`` (a run stopped after
        its last rows were written and before its summary was: a full disk at ``embed.json``).
        """
        headers = {self._header(n, pad=self.header_len) for n in (self.capacity, rows)}
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                found = handle.read(self.header_len)
        except FileNotFoundError:
            size, found = -1, b""
        if found not in headers or size < self.header_len + rows * self.row_bytes:
            raise ValueError(
                f"{self.path} does not hold the {rows} rows the stopped run recorded (it was changed or removed)"
            )

    def _header(self, rows: int, pad: int) -> bytes:
        text = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (rows, *self.shape)})
        body = text.encode("latin1")
        length = max(pad - len(_MAGIC) - 2, -(-(len(_MAGIC) + 2 + len(body) + 1) // 64) * 64 - len(_MAGIC) - 2)
        body = body + b" " * (length - len(body) - 1) + b"\n"
        return _MAGIC + struct.pack("<H", length) + body

    def write(self, batch: np.ndarray) -> None:
        """Append rows (their count first; ``RowsOverflow`` past the capacity)."""
        if self.rows + len(batch) > self.capacity:
            raise RowsOverflow(f"{self.path} holds at most {self.capacity} rows")
        self.file.write(np.ascontiguousarray(batch, dtype=self.dtype).tobytes())
        self.rows += len(batch)

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self, final: bool, rows: int | None = None) -> None:
        """Close the file holding its first ``rows`` rows (default: all written), its header saying so
        (``final``: for good; else a stopped write's, which a resume appends to)."""
        self.rows = self.rows if rows is None else min(rows, self.rows)
        self.file.seek(0)
        self.file.write(self._header(self.rows, pad=self.header_len))
        self.file.truncate(self.header_len + self.rows * self.row_bytes)
        self.flush()
        self.file.close()


def add_embed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``byol-pytorch embed``."""
    a = parser.add_argument
    a("--data", required=True, help="the images: a folder, cifar10:ROOT, hf:PATH or tar shards (as train's --data)")
    a("--checkpoint", required=True, help="RUNDIR/last.pt")
    a("--out", required=True, help="folder for embeddings.npy, ids.txt, labels.npy, embed.json")
    a("--dtype", choices=["float16", "float32"], default="float16", help="of the vectors (default: %(default)s)")
    a("--labels", action="store_true", help="a folder of class sub-folders: write their labels too")
    a("--which", choices=["online", "target"], default="online", help="the network to embed with (default: online)")
    a(
        "--bn-stats",
        choices=["clean", "trained"],
        default="clean",
        help="BatchNorm statistics: clean = re-estimated on un-augmented training images (the checkpoint's; "
        "re-estimated on 512 of the images for an older checkpoint), trained = those of the views (default: clean)",
    )
    a(
        "--label-column",
        help="hf: data: the column of class indices written to labels.npy (default: the one ClassLabel column, "
        "else integers named label/labels); implies --labels",
    )
    a("--image-column", help="hf: data: the image column (default: the one datasets.Image column, else of image bytes)")
    a("--hf-split", help="hf: data with splits: the split (default: train, or the only split); CIFAR: train or test")
    a(
        "--shard-index",
        metavar="INDEX",
        help="remote tar shards: a shard index with each shard's sample count (as train's --shard-index), so "
        "start-up reads no shard; without it the shards are read once to count them and the counts cached",
    )
    a("--batch-size", type=int, default=256, help="images per forward (default: %(default)s)")
    a("--workers", type=int, default=0, help="loader processes (default: %(default)s)")
    a("--device", help="default: cuda when available, else cpu")
    a("--flush-every", type=int, default=50, help="batches between flushes of the files (default: %(default)s)")
    a("--resume", action="store_true", help="continue an embed run in --out that was stopped")
    return parser


def _learner(args: argparse.Namespace, device: torch.device) -> tuple[Any, Recipe, dict[str, Any], str]:
    try:
        learner, checkpoint, statistics = learner_from_checkpoint(args.checkpoint, device, args.which, args.bn_stats)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"--checkpoint: {error}") from error
    return learner, Recipe.from_dict(checkpoint["args"]), checkpoint, statistics


def _clean_statistics(learner: Any, items: Dataset, device: torch.device) -> int:
    """An older checkpoint without clean statistics: re-estimate them on 512 of the images embedded; how many."""
    images = sample_images(items, 512)
    return recalibrate_batchnorm(learner.net, images.to(device), transform=clean_input(learner))


def _has_labels(spec: str, kind: str, args: argparse.Namespace) -> bool:
    if kind == "cifar" or args.labels or args.label_column is not None:
        return True
    if kind == "shards":
        return (RemoteShardSamples if is_remote(spec) else ShardSamples)(spec, 8).labelled_available()
    if kind == "hf":
        from ..data.hf import label_column, load_local_dataset, parse_hf_spec

        data = load_local_dataset(parse_hf_spec(spec) or "", args.hf_split)
        try:
            return label_column(data) is not None
        except ValueError:  # a label column of class names: no labels written (--labels names the fix)
            return False
    return False


def _open(args: argparse.Namespace, size: int, channels: int) -> tuple[Dataset, bool]:
    """The source's embedding items (``data.embedding_items``) and whether they carry labels."""
    try:
        kind = check_shard_index(args.data, args.shard_index)
    except ValueError as error:  # the flag's own message
        raise UserError(str(error)) from None
    if args.label_column is not None and kind != "hf":
        raise UserError(f"--label-column names a column of hf: data, not of {redact(args.data)}; leave it out")
    held = held_out_split(args.data, kind) if kind == "folder" and args.labels else None
    if held is not None:  # its sub-folders are splits, not classes
        spec = str(args.data).rstrip("/")
        raise UserError(
            f"--data {spec} is split into train/ and {held}/, so --labels would label the images by split: embed "
            f"each split on its own, --data {spec}/train --labels and --data {spec}/{held} --labels"
        )
    try:
        labelled = _has_labels(args.data, kind, args)
        options = {"image_column": args.image_column, "split": args.hf_split, "shard_index": args.shard_index}
        dataset = None
        if labelled:
            try:
                dataset = open_labelled(  # shards: a sample without .cls is still embedded (label -1) unless asked
                    args.data,
                    size,
                    channels,
                    label_column=args.label_column,
                    labels_optional=not args.labels,
                    **options,
                )
            except UnlabelledRowsError as error:  # rows labelled -1 (a benchmark's test split): none asked for
                if args.labels or args.label_column is not None:
                    raise
                if error.missing < error.rows:  # some rows have labels: not writing them is said, not silent
                    warnings.warn(
                        f"no labels.npy: {error.missing} of the {error.rows} rows of --data {redact(args.data)} have "
                        "no label (None or -1), and labels.npy holds one for every row; embed a fully labelled split "
                        "(--hf-split), or label every row",
                        UserWarning,
                        stacklevel=2,
                    )
                labelled = False
        if dataset is None:
            dataset = open_unlabelled(args.data, size, channels, **options)
        items = embedding_items(dataset)
    except ImportError as error:
        raise UserError(f"--data {redact(args.data)}: {error}") from None
    except (ValueError, RuntimeError) as error:
        raise UserError(f"--data: {error}") from None
    try:
        len(items)  # type: ignore[arg-type]  # remote shards: their counts (an index, the cache or a read) now
    except (ValueError, RuntimeError) as error:  # with --shard-index, the index's own message names it
        raise UserError(str(error) if args.shard_index else f"--data: {error}") from None
    return items, labelled


def _unlabelled_rows(out: Path) -> int:
    """Rows of a finished ``labels.npy`` labelled -1: shards' samples without a ``.cls`` (read memory-mapped)."""
    labels, chunk = np.load(out / "labels.npy", mmap_mode="r"), 1 << 20
    return sum(int((labels[i : i + chunk] == -1).sum()) for i in range(0, len(labels), chunk))


def data_identity(spec: str) -> str:
    """``--data`` as a progress file records it: a local path made absolute, so that a resume from
    another working directory, or with the folder spelled otherwise (``./photos/``), is the same
    data; a URL or ``pipe:`` command as given, without credentials.

    Examples:
        >>> data_identity("s3://key:secret@bucket/train-{0..9}.tar")
        's3://***@bucket/train-{0..9}.tar'
        >>> data_identity("photos/") == data_identity("./photos") == os.path.abspath("photos")
        True
        >>> data_identity("CIFAR10:") == "cifar10:" + os.path.abspath(".")
        True
    """
    path = local_path(spec)
    if path is None:
        return redact(spec)
    cifar = parse_cifar_spec(spec)
    if cifar is not None:
        return f"{cifar[0]}:{os.path.abspath(path)}"
    if parse_hf_spec(spec) is not None:  # a local dataset's folder or file; a pattern of files stays as given
        return "hf:" + os.path.abspath(path) if os.path.exists(path) else spec
    return os.path.abspath(path)


def _differing(record: dict[str, Any], args: argparse.Namespace, identity: dict[str, Any]) -> list[str]:
    """The keys of ``identity`` (this run's) that a progress file or summary ``record`` holds otherwise."""
    typed = {identity["data"], redact(args.data)}  # a record of the version before holds --data as typed
    return [k for k, v in identity.items() if (record.get(k) not in typed if k == "data" else record.get(k) != v)]


def _finished_as_this(out: Path, args: argparse.Namespace, identity: dict[str, Any]) -> bool:
    """``embed.json`` in ``out`` records this run's data, checkpoint, step, samples and settings (and no stopped
    run's progress file is beside it)."""
    if (out / STATE).exists():
        return False
    try:
        summary = json.loads((out / "embed.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    # the summary says how the statistics came (re-estimated on N images), not the flag
    return isinstance(summary, dict) and _differing(summary, args, identity) in ([], ["bn_stats"])


def _read_state(out: Path, args: argparse.Namespace, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The stopped run's progress (``--resume``), checked against this one; None for a new run."""
    path, finished = out / STATE, not (out / STATE).exists() and (out / "embed.json").exists()
    again = "choose another --out, or remove the folder to embed again"
    if finished:  # nothing to continue
        raise UserError(
            f"{out} already holds finished embeddings (embed.json) of other data, checkpoint or settings; {again}"
            if args.resume
            else f"{out} already holds finished embeddings (embed.json); {again}"
        )
    if not args.resume:
        if path.exists():
            raise UserError(f"{out} holds a stopped embed run; pass --resume to continue it, or {again}")
        return None
    if not path.exists():
        raise UserError(f"--resume: {out} holds no stopped embed run ({STATE} is missing); drop --resume")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        state = None
    counts = ("rows", "items", "broken")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and state[k] >= 0 for k in counts):
        raise UserError(f"--resume: {path} is not the progress file an embed run writes (it was changed); {again}")
    # A state written before the count (or the labels) was kept has none: _check_same_samples still compares the
    # ids, and the files their rows
    differs = [k for k in _differing(state, args, identity) if k not in ("samples", "labels") or k in state]
    if differs == ["samples"]:  # the same data, other contents
        raise UserError(
            f"--resume: --data now holds {identity['samples']} samples, the stopped run's {state.get('samples')}: "
            "its files changed since the stop; embed again into another --out"
        )
    if differs:
        was = {k: state.get(k) for k in differs if k in ("data", "checkpoint")}
        shown = "".join(f"; its --{k} was {v}" for k, v in was.items())
        named = {"step": "checkpoint step", "labels": "labelling (labelled or not)"}
        other = [named.get(k, "--" + k.replace("_", "-")) for k in differs if k != "samples"]
        raise UserError(
            f"--resume: the stopped run in {out} ran with another {', '.join(other)}{shown}; drop --resume and use "
            "another --out"
        )
    return state


class _DoneIds:
    """The samples a resumed run passes over: ``sample_id in done`` compares the id as ``ids.txt`` wrote it.

    ``ids.txt`` holds ``id_line(sample_id)``, an escaped form (a key with a backslash or a line break
    differs from its line), so a raw id is escaped before it is looked up.
    """

    def __init__(self, lines: set[str]) -> None:
        self.lines = lines

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, str) and id_line(sample_id) in self.lines

    def __len__(self) -> int:
        return len(self.lines)


def _remaining(items: Dataset, done: int, ids_done: _DoneIds | None) -> Dataset:
    """The items after those done: a map-style tail, or shards that skip the done samples undecoded."""
    if isinstance(items, ShardSamples | RemoteShardSamples):
        items.skip = ids_done or _DoneIds(set())
        return items
    return Subset(items, range(done, len(items)))  # type: ignore[arg-type]


def _check_same_samples(items: Dataset, state: dict[str, Any] | None, lines: list[str]) -> None:
    """A resumed map-style source goes on by position: the samples embedded before (``lines`` of ``ids.txt``) must
    be its first ones still. (A file added to a folder sorts among the others: the rows would repeat one and miss
    another.)"""
    if not state or not lines or isinstance(items, ShardSamples | RemoteShardSamples):
        return  # shards skip the done samples by id
    sample_id = items.dataset.sample_id  # type: ignore[attr-defined]
    before = {id_line(sample_id(i)) for i in range(min(state["items"], len(items)))}  # type: ignore[arg-type]
    moved = next((line.rstrip("\r\n") for line in lines if line.rstrip("\r\n") not in before), None)
    if moved is not None:
        raise UserError(
            f"--resume: the data changed since the run stopped ({moved!r}, embedded then, is not among its first "
            f"{state['items']} samples now), so its rows would repeat or miss samples; embed again into another --out"
        )


def _write_json(path: Path, value: dict[str, Any]) -> None:
    def write(temp: str) -> None:
        Path(temp).write_text(json.dumps(value, indent=1))

    atomic_write(path, write)


_LINE_BREAKS = {c: f"\\u{ord(c):04x}" for c in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
_LINE_BREAKS["\n"] = "\\n"
_LINE_BREAKS["\\"] = "\\\\"  # a backslash doubled: 'a\\nb' and a name with a newline stay apart


def id_line(sample_id: str) -> str:
    """A sample id as one line of ``ids.txt``: ``str.splitlines`` splits at none of its characters.

    Line breaks become ``\\n`` (a newline) or ``\\uXXXX`` escapes and a backslash ``\\\\``, so that
    no two ids write the same line; bytes of a file name that are not UTF-8 (Python's surrogate
    escapes) become ``\\xNN``. Every other id is written as it is.
    """
    line = "".join(_LINE_BREAKS.get(c, c) for c in sample_id)
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _resumed_ids(path: Path, rows: int) -> tuple[list[str], bool]:
    """The first ``rows`` lines of a stopped run's ``ids.txt`` and whether the file holds more (to cut);
    a ``ValueError`` when it is missing, short or not UTF-8."""
    try:
        data = path.read_bytes()
        lines = data.decode("utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        data, lines = b"", []
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not the UTF-8 text the stopped run wrote (it was changed)") from None
    if len(lines) < rows:
        raise ValueError(f"{path} holds {len(lines)} of the {rows} ids the stopped run recorded (it was changed)")
    return lines[:rows], len("".join(lines[:rows]).encode("utf-8")) != len(data)


class _Outputs:
    """The files of an embed run, opened for a fresh start or a resume."""

    def __init__(
        self,
        out: Path,
        capacity: int,
        dim: int,
        dtype: str,
        labelled: bool,
        state: dict | None,
        check_ids: Callable[[list[str]], None] | None = None,
    ) -> None:
        rows = 0 if state is None else int(state["rows"])
        self.out, self.labelled = out, labelled
        ids = out / "ids.txt"
        kept, cut = _resumed_ids(ids, rows) if state is not None else ([], False)  # checked before any write
        if check_ids is not None:
            check_ids(kept)  # the resumed lines, before any file is touched
        self.done_ids = _DoneIds({line.rstrip("\r\n") for line in kept})  # the samples a resumed run passes over
        vectors: tuple[Path, tuple[int, ...], np.dtype] = (out / "embeddings.npy", (dim,), np.dtype(dtype))
        labels: tuple[Path, tuple[int, ...], np.dtype] = (out / "labels.npy", (), np.dtype(np.int64))
        if rows:  # every file checked before one is opened (opening one rewrites its header)
            for path, shape, kind in [vectors, labels] if labelled else [vectors]:
                NpyRows.check(path, capacity, shape, kind, rows)
        self.vectors = NpyRows(vectors[0], capacity, vectors[1], vectors[2], rows)
        self.labels = NpyRows(labels[0], capacity, labels[1], labels[2], rows) if labelled else None
        if cut:  # drop ids written after the last recorded flush
            atomic_write(ids, lambda temp: Path(temp).write_bytes("".join(kept).encode("utf-8")))
        self.ids = open(ids, "a" if state is not None else "w", encoding="utf-8")  # noqa: SIM115
        self.items = 0 if state is None else int(state["items"])
        self.broken = 0 if state is None else int(state["broken"])
        self.rows = self.vectors.rows  # rows of whole batches: vectors, labels and ids all written

    def write(self, vectors: np.ndarray, labels: np.ndarray, ids: list[str], items: int, broken: int) -> None:
        """One batch's rows, then its counts: a batch cut short by a stop or an error is not counted."""
        text = "".join(id_line(i) + "\n" for i in ids)  # encoded before anything is written
        if ids:
            with names_the_file(self.out):
                self.vectors.write(vectors)
                if self.labels is not None:
                    self.labels.write(labels)
                self.ids.write(text)
        self.rows = self.vectors.rows
        self.items += items
        self.broken += broken

    def flush(self, identity: dict[str, Any]) -> None:
        with names_the_file(self.out):
            self.vectors.flush()
            if self.labels is not None:
                self.labels.flush()
            self.ids.flush()
            os.fsync(self.ids.fileno())
        state = {**identity, "rows": self.rows, "items": self.items, "broken": self.broken}
        _write_json(self.out / STATE, state)

    def close(self, final: bool) -> None:
        with names_the_file(self.out):  # the rows of whole batches: a batch cut short by a stop is left out
            self.vectors.close(final, self.rows)
            if self.labels is not None:
                self.labels.close(final, self.rows)
            self.ids.close()


def _embed_batches(learner: Any, loader: Any, device: torch.device, channels: int, outputs: _Outputs, flush) -> None:
    from tqdm import tqdm

    with torch.no_grad():
        for images, labels, ids, readable in tqdm(loader, desc="embed", unit="batch", file=sys.stderr):
            keep = torch.as_tensor(readable, dtype=torch.bool)
            vectors = np.zeros((0, learner.representation_size), dtype=np.float32)
            if keep.any():
                x = match_channels(images[keep].to(device, non_blocking=True), channels)
                vectors = learner(x, return_embedding=True, return_projection=False).float().cpu().numpy()  # (b, D)
            chosen = [i for i, k in zip(ids, keep.tolist()) if k]
            outputs.write(vectors, torch.as_tensor(labels)[keep].numpy(), chosen, len(keep), int((~keep).sum()))
            flush()


def _counted_by(items: Dataset) -> tuple[str, str] | None:
    """Remote shards: where their sample counts came from and how to count again (``RemoteShardSamples.counted_by``);
    None for data whose samples are counted as it is opened."""
    return items.counted_by() if isinstance(items, RemoteShardSamples) else None


def _check_all_read(outputs: _Outputs, items: Dataset) -> None:
    """A ``UserError`` when samples were never delivered (a remote shard that failed after its retries is skipped,
    as training skips it): the run stays resumable instead of being written up as finished."""
    total = len(items)  # type: ignore[arg-type]
    if outputs.items < total:
        counts = _counted_by(items)
        stale = f"; if none did, the shards hold fewer samples than {counts[0]} says: {counts[1]}" if counts else ""
        raise UserError(
            f"{total - outputs.items} of the {total} samples counted were not read; the {outputs.vectors.rows} rows "
            "written are kept. If a shard failed after its retries (named above), run the same command with --resume "
            f"once the storage answers{stale}" + (", then embed again into another --out" if counts else "")
        )


def _more_than_counted(items: Dataset, out: Path) -> UserError:
    """The error of samples past the count the outputs were opened for (remote shards changed since counted)."""
    source, again = _counted_by(items) or ("their count at the start", "count them again")
    return UserError(
        f"--data: the shards hold more than the {len(items)} samples {source} says, so they changed since: "  # type: ignore[arg-type]
        f"{again}, then embed again into another --out (or remove {out})"
    )


@contextmanager
def _locked(
    out: Path, args: argparse.Namespace, identity: dict[str, Any], open_outputs: Callable[[dict | None], _Outputs]
) -> Iterator[tuple[dict[str, Any] | None, _Outputs]]:
    """``out`` locked for this run (as ``train`` locks its run folder); once it is, the stopped run's state is read
    and the outputs opened (a refusal there leaves the lock file as it was)."""
    lock, found = RunFolderLock(out), dict[str, Any]()

    def check() -> None:
        found["state"] = _read_state(out, args, identity)
        found["outputs"] = open_outputs(found["state"])

    lock.acquire(create=True, check=check)
    try:
        yield found["state"], found["outputs"]
    finally:
        lock.release()


def run_embed(args: argparse.Namespace) -> int:
    """``byol-pytorch embed`` (module doc); returns the exit status."""
    if args.batch_size < 1 or args.workers < 0 or args.flush_every < 1:
        raise UserError("--batch-size and --flush-every must be >= 1 and --workers >= 0")
    device = resolve_device(args.device)
    learner, recipe, checkpoint, statistics = _learner(args, device)
    items, labelled = _open(args, recipe.image_size, learner.channels if learner.channels == 1 else 3)
    if statistics == "missing":
        used = _clean_statistics(learner, items, device)
        statistics = f"clean (re-estimated on {used} of these images)"
    out = Path(args.out)
    identity: dict[str, Any] = {"data": data_identity(args.data), "checkpoint": str(Path(args.checkpoint).resolve())}
    identity.update(which=args.which)
    identity.update(dtype=args.dtype, step=int(checkpoint.get("step", 0)), bn_stats=args.bn_stats)
    identity.update(samples=len(items), labels=labelled)  # type: ignore[arg-type]

    def open_outputs(state: dict | None) -> _Outputs:
        check = functools.partial(_check_same_samples, items, state)
        try:
            return _Outputs(out, len(items), learner.representation_size, args.dtype, labelled, state, check)  # type: ignore[arg-type]
        except ValueError as error:  # a resumed run's files changed since it stopped: nothing was written
            raise UserError(f"--resume: {error}; embed again into another --out (or remove {out})") from None

    if args.resume and _finished_as_this(out, args, identity):  # a requeued job's: as train --resume of a finished run
        print(
            f"byol-pytorch: the embed run in {out} is finished ({out / 'embed.json'}), of this data, checkpoint and "
            "settings: nothing to do (remove the folder or choose another --out to embed again)"
        )
        return 0
    with _locked(out, args, identity, open_outputs) as (state, outputs):  # one embed per --out at a time
        done_ids = outputs.done_ids if state and outputs.vectors.rows else None
        rest = _remaining(items, outputs.items, done_ids)
        pin = device.type == "cuda"  # no CUDA context for --device cpu on a GPU machine
        loader = make_loader(
            rest, args.batch_size, args.workers, shuffle=False, drop_last=False, persistent=False, pin_memory=pin
        )
        batches = [0]

        def flush() -> None:
            batches[0] += 1
            if batches[0] % args.flush_every == 0:
                outputs.flush(identity)

        finished = False
        try:
            _embed_batches(learner, loader, device, learner.channels, outputs, flush)
            finished = outputs.items >= len(items)  # type: ignore[arg-type]  # a failed remote shard: fewer
        except RowsOverflow:
            raise _more_than_counted(items, out) from None
        finally:
            outputs.flush(identity)
            outputs.close(final=finished)
        _check_all_read(outputs, items)
        summary = {**identity, "model": recipe.model, "rows": outputs.vectors.rows, "dim": learner.representation_size}
        summary.update(broken=outputs.broken, labels=labelled, image_size=recipe.image_size, bn_stats=statistics)
        classes = getattr(getattr(items, "dataset", items), "classes", None) if labelled else None
        if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
            summary.update(classes=list(classes))  # label i is classes[i]
        # A folder's FIFOs and dead links, passed over at the scan:
        passed_over = int(getattr(getattr(items, "dataset", None), "passed_over", 0) or 0)
        unlabelled = _unlabelled_rows(out) if labelled else 0
        summary.update(passed_over=passed_over, unlabelled=unlabelled)
        _write_json(out / "embed.json", summary)
        (out / STATE).unlink(missing_ok=True)
        left = f"; {outputs.broken} unreadable images left out" if outputs.broken else ""
        left += f"; {unlabelled} samples without a class index (.cls): -1 in labels.npy" if unlabelled else ""
        if passed_over:
            left += f"; {passed_over} entries that are not regular files (FIFOs, sockets, broken links) passed over"
        print(
            f"byol-pytorch: wrote {outputs.vectors.rows} vectors of {learner.representation_size} ({args.dtype}) to "
            f"{out / 'embeddings.npy'}, their ids to {out / 'ids.txt'}"
            + (f", labels to {out / 'labels.npy'}" if labelled else "")
            + left
        )
        return 0

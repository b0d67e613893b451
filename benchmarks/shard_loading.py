"""Tar shards (issue 24): images/s from local shards, from shards over localhost HTTP and from the folder; start-up.

Three measurements, on data generated once into ``--cache`` (git-ignored ``.bench/``):

* **images/s** of the training loader (``open_unlabelled`` + ``make_loader``/``make_shard_loader``, as
  ``byol-pytorch train`` builds it) over one folder of small JPEGs, read three ways: the image folder,
  local tar shards made from it by ``shard_writer.make_shards``, and the same shards served over
  localhost HTTP (a threaded range-capable server in this process) with their ``wids`` index; at 1 and
  4 loader workers. One untimed warm-up epoch per contender, then timed epochs alternate; medians.
* **start-up** at many tiny shards over localhost HTTP: building the ``RemoteShardDataset`` (the sample
  counts) with the ``wids`` index, without it (every shard read once; a fresh, empty count cache in
  ``BYOL_PYTORCH_CACHE``), and again without it once the count cache is written; HTTP requests counted.
* **peak memory** of a shard loader worker: its RSS high-water mark (``VmHWM``, reset at the start of
  the epoch) minus its RSS when the epoch starts, the largest over its epochs, against the bound that
  ``remote_shards`` and the README document: shuffle buffer x mean encoded image size + ``READ_AHEAD``
  + ``BLOCK``.

    python -m benchmarks.shard_loading --output benchmarks/results/shard_loading.md
    python -m benchmarks.shard_loading --smoke        # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import statistics
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from benchmarks.common import REPO
from benchmarks.common.machine import load_average, machine
from benchmarks.common.report import command_line, emit_report, markdown_table
from benchmarks.common.runner import time_alternating
from byol_pytorch.data import make_loader
from byol_pytorch.data.remote import BLOCK, READ_AHEAD
from byol_pytorch.data.remote_shards import RemoteShardDataset, index_document
from byol_pytorch.data.shard_writer import make_shards
from byol_pytorch.data.shards import make_shard_loader
from byol_pytorch.data.sources import ShardReading, open_unlabelled

FULL = {"images": 4096, "side": 64, "per_shard": 128, "batch": 64, "workers": (1, 4), "startup_shards": 10_000}
SMOKE = {"images": 64, "side": 32, "per_shard": 8, "batch": 8, "workers": (1, 2), "startup_shards": 40}
SHUFFLE_BUFFER = 1000  # the default of ShardReading and --shuffle-buffer


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per contender (median)")
    parser.add_argument("--startup-repeats", type=int, default=3, help="timed start-ups with the index / cached")
    parser.add_argument(
        "--cache", type=Path, default=REPO / ".bench" / "shard_loading", help="where the generated data is kept"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny images and counts; runs in seconds")
    parser.add_argument("--output", type=Path, default=None, help="also write the report as Markdown here")
    return parser


# ------------------------------------------------------------------ the data
def _jpeg(side: int, rng: np.random.Generator) -> bytes:
    """A smooth random colour image (a small noise grid upscaled), JPEG quality 90."""
    noise = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def ensure_data(cache: Path, sizes: dict) -> tuple[Path, Path]:
    """``(image folder, its shards)``: ``images`` JPEGs and ``make_shards`` of ``per_shard`` of them each."""
    root = cache / f"n{sizes['images']}_{sizes['side']}px_{sizes['per_shard']}per"
    folder, shards = root / "images", root / "shards"
    if not (root / ".complete").exists():
        print(f"generating {sizes['images']} JPEGs of {sizes['side']} px and their shards in {root} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(sizes["images"]):
            (folder / f"{i:06d}.jpg").write_bytes(_jpeg(sizes["side"], rng))
        # A shard size that holds exactly per_shard of these images (tar: 512-byte header + data padded to 512).
        largest = max(p.stat().st_size for p in folder.iterdir())
        member = 512 + (largest + 511) // 512 * 512
        limit = (sizes["per_shard"] * member + 1024 + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE
        made = make_shards(folder, shards, limit)
        print(f"  {len(made.shards)} shards, {min(made.counts)}-{max(made.counts)} images each", flush=True)
        (root / ".complete").touch()
    return folder, shards


def ensure_tiny_shards(cache: Path, count: int) -> Path:
    """``count`` shards of 2 samples (a 16 px JPEG each) and their ``index.json``: the start-up case."""
    root = cache / f"tiny{count}"
    if not (root / ".complete").exists():
        print(f"writing {count} tiny shards in {root} ...", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        data = _jpeg(16, np.random.default_rng(1))
        for k in range(count):
            with tarfile.open(root / f"t-{k:06d}.tar", "w") as tar:
                for j in range(2):
                    info = tarfile.TarInfo(f"{k:06d}_{j}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names = [f"t-{k:06d}.tar" for k in range(count)]
        (root / "index.json").write_text(json.dumps(index_document(names, [2] * count)))
        (root / ".complete").touch()
    return root


# ------------------------------------------------------------------ the HTTP server (as tests/data/test_remote.py)
class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` plus ``Range: bytes=a-b`` (fsspec reads by range requests); counts requests."""

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.requests += 1  # type: ignore[attr-defined]
        path, ranged = self.translate_path(self.path), self.headers.get("Range")
        if not ranged or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, _, last = ranged.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        with open(path, "rb") as file:
            file.seek(start)
            body = file.read(max(0, end - start + 1))
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


def serve(folder: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    """A threaded HTTP server of ``folder`` on localhost: ``(base URL, server)``; ``server.requests`` counts."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(folder)))
    server.requests, server.lock = 0, threading.Lock()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def _pattern(names: list[str]) -> str:
    """The brace pattern of ``prefix-000000.tar`` .. ``prefix-NNNNNN.tar``."""
    prefix, first = names[0].rsplit("-", 1)
    last = names[-1].rsplit("-", 1)[1]
    return f"{prefix}-{{{first.removesuffix('.tar')}..{last.removesuffix('.tar')}}}.tar"


# ------------------------------------------------------------------ worker memory
def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (from /proc/self/status)."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                found[name] = int(value.split()[0]) * 1024
    return found


class PeakMemory(IterableDataset):
    """A shard dataset whose worker writes its RSS at the epoch's start and its high-water mark at the end."""

    def __init__(self, inner: IterableDataset, folder: Path) -> None:
        self.inner, self.folder = inner, folder

    def __getattr__(self, name: str) -> Any:  # workers, seed, rank: what make_shard_loader reads
        return getattr(self.__dict__["inner"], name)

    def __iter__(self) -> Iterator[Any]:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass  # a forked worker's VmHWM starts at its own RSS anyway
        start = _status()["VmRSS"]
        try:
            yield from self.inner
        finally:
            record = {"start": start, "peak": _status()["VmHWM"]}
            (self.folder / f"{os.getpid()}-{time.monotonic_ns()}.json").write_text(json.dumps(record))


def _peak_growth(folder: Path) -> tuple[int, int]:
    """(largest VmHWM - start RSS, largest VmHWM) over the records in ``folder``, bytes."""
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    return max(r["peak"] - r["start"] for r in records), max(r["peak"] for r in records)


# ------------------------------------------------------------------ images/s
def _loader(kind: str, spec: str, sizes: dict, workers: int, index: str | None, memory: Path) -> DataLoader:
    """The loader ``byol-pytorch train`` builds for ``spec``: folder or shards (wrapped in ``PeakMemory``)."""
    if kind == "folder":
        data = open_unlabelled(spec, sizes["side"])
        return make_loader(data, sizes["batch"], workers, pin_memory=False)
    reading = ShardReading(batch_size=sizes["batch"], workers=workers, shuffle_buffer=SHUFFLE_BUFFER, index=index)
    data = open_unlabelled(spec, sizes["side"], shards=reading)
    return make_shard_loader(PeakMemory(data, memory))  # type: ignore[arg-type]


def _epoch(loader: DataLoader, seen: list[int]) -> Callable[[], None]:
    def run() -> None:
        count = 0
        for images, _ in loader:
            count += len(images)
        seen.append(count)

    return run


def throughput(folder: Path, shards: Path, sizes: dict, repeats: int, scratch: Path) -> tuple[list, tuple[int, int]]:
    """Rows ``source, workers, images/epoch, img/s median (min-max), vs folder, worker peak`` for each contender."""
    base, server = serve(shards)
    names = sorted(p.name for p in shards.glob("*.tar"))
    sources = {
        "image folder": ("folder", str(folder), None),
        "local shards": ("shards", str(shards / _pattern(names)), None),
        "HTTP shards (localhost, wids index)": ("shards", f"{base}/{_pattern(names)}", str(shards / "index.json")),
    }
    contenders, loaders, seen = [], [], []
    for workers in sizes["workers"]:
        for name, (kind, spec, index) in sources.items():
            memory = scratch / f"memory-{len(contenders)}"
            memory.mkdir()
            contenders.append((name, workers, memory, kind))
            seen.append([])
            loaders.append(_epoch(_loader(kind, spec, sizes, workers, index, memory), seen[-1]))
    requests_before = server.requests
    timed = time_alternating(loaders, 1, repeats, reverse_odd_rounds=True)
    requests = server.requests - requests_before
    server.shutdown()
    server.server_close()
    rows, folder_rate = [], {}
    for (name, workers, memory, kind), timing, counts in zip(contenders, timed, seen):
        images = counts[-1]
        rates = [images / t for t in timing.wall]
        rate = statistics.median(rates)
        folder_rate.setdefault(workers, rate)
        peak = "-"
        if kind == "shards":
            growth, high = _peak_growth(memory)
            peak = f"+{growth / 2**20:.1f} MiB (VmHWM {high / 2**20:.0f} MiB)"
        spread = f"{rate:.0f} ({min(rates):.0f}-{max(rates):.0f})"
        rows.append([name, workers, images, spread, f"{rate / folder_rate[workers]:.2f}x", peak])
    reads = sum(repeats + 1 for name, *_ in contenders if name.startswith("HTTP")) * len(names)
    print(f"HTTP requests during the timed and warm-up epochs: {requests} for {reads} shard reads", flush=True)
    return rows, (requests, reads)


# ------------------------------------------------------------------ start-up
def _start(url: str, index: str | None, batch: int) -> float:
    started = time.perf_counter()
    RemoteShardDataset(url, 16, batch, index=index)
    return time.perf_counter() - started


def startup(tiny: Path, count: int, repeats: int, scratch: Path) -> list[list[object]]:
    """Rows ``case, shards, seconds median (min-max), HTTP requests per start`` of the dataset's construction."""
    base, server = serve(tiny)
    url = f"{base}/t-{{{0:06d}..{count - 1:06d}}}.tar"
    index = str(tiny / "index.json")
    previous = os.environ.get("BYOL_PYTORCH_CACHE")
    os.environ["BYOL_PYTORCH_CACHE"] = str(Path(tempfile.mkdtemp(dir=scratch, prefix="counts-")))
    try:
        cases: dict[str, tuple[list[float], list[int]]] = {}
        for name, runs, shard_index in (
            ("wids index (--shard-index)", repeats, index),
            ("no index, empty count cache (every shard read)", 1, None),
            ("no index, counts cached by the run above", repeats, None),
        ):
            times, requests = [], []
            for _ in range(runs):
                before = server.requests
                times.append(_start(url, shard_index, 2))
                requests.append(server.requests - before)
            cases[name] = (times, requests)
            print(f"start-up, {name}: {statistics.median(times):.2f} s, {requests[0]} HTTP requests", flush=True)
    finally:
        if previous is None:
            os.environ.pop("BYOL_PYTORCH_CACHE", None)
        else:
            os.environ["BYOL_PYTORCH_CACHE"] = previous
        server.shutdown()
        server.server_close()
    rows, indexed = [], statistics.median(next(iter(cases.values()))[0])
    for name, (times, requests) in cases.items():
        spread = f" ({min(times):.2f}-{max(times):.2f})" if len(times) > 1 else ""
        ratio = f"{statistics.median(times) / indexed:.0f}x" if indexed > 0 else "-"
        rows.append([name, f"{count:,}", f"{statistics.median(times):.2f}{spread}", ratio, len(times), requests[0]])
    return rows


# ------------------------------------------------------------------ the report
def main(args: argparse.Namespace) -> str:
    sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        args.repeats, args.startup_repeats = 1, 1
    load_before, started = load_average(), time.perf_counter()
    folder, shards = ensure_data(args.cache, sizes)
    args.shards = shards
    tiny = ensure_tiny_shards(args.cache, sizes["startup_shards"])
    generated = time.perf_counter() - started
    mean_bytes = statistics.mean(p.stat().st_size for p in folder.iterdir())
    with tempfile.TemporaryDirectory(prefix="shard_loading-") as scratch:
        rows, requests = throughput(folder, shards, sizes, args.repeats, Path(scratch))
        print(markdown_table(THROUGHPUT_HEADER, rows), flush=True)
        start_rows = startup(tiny, sizes["startup_shards"], args.startup_repeats, Path(scratch))
    bound = SHUFFLE_BUFFER * mean_bytes + READ_AHEAD + BLOCK
    seconds = (time.perf_counter() - started, generated)
    report = _report(args, sizes, rows, start_rows, (mean_bytes, bound, requests), load_before, seconds)
    return emit_report(report, args.output)


THROUGHPUT_HEADER = ["source", "workers", "images/epoch", "img/s median (min-max)", "vs folder", "worker peak memory"]
STARTUP_HEADER = ["start-up", "shards", "seconds median (min-max)", "vs index", "runs", "HTTP requests"]


def _report(args, sizes, rows, start_rows, figures, load_before, seconds) -> str:  # noqa: ANN001
    mean_bytes, bound, (requests, reads) = figures
    most = max(sizes["workers"])
    crowded = f", so {most} workers oversubscribe it" if most > (os.cpu_count() or 1) else ""
    counts = [e["nsamples"] for e in json.loads((args.shards / "index.json").read_text())["shardlist"]]
    return "\n".join(
        [
            "# Tar shards: local, over HTTP, and the image folder (issue 24)",
            "",
            f"Command (from the repository root): `{command_line()}`",
            "",
            f"Machine: {machine(torchvision)}",
            "",
            f"{sizes['images']} JPEGs of {sizes['side']}x{sizes['side']} px (quality 90, {mean_bytes / 1000:.1f} kB "
            f"mean), packed by `shard_writer.make_shards` into {len(counts)} shards of {min(counts)}-{max(counts)} "
            f"images (size limit: {sizes['per_shard']} of the largest file); load size "
            f"{sizes['side']}, batch {sizes['batch']}, shuffle buffer {SHUFFLE_BUFFER}. The loaders are those "
            "`byol-pytorch train` builds (`open_unlabelled`, `make_loader` / `make_shard_loader`): the folder's "
            "workers persist between epochs, the shards' start anew each epoch. HTTP: a threaded "
            "`http.server` with range requests on 127.0.0.1 in the benchmark's process, the `wids` index "
            f"given ({requests} HTTP requests over all the epochs, at most {reads} shard reads). Medians of "
            f"{args.repeats} timed epochs per contender (alternating, after one untimed "
            f"warm-up epoch each); min-max in brackets. The machine has {os.cpu_count()} cores, shared "
            f"(1-minute load average {load_before:.1f} before, {load_average():.1f} after){crowded}.",
            "",
            markdown_table(THROUGHPUT_HEADER, rows),
            "",
            "\"worker peak memory\": the largest, over a contender's epochs and workers, of the worker's RSS "
            "high-water mark (`VmHWM`, reset when its epoch starts) minus its RSS at that moment; VmHWM itself "
            "(including the pages shared with the main process) in brackets. The bound documented in "
            "`byol_pytorch/data/remote_shards.py` and the README (remote shards: shuffle buffer x mean encoded "
            f"image size + `READ_AHEAD` + `BLOCK`) is here {SHUFFLE_BUFFER} x {mean_bytes / 1000:.1f} kB + "
            f"{READ_AHEAD / 2**20:.0f} MiB + {BLOCK / 2**20:.0f} MiB = **{bound / 2**20:.1f} MiB**. The buffer "
            f"is per shard, so it never holds more than a shard ({max(counts)} images) here, and the "
            "read-ahead holds at most the rest of the worker's shards; the measured growth also includes what "
            "the worker imports (fsspec, aiohttp) and its decoding.",
            "",
            f"Start-up: building a `RemoteShardDataset` of {sizes['startup_shards']:,} shards of 2 samples "
            "(16 px JPEGs, 10 kB tar files) served the same way, i.e. its sample counts: from the `wids` index "
            "(a local file), counted by reading every shard (a fresh empty `BYOL_PYTORCH_CACHE`; one run), and "
            "from the count cache that run wrote. HTTP requests: per start, as the server logged them.",
            "",
            markdown_table(STARTUP_HEADER, start_rows),
            "",
            f"The whole run took {seconds[0] / 60:.1f} minutes, {seconds[1] / 60:.1f} of them generating the data "
            "(0 when `--cache` already held it).",
        ]
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""The file list of a large image folder: start-up time and memory, 1.1.0's list vs FileIndex vs torchvision.

For N empty ``.jpg`` files (1000 per sub-folder; made once under ``--root`` and kept) it
measures, per contender:

* start-up: building the file list (warm file-system cache: one untimed scan first).
  "before" is the 1.1.0 scan kept below (``os.walk``, a ``stat`` per file, a sorted
  list of ``pathlib.Path``); "after" is ``load_or_scan`` without a valid cache (scan with
  ``os.scandir`` + writing the cache file, what ``byol-pytorch train`` does on a first
  start); torchvision is ``datasets.ImageFolder`` (one class per sub-folder).
* cached start ("after" only): ``load_or_scan`` when the cache file is valid (a ``stat``
  per folder, then reading the arrays), what a resumed run does: its two steps,
  ``check_folder`` and ``load_cached_index``, so that a cache found invalid is an error
  rather than a scan timed as a cached start.
* main bytes/image: the private memory (USS) the file list adds to the process.
* worker bytes/image: the private memory each of W forked DataLoader workers gains by
  reading every entry the way its dataset's ``__getitem__`` does before opening a file
  (ours: ``str(Path(dataset.paths[i]))``; torchvision: ``path, target = samples[i]``);
  copy-on-write of pages whose reference counts change.

Every measurement runs in its own single-threaded subprocess; contenders alternate;
times are medians over ``--reps``; memory is measured once per contender.

    python -m benchmarks.data_index --out benchmarks/results/data_index.md   # trees kept in .bench/data_index
    python -m benchmarks.data_index --smoke --root /tmp/idx    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO
from benchmarks.common.machine import load_average, machine
from benchmarks.common.report import markdown_table, write_results
from benchmarks.common.runner import run_module

MODULE = "benchmarks.data_index"
CONTENDERS = ("before", "after", "torchvision")
GOAL_BYTES, GOAL_START_S, GOAL_CACHED_S = 100, 60.0, 5.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / ".bench" / "data_index", help="where the trees are kept")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="files per tree")
    parser.add_argument("--per-folder", type=int, default=1000, help="files per sub-folder")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per contender (median)")
    parser.add_argument("--workers", type=int, default=4, help="forked DataLoader workers")
    parser.add_argument("--smoke", action="store_true", help="one tree of 1,200 files, 2 workers, 1 repetition")
    parser.add_argument("--out", type=Path, default=None, help="write the results file here")
    parser.add_argument("--child", nargs=3, metavar=("CONTENDER", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------ the trees
def make_tree(root: Path, count: int, per_folder: int) -> Path:
    """``root/cNNNNN/NNNNNNNN.jpg``, empty files; ``root/.complete`` marks a finished tree.

    The folders' times are set an hour back, out of the cache's racy window
    (``file_index.RACY_NS``), as those of any folder not written to just now.
    """
    marker = root / ".complete"
    if marker.exists():
        return root
    for start in range(0, count, per_folder):
        folder = root / f"c{start // per_folder:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(start, min(count, start + per_folder)):
            os.close(os.open(folder / f"{j:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()
    past = time.time() - 3600
    for folder in [root, *root.iterdir()]:
        os.utime(folder, (past, past))
    return root


# ------------------------------------------------------------------ the contenders (in a child process)
def old_scan_images(root: Path) -> list[Path]:
    """byol_pytorch 1.1.0's ``scan_images``, kept as the "before" contender (same rules)."""
    import stat

    from byol_pytorch.data import IMAGE_EXTENSIONS

    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    if stat.S_ISREG(os.stat(os.path.join(dirpath, name)).st_mode):
                        found.append(Path(dirpath, name))
                except OSError:
                    pass
    found.sort()
    return found


def _cache_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.index.npz"


def _has_image_suffix(path: str) -> bool:
    from byol_pytorch.data import IMAGE_EXTENSIONS

    return path.lower().endswith(IMAGE_EXTENSIONS)


def _build(contender: str, mode: str, folder: Path) -> Any:
    """The dataset-side file list of ``contender``: the object a DataLoader worker reads."""
    if contender == "before":
        return old_scan_images(folder)
    if contender == "after":
        from byol_pytorch.data import file_index

        cache = _cache_path(folder)
        if mode != "cached":
            cache.unlink(missing_ok=True)  # a first start: scan and write the cache
            return file_index.load_or_scan(folder, cache)
        # load_or_scan's path when the cache is valid; an invalid one would scan: a wrong figure.
        file_index.check_folder(folder)
        index = file_index.load_cached_index(cache, folder)
        if index is None:
            raise RuntimeError(f"the cached start scanned {folder}: the cache was not valid")
        return index
    from torchvision import datasets

    return datasets.ImageFolder(str(folder), is_valid_file=_has_image_suffix)  # never opens a file here


def _touch_every_entry(files: Any) -> int:
    """Read every entry as the dataset's ``__getitem__`` does before opening the file."""
    total = 0
    if hasattr(files, "samples"):  # torchvision
        samples = files.samples
        for i in range(len(samples)):
            path, target = samples[i]
            total += len(path) + target
    else:
        for i in range(len(files)):
            total += len(str(Path(files[i])))  # load_image(path): Path(path), then its str
    return total


class _Probe:
    """A dataset of one item per worker: item k reads every entry, returns the worker's USS before/after."""

    def __init__(self, files: Any, workers: int) -> None:
        self.files, self.workers = files, workers

    def __len__(self) -> int:
        return self.workers

    def __getitem__(self, k: int) -> tuple[int, int]:
        import psutil

        # No gc.collect() here: a full collection writes to every tracked object's header
        # (a list of Path objects: all of them) and would move that copy into the baseline.
        before = psutil.Process().memory_full_info().uss
        _touch_every_entry(self.files)
        return before, psutil.Process().memory_full_info().uss


def child(contender: str, mode: str, folder: Path, workers: int) -> dict[str, Any]:
    """One measurement: ``mode`` is "start", "cached" (time, main USS) or "memory" (also the workers)."""
    import psutil
    import torch
    import torchvision.datasets  # noqa: F401  (imported before the measurements, as the next two)
    from torch.utils.data import DataLoader

    import byol_pytorch.data.file_index
    import byol_pytorch.data.folder  # noqa: F401

    torch.set_num_threads(1)
    gc.collect()
    process = psutil.Process()
    uss0 = process.memory_full_info().uss
    started = time.perf_counter()
    files = _build(contender, mode, folder)
    seconds = time.perf_counter() - started
    gc.collect()
    count = len(files)
    result: dict[str, Any] = {"seconds": seconds, "count": count}
    result["main_bytes"] = (process.memory_full_info().uss - uss0) / count
    if mode == "memory":
        loader = DataLoader(
            _Probe(files, workers),
            batch_size=None,
            num_workers=workers,
            multiprocessing_context="fork",
        )
        result["worker_bytes"] = [(after - before) / count for before, after in loader]
    return result


# ------------------------------------------------------------------ the parent
def _run_child(contender: str, mode: str, folder: Path, workers: int) -> dict[str, Any]:
    """One measurement in a fresh 1-thread ``python -m benchmarks.data_index --child ...``."""
    args = ["--child", contender, mode, str(folder.resolve()), "--workers", str(workers)]
    proc = run_module(MODULE, *args, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} {mode} on {folder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_range(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def measure(folder: Path, reps: int, workers: int) -> dict[str, dict[str, Any]]:
    """Every contender's figures on one tree."""
    if reps > 1:
        _run_child("before", "start", folder, workers)  # warm-up: lists and stats every entry
    times: dict[str, list[float]] = {c: [] for c in (*CONTENDERS, "cached")}
    main: dict[str, list[float]] = {c: [] for c in (*CONTENDERS, "cached")}
    for _ in range(reps):
        for contender in CONTENDERS:
            figures = _run_child(contender, "start", folder, workers)
            times[contender].append(figures["seconds"])
            main[contender].append(figures["main_bytes"])
        figures = _run_child("after", "cached", folder, workers)  # the cache "after" just wrote
        times["cached"].append(figures["seconds"])
        main["cached"].append(figures["main_bytes"])
    results: dict[str, dict[str, Any]] = {}
    for contender in CONTENDERS:
        memory = _run_child(contender, "memory", folder, workers)
        results[contender] = {
            "count": memory["count"],
            "start": times[contender],
            "main": statistics.median(main[contender]),
            "workers": memory["worker_bytes"],
        }
    results["after"]["cached"] = times["cached"]
    results["after"]["cached_main"] = statistics.median(main["cached"])
    return results


def _rows(size: int, results: dict[str, dict[str, Any]]) -> list[list[object]]:
    labels = {
        "before": "before: 1.1.0 list of Path (os.walk + stat)",
        "after": "after: FileIndex (scandir, cache written)",
        "torchvision": "torchvision ImageFolder (samples list)",
    }
    rows = []
    for contender in CONTENDERS:
        r = results[contender]
        cached = _median_range(r["cached"]) if "cached" in r else "-"
        workers = ", ".join(f"{w:.0f}" for w in r["workers"])
        rows.append([f"{size:,}", labels[contender], _median_range(r["start"]), cached, f"{r['main']:.0f}", workers])
    return rows


def _goals(size: int, after: dict[str, Any]) -> list[str]:
    start, cached = statistics.median(after["start"]), statistics.median(after["cached"])
    worst = max(after["workers"])

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"- index <= {GOAL_BYTES} bytes/image in the main process at {size:,} files: "
        f"{met(after['main'] <= GOAL_BYTES)} ({after['main']:.0f}; {after['cached_main']:.0f} from the cache)",
        f"- index <= {GOAL_BYTES} bytes/image in each worker: {met(worst <= GOAL_BYTES)} (at most {worst:.0f})",
        f"- start-up <= {GOAL_START_S:.0f} s: {met(start <= GOAL_START_S)} ({start:.2f} s, median)",
        f"- cached start <= {GOAL_CACHED_S:.0f} s: {met(cached <= GOAL_CACHED_S)} ({cached:.2f} s, median)",
    ]


def main(args: argparse.Namespace) -> str:
    """Make or reuse the trees, measure, print (and write) the table; returns the Markdown."""
    import psutil
    import torchvision

    if args.smoke:
        args.sizes, args.per_folder, args.reps, args.workers = [1200], 100, 1, 2
    load_before = load_average()
    rows, goals = [], []
    for size in args.sizes:
        folder = make_tree(args.root / f"n{size}", size, args.per_folder)
        results = measure(folder, args.reps, args.workers)
        rows += _rows(size, results)
        if size == max(args.sizes):
            goals = _goals(size, results["after"])
    load_after = load_average()
    header = ["files", "contender", "start-up s", "cached start s", "main bytes/image", "each worker bytes/image"]
    table = markdown_table(header, rows)
    notes = (
        f"Times: median (min-max) of {args.reps} runs, warm file-system cache, one thread per process. "
        "Bytes/image: private memory (USS, psutil) the file list adds to the main process, and that each of "
        f"{args.workers} forked DataLoader workers gains by reading every entry (one figure per worker). "
        f"1-minute load average {load_before:.2f} before and {load_after:.2f} after "
        f"({os.cpu_count()} cores, shared)."
    )
    text = f"{table}\n\n{notes}\n\n### Goals (issue 14, at the largest size)\n\n" + "\n".join(goals)
    print(text)
    if args.out is not None:
        write_results(args.out, "Image-folder index: start-up and memory", machine(torchvision, psutil), text)
    return text


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.child:
        contender, mode, folder = parsed.child
        print(json.dumps(child(contender, mode, Path(folder), parsed.workers)))
    else:
        main(parsed)

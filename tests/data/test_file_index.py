"""Tests for byol_pytorch/file_index.py: the compact index, its order, its cache, its broadcast."""

from __future__ import annotations

import os
import pickle
import socket
import stat
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from byol_pytorch.data import file_index
from byol_pytorch.data.file_index import INDEX_CACHE_NAME, FileIndex, index_images, load_cached_index, load_or_scan
from byol_pytorch.data.folder import IMAGE_EXTENSIONS, ImageFolder, LabelledImageFolder

WORLD = 2


def old_scan(root: Path) -> tuple[list[Path], int]:
    """The 1.1.0 scan, as a reference: os.walk, a stat per file, a sorted list of Path."""
    found: list[Path] = []
    passed_over = 0
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
                    regular = stat.S_ISREG(os.stat(os.path.join(dirpath, name)).st_mode)
                except OSError:
                    regular = False
                if regular:
                    found.append(Path(dirpath, name))
                else:
                    passed_over += 1
    found.sort()
    return found, passed_over


TRICKY = [
    "a/b.png",
    "a-b.png",
    "a.b/c.png",
    "a b.png",
    "a/b/c/d/e.jpg",
    "a/b0.png",
    "ab.png",
    "A.PNG",
    "Z.jpg",
    "é.png",
    "e\u0301.png",  # the same letter, decomposed: another name
    "ä/x.png",
    "日本/写真.jpeg",
    "z/ü.JPG",
    "new\nline.png",
    "a/.hidden.png",
    ".cache/inside.png",
    "notes.txt",
    "x.jpg.txt",
]


def _touch(root: Path, relative: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _tricky_folder(root: Path) -> Path:
    for name in TRICKY:
        _touch(root, name)
    os.mkfifo(root / "a" / "fifo.png")
    os.symlink(root / "missing.png", root / "dangling.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")  # a link to itself: ELOOP, passed over
    os.symlink(root, root / "a" / "b" / "cycle")  # a cycle
    os.symlink(root / "a" / "b0.png", root / "file_link.png")  # a link to a regular file: kept
    (root / "folder.jpg").mkdir()  # a folder with an image suffix is walked, not counted
    _touch(root, "folder.jpg/in.gif")
    os.close(os.open(os.fsencode(root) + b"/latin1_\xe9.png", os.O_CREAT | os.O_WRONLY))  # not UTF-8
    return root


def _age(root: Path, seconds: float = 3600) -> None:
    """Move every folder's modification time into the past (out of the racy window)."""
    past = time.time() - seconds
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (past, past))


@pytest.fixture
def count_walks(monkeypatch):
    calls: list[str] = []
    original = file_index._walk

    def counting(root: str):
        calls.append(root)
        return original(root)

    monkeypatch.setattr(file_index, "_walk", counting)
    return calls


def test_order_rules_and_count_equal_the_old_list_of_paths(tmp_path):
    root = _tricky_folder(tmp_path / "tricky")
    expected, passed_over = old_scan(root)
    # A folder reached twice is walked once: the old scan kept whichever os.walk listed
    # first (the file system's order), ours the first in sorted order, "a".
    os.symlink(root / "a", root / "link_to_a")
    index = index_images(root)
    assert list(index) == expected
    assert [index[i] for i in range(-len(index), 0)] == expected  # negative indices too
    assert index.passed_over == passed_over == 3  # FIFO, dangling link, link loop
    names = [index.relative(i) for i in range(len(index))]
    # Component order, not string order: "a/b.png" < "a-b.png" although "/" > "-".
    assert names.index("a/b.png") < names.index("a-b.png") < names.index("a.b/c.png")
    assert sorted(names) != names
    assert "file_link.png" in names and "folder.jpg/in.gif" in names
    assert not any(".hidden" in n or ".cache" in n or n.endswith(".txt") or "cycle" in n for n in names)
    assert sum(n.startswith("a/") for n in names) == 3 and not any(n.startswith("link_to_a") for n in names)
    assert "latin1_\udce9.png" in names and (root / "latin1_\udce9.png").exists()
    with pytest.warns(DeprecationWarning, match="index_images"):  # 1.1.0's list form, now the same FileIndex
        from byol_pytorch.data import scan_images
    found = scan_images(root)
    assert list(found) == expected and found.passed_over == passed_over


def test_index_holds_no_per_file_objects_and_pickles_compactly(tmp_path):
    root = tmp_path / "many"
    relative = [f"d{i // 100:02d}/{i:05d}.png" for i in range(500)]
    for name in relative:
        _touch(root, name)
    index = index_images(root)
    assert [index.relative(i) for i in range(len(index))] == relative
    assert index.blob.dtype == np.uint8 and index.offsets.dtype == np.int64 and len(index.offsets) == 501
    assert index.nbytes == sum(len(n) for n in relative) + 8 * 501
    assert set(vars(index)) == {"root", "blob", "offsets", "passed_over"}
    dataset = ImageFolder(root, 8)
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert isinstance(copy.paths, FileIndex) and copy.paths.same_files(dataset.paths)
    assert copy.paths.blob.dtype == np.uint8 and copy.paths[7] == dataset.paths[7] == root / relative[7]
    assert len(pickle.dumps(dataset.paths)) < len(index.blob) + len(index.offsets) * 8 + 1000  # no per-file cost


def test_concat_and_labelled_folder_match_per_class_lists(tmp_path):
    parts = [
        ("cat", FileIndex.from_relative("x", ["1.png", "sub/2.png"])),
        ("dog", FileIndex.from_relative("y", ["3.jpg"], 2)),
    ]
    joined = FileIndex.concat("root", parts)
    assert [joined.relative(i) for i in range(3)] == ["cat/1.png", "cat/sub/2.png", "dog/3.jpg"]
    assert joined.passed_over == 2 and joined[2] == Path("root/dog/3.jpg")
    for name in ("cat/b.png", "cat/a/z.png", "dog/é.jpg", "dog-x/a.png"):
        _touch(tmp_path, name)
    dataset = LabelledImageFolder(tmp_path, 8)
    expected = [p for c in ("cat", "dog", "dog-x") for p in old_scan(tmp_path / c)[0]]
    assert list(dataset.paths) == expected and dataset.targets == [0, 0, 1, 2]
    assert dataset._labels.dtype == np.int32


def test_index_errors(tmp_path):
    index = FileIndex.from_relative("r", ["a.png"])
    with pytest.raises(IndexError, match="index 1 out of range for 1 files"):
        index[1]
    with pytest.raises(TypeError, match="index must be a FileIndex .* got list"):
        ImageFolder(tmp_path, 8, index=[tmp_path / "a.png"])
    with pytest.raises(ValueError, match="does not exist"):
        load_or_scan(tmp_path / "missing", tmp_path / "cache.npz")
    with pytest.raises(ValueError, match="no images found under"):
        load_or_scan(tmp_path, tmp_path / "cache.npz")
    assert not (tmp_path / "cache.npz").exists()


def test_digest_changes_with_names_and_order_only():
    a = FileIndex.from_relative("r", ["a.png", "b.png"])
    assert a.digest() == FileIndex.from_relative("elsewhere", ["a.png", "b.png"]).digest()
    assert a.digest() != FileIndex.from_relative("r", ["a.png", "c.png"]).digest()
    assert a.digest() != FileIndex.from_relative("r", ["b.png", "a.png"]).digest()
    assert a.digest() != FileIndex.from_relative("r", ["a.p", "ng.png"]).digest()  # the offsets count too


@pytest.fixture
def aged(tmp_path) -> Path:
    root = tmp_path / "images"
    for name in ("a/1.png", "a/deep/2.png", "b/3.jpg", "4.png"):
        _touch(root, name)
    _age(root)
    return root


def test_cache_is_reused_while_unchanged_without_scanning(aged, tmp_path, count_walks):
    cache = tmp_path / "run" / INDEX_CACHE_NAME
    first = load_or_scan(aged, cache)
    assert count_walks == [str(aged)] and cache.is_file()
    second = load_or_scan(aged, cache)
    assert count_walks == [str(aged)]  # no second walk
    assert second.same_files(first) and second.root == aged and second.passed_over == first.passed_over
    assert [f.name for f in (tmp_path / "run").iterdir()] == [INDEX_CACHE_NAME]  # no temp file left
    # The key is the resolved folder: another spelling of it uses the cache, with its own root.
    again = load_or_scan(str(aged / "a" / ".."), cache)
    assert count_walks == [str(aged)] and again[0] == aged / "a" / ".." / first.relative(0)


@pytest.mark.parametrize(
    "change",
    ["add in a deep folder", "remove", "rename", "new folder", "replace by a fifo"],
)
def test_cache_is_rebuilt_after_a_change(aged, tmp_path, count_walks, change):
    cache = tmp_path / INDEX_CACHE_NAME
    load_or_scan(aged, cache)
    if change == "add in a deep folder":
        (aged / "a" / "deep" / "5.png").touch()
    elif change == "remove":
        (aged / "a" / "deep" / "2.png").unlink()
    elif change == "rename":
        (aged / "b" / "3.jpg").rename(aged / "b" / "0.jpg")
    elif change == "new folder":
        _touch(aged, "a/deep/new/6.png")
    else:
        (aged / "b" / "3.jpg").unlink()
        os.mkfifo(aged / "b" / "3.jpg")
    rebuilt = load_or_scan(aged, cache)
    assert len(count_walks) == 2
    expected, passed_over = old_scan(aged)
    assert list(rebuilt) == expected and rebuilt.passed_over == passed_over
    _age(aged)  # the rewritten cache is then used
    load_or_scan(aged, cache)
    assert len(count_walks) == 3
    assert list(load_or_scan(aged, cache)) == expected and len(count_walks) == 3


def test_content_edits_keep_the_cache(aged, tmp_path, count_walks):
    cache = tmp_path / INDEX_CACHE_NAME
    load_or_scan(aged, cache)
    (aged / "a" / "1.png").write_bytes(b"new content")  # names unchanged: the index is still right
    load_or_scan(aged, cache)
    assert len(count_walks) == 1


def test_a_folder_modified_just_before_the_scan_is_not_trusted(tmp_path, count_walks):
    root = tmp_path / "fresh"
    _touch(root, "a/1.png")
    cache = tmp_path / INDEX_CACHE_NAME
    load_or_scan(root, cache)
    load_or_scan(root, cache)  # "a" changed within RACY_NS of the scan: scanned again
    assert len(count_walks) == 2


def _npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


class _Trap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _corrupt(kind: str, cache: Path, aged: Path, tmp_path: Path) -> None:
    if kind == "garbage":
        cache.write_bytes(b"\x00not an npz" * 10)
    elif kind == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif kind == "empty":
        cache.write_bytes(b"")
    elif kind == "a folder":
        cache.unlink()
        cache.mkdir()
    elif kind == "another folder's":
        other = tmp_path / "other"
        _touch(other, "x/only.png")
        _age(other)
        load_or_scan(other, cache)
    elif kind == "tampered names":
        with np.load(cache) as z:
            arrays = dict(z)
        arrays["blob"] = arrays["blob"].copy()
        arrays["blob"][0] = ord("q")
        _npz(cache, **arrays)
    elif kind == "offsets past the blob":
        with np.load(cache) as z:
            arrays = dict(z)
        arrays["offsets"] = arrays["offsets"] * 2
        _npz(cache, **arrays)
    elif kind == "pickled objects":  # loading them would run code: never unpickled
        with np.load(cache) as z:
            arrays = dict(z)
        arrays["blob"] = np.array([_Trap(tmp_path / "trap_sprung")], dtype=object)
        _npz(cache, **arrays)
    elif kind in ("other format version", "version 1 (run folders listed)"):  # review: 1 may list a run's curves
        with np.load(cache) as z:
            arrays = dict(z)
        arrays["version"] = np.array([99 if kind == "other format version" else 1], dtype=np.int64)
        _npz(cache, **arrays)


CORRUPTIONS = [
    "garbage",
    "truncated",
    "empty",
    "a folder",
    "another folder's",
    "tampered names",
    "offsets past the blob",
    "pickled objects",
    "other format version",
    "version 1 (run folders listed)",
]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_or_foreign_cache_is_never_trusted(aged, tmp_path, count_walks, kind):
    cache = tmp_path / INDEX_CACHE_NAME
    load_or_scan(aged, cache)
    _corrupt(kind, cache, aged, tmp_path)
    assert load_cached_index(cache, aged) is None
    walks = len(count_walks)
    if kind == "a folder":
        with pytest.warns(UserWarning, match="could not save the file index to .*; the next start scans again"):
            index = load_or_scan(aged, cache)
    else:
        index = load_or_scan(aged, cache)
    assert len(count_walks) == walks + 1
    assert list(index) == old_scan(aged)[0]
    assert not (tmp_path / "trap_sprung").exists()
    if kind != "a folder":  # rewritten: the next start trusts it again
        assert load_cached_index(cache, aged) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broadcast_worker(rank: int, port: int, folder: str, out: str) -> None:
    from byol_pytorch.training.distributed import broadcast_from_main, setup_distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    walks: list[str] = []
    original = file_index._walk
    file_index._walk = lambda root: walks.append(root) or original(root)  # type: ignore[func-returns-value]
    ctx = setup_distributed("cpu")
    try:
        index = broadcast_from_main(ctx, lambda: load_or_scan(folder, Path(out) / INDEX_CACHE_NAME))
        try:
            broadcast_from_main(ctx, lambda: load_or_scan(Path(folder) / "missing", None))
            error = "none"
        except ValueError as raised:
            error = f"{type(raised).__name__}: {raised}"
        np.savez(
            f"{out}/rank{rank}.npz",
            blob=index.blob,
            offsets=index.offsets,
            passed_over=index.passed_over,
            walks=len(walks),
            root=str(index.root),
            error=error,
        )
    finally:
        ctx.close()


def test_rank0_scans_and_the_other_rank_receives_the_same_index(tmp_path):
    folder = _tricky_folder(tmp_path / "tricky")
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_broadcast_worker, args=(_free_port(), str(folder), str(out)), nprocs=WORLD, join=True)
    ranks = [np.load(out / f"rank{r}.npz") for r in range(WORLD)]
    expected = index_images(folder)
    for got in ranks:
        assert np.array_equal(got["blob"], expected.blob) and np.array_equal(got["offsets"], expected.offsets)
        assert int(got["passed_over"]) == expected.passed_over == 3 and str(got["root"]) == str(folder)
        assert str(got["error"]).startswith("ValueError: image folder ") and "missing' does not exist" in str(
            got["error"]
        )
    assert [int(got["walks"]) for got in ranks] == [1, 0]  # rank 1 never scanned
    assert (out / INDEX_CACHE_NAME).is_file()  # written by rank 0


def test_a_folder_that_cannot_be_listed_is_named_and_its_scan_not_cached(aged, tmp_path, monkeypatch):
    """Before: a sub-folder without read permission was dropped without a word, and the cache kept it out after
    the permissions were fixed (a folder's permissions change no modification time the cache checks); the cache
    now records it and looks again.
    Root ignores permissions, so the listing's PermissionError is raised by a stand-in for os.scandir."""
    listing, whole = os.scandir, index_images(aged)
    locked = {str(aged / "b")}

    def scandir(path):
        if str(path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(file_index.os, "scandir", scandir)
    cache = tmp_path / INDEX_CACHE_NAME
    with pytest.warns(UserWarning, match=r"1 folder\(s\) under .* could not be listed .*'b' \(Permission denied\)"):
        part = load_or_scan(aged, cache)
    assert len(part) < len(whole) and all(not part.relative(i).startswith("b/") for i in range(len(part)))
    with pytest.warns(UserWarning, match=r"'b' \(Permission denied\)"):  # review: cached, the warning repeats
        assert load_or_scan(aged, cache).same_files(part)
    locked.clear()  # the permissions fixed: the next start sees every image
    assert load_or_scan(aged, cache).same_files(whole)
    (aged / "lost+found").mkdir()  # a file system's own folder (root's alone) is not walked
    locked.add(str(aged / "lost+found"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for it either
        assert index_images(aged).same_files(whole)
    locked.add(str(aged))
    with pytest.raises(ValueError, match=r"cannot be listed \(Permission denied\); check its permissions"):
        index_images(aged)


def test_run_folders_of_train_and_demo_are_left_out_with_a_warning(tmp_path):
    """Probe and review: a run folder under the data (`--out` inside `--data`; a demo's runs/demo, which has no lock
    or checkpoint) gave its curves.png and views.png to training as images."""
    from PIL import Image

    root = tmp_path / "photos"
    for folder, files in {
        "cats": ["a.png", "metrics.jsonl"],  # a metrics file alone is no run
        "runs/byol": ["curves.png", "views.png", "metrics.jsonl", ".lock"],
        "runs/demo": ["curves.png", "views.png", "metrics.jsonl"],
        "runs/old": ["curves.png", "metrics.jsonl", "last.pt"],
    }.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            if name.endswith(".png"):
                Image.new("RGB", (4, 4)).save(root / folder / name)
            else:
                (root / folder / name).write_text("{}\n")
    with pytest.warns(UserWarning, match=r"3 byol-pytorch run folder\(s\) under .* are left out of the images: "):
        index = index_images(root)
    assert [index.relative(i) for i in range(len(index))] == ["cats/a.png"]


def test_tar_files_beside_images_are_named_as_not_read(tmp_path):
    """A probe: a picture put beside a folder of shards made every command read that one image, and the shards not
    at all, without a word; the folder's own rule (shards only when it holds nothing else) stays. Archives in
    sub-folders and compressed ones are no shards to pass (the review): not named, nor per class folder."""
    from byol_pytorch.data.file_index import TarsBesideImagesWarning
    from byol_pytorch.data.folder import LabelledImageFolder

    for name in ("train-000000.tar", "train-000001.tar", "backup.tar.gz", "cat/old.tar", "cat/0.png", "cover.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with pytest.warns(TarsBesideImagesWarning) as caught:
        index = index_images(tmp_path)
    assert [index.relative(i) for i in range(len(index))] == ["cat/0.png", "cover.png"]
    assert [str(w.message) for w in caught] == [
        f"{str(tmp_path)!r} holds 2 .tar file(s) ('train-000000.tar', 'train-000001.tar') beside 2 image(s): it is "
        "read as a folder of images and the .tar files are not read; to read them as shards, pass them alone (a "
        "folder holding only .tar files, or a brace pattern such as train-{000000..000099}.tar)"
    ]
    import warnings

    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / name).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # images, an archive in a sub-folder and a compressed one: no warning
        assert len(index_images(tmp_path)) == 2
    (tmp_path / "cat" / "more.tar").write_bytes(b"x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the loose cover.png is named, as before
        warnings.simplefilter("error", TarsBesideImagesWarning)  # checked first: a class folder's .tar is not named
        assert LabelledImageFolder(tmp_path, 8).classes == ["cat"]
    with pytest.warns(TarsBesideImagesWarning, match=r"holds 2 \.tar file\(s\) \('more.tar', 'old.tar'\) beside 1"):
        index_images(tmp_path / "cat")  # passed itself: named

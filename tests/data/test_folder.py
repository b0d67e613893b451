"""Tests for byol_pytorch/data/folder.py (and the loader of data/loader.py) on a messy image folder built here."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from byol_pytorch.data.file_index import index_images
from byol_pytorch.data.folder import (
    IMAGE_EXTENSIONS,
    BrokenImageError,
    ImageFolder,
    LabelledImageFolder,
    load_image,
    load_size_for,
    match_channels,
)
from byol_pytorch.data.loader import collate_images, make_loader

S = 32  # load size used throughout


def _smooth_rgb(width: int, height: int, seed: int) -> Image.Image:
    """Random smooth colours: a tiny noise image blown up."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def _jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# Relative paths in sorted order, and which are broken. The four broken files in
# "b_broken" are consecutive, so items 4..7 pass over 4, 3, 2, 1 files to the same
# substitute, each counted once, at its own item; the last file is broken too, so it wraps
# around to item 0.
GOOD_BEFORE = ["a/deep/er/cmyk.jpg", "a/deep/red.jpg", "a/gray.PNG", "a/rgba.png"]
BROKEN = ["b_broken/corrupt.png", "b_broken/empty.jpg", "b_broken/notes.jpg", "b_broken/truncated.jpg"]
GOOD_AFTER = ["c/big.jpg", "c/i16.png", "c/palette.gif", "c/rotated.JPEG", "c/x.webp", "d.bmp"]
LAST_BROKEN = "zz_empty.tif"
ALL = GOOD_BEFORE + BROKEN + GOOD_AFTER + [LAST_BROKEN]
EXPECTED_SKIPS = [0] * 4 + [1, 1, 1, 1] + [0] * 6 + [1]  # a pass counts each broken file once


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    _write(root / "a/deep/red.jpg", _jpeg_bytes(Image.new("RGB", (64, 48), (250, 10, 10))))
    _write(root / "a/deep/er/cmyk.jpg", _jpeg_bytes(Image.new("CMYK", (40, 40), (0, 255, 255, 0))))
    gray = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1)))  # mode L
    gray.save(_write(root / "a/gray.PNG", b""))
    # Left half opaque blue, right half fully transparent (its colour channels black).
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (0, 0, 255, 255)
    Image.fromarray(rgba).save(_write(root / "a/rgba.png", b""))

    good_png = io.BytesIO()
    _smooth_rgb(50, 50, 0).save(good_png, "PNG")
    _write(root / "b_broken/corrupt.png", good_png.getvalue()[:40] + b"\x00garbage" * 50)
    _write(root / "b_broken/empty.jpg", b"")
    _write(root / "b_broken/notes.jpg", b"this is a text file with a .jpg name\n" * 10)
    whole = _jpeg_bytes(_smooth_rgb(300, 200, 1))
    _write(root / "b_broken/truncated.jpg", whole[: len(whole) // 2])

    _write(root / "c/big.jpg", _jpeg_bytes(_smooth_rgb(1600, 1200, 2)))
    # 16-bit grayscale ramp covering 0..65535.
    ramp = np.linspace(0, 65535, 40 * 40).round().astype(np.uint16).reshape(40, 40)
    Image.fromarray(ramp).save(_write(root / "c/i16.png", b""))
    _smooth_rgb(40, 30, 3).convert("P", palette=Image.Palette.ADAPTIVE).save(_write(root / "c/palette.gif", b""))
    # Stored 40x20, left half red, right half blue; EXIF orientation 6 means "rotate 90
    # degrees clockwise to display", which puts red on top and blue below.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    _write(root / "c/rotated.JPEG", _jpeg_bytes(Image.fromarray(stored), exif=exif.tobytes()))
    _smooth_rgb(36, 36, 4).save(_write(root / "c/x.webp", b""), "WEBP")
    _smooth_rgb(30, 30, 5).save(_write(root / "d.bmp", b""))
    _write(root / LAST_BROKEN, b"")

    # Not images, or hidden: index_images must not return these.
    _write(root / "readme.txt", b"hello")
    _write(root / "c/labels.csv", b"a,b")
    _write(root / ".hidden.jpg", _jpeg_bytes(Image.new("RGB", (8, 8))))
    _write(root / ".cache/inside.png", good_png.getvalue())
    return root


def test_scan_finds_images_sorted_skipping_hidden_and_other_suffixes(messy):
    found = index_images(messy)
    assert [p.relative_to(messy).as_posix() for p in found] == ALL
    assert index_images(str(messy)).same_files(found)


def test_extensions_are_lowercase_with_dot():
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".webp", ".tiff", ".pgm"} <= set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_item_has_shape_dtype_and_exact_skip_count(messy, channels):
    dataset = ImageFolder(messy, S, channels=channels)
    assert len(dataset) == len(ALL)
    for _ in range(2):  # the second pass uses the cache of known broken files
        items = [dataset[i] for i in range(len(dataset))]
        assert [skipped for _, skipped in items] == EXPECTED_SKIPS
        for image, _ in items:
            assert image.shape == (channels, S, S) and image.dtype == torch.uint8
        assert dataset._broken == {4, 5, 6, 7, len(ALL) - 1}
    # A broken file's substitute is the next readable file, wrapping around.
    assert torch.equal(items[4][0], items[8][0])
    assert torch.equal(items[-1][0], items[0][0])


@pytest.mark.parametrize("name", BROKEN + [LAST_BROKEN])
def test_broken_files_raise_broken_image_error(messy, name):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(BrokenImageError) as info:
        load_image(messy / name, S)
    assert info.value.path == messy / name and name.split("/")[-1] in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_sixteen_bit_is_scaled_not_clipped(messy):
    image = load_image(messy / "c/i16.png", 40, channels=1)  # same size: only rounding
    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40)
    expected = torch.from_numpy(np.round(ramp / 257.0)).to(torch.uint8)  # 65535 / 255 = 257
    assert image.shape == (1, 40, 40)
    assert (image[0].int() - expected.int()).abs().max() <= 1
    assert image.max() == 255 and image.float().mean() > 120  # clipping would give ~253


_RAMP = np.arange(40 * 40).reshape(40, 40) % 256  # every 8-bit value


@pytest.mark.parametrize(
    "wide",
    {
        "I;16 PNG, 0..65535": lambda: Image.fromarray((_RAMP * 257).astype(np.uint16)),
        "32-bit integer TIFF holding 0..255": lambda: Image.fromarray(_RAMP.astype(np.int32)),
        "32-bit integer TIFF holding 0..65535": lambda: Image.fromarray((_RAMP * 257).astype(np.int32)),
        "float TIFF holding 0..1": lambda: Image.fromarray((_RAMP / 255).astype(np.float32)),
        "float TIFF holding 0..255": lambda: Image.fromarray(_RAMP.astype(np.float32)),
    }.items(),
    ids=lambda item: item[0],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_wide_grayscale_reads_as_its_eight_bit_image(tmp_path, wide, channels):
    """Before: 32-bit integer and float images holding 0..255 or 0..1 read black (divided by 257, or clipped)."""
    name, make = wide
    image = make()
    path = tmp_path / ("wide.png" if image.mode.startswith("I;16") else "wide.tif")
    image.save(path)
    assert Image.open(path).mode == image.mode  # the file keeps the wide mode
    Image.fromarray(_RAMP.astype(np.uint8)).save(tmp_path / "eight.png")
    assert torch.equal(load_image(path, 40, channels), load_image(tmp_path / "eight.png", 40, channels)), name


def test_sixteen_bit_files_that_open_as_32_bit_integers_keep_the_16_bit_scale(tmp_path):
    """Pillow opens a 16-bit PGM (and, before Pillow 10, a 16-bit PNG) as "I": its scale is 0..65535,
    whatever its pixels hold; a dark frame stays dark, and one bright pixel changes no other."""
    dark = np.arange(40 * 40).reshape(40, 40) % 200  # 0..199 of 65535
    brighter = dark.copy()
    brighter[0, 0] = 300
    for name, frame in (("dark.pgm", dark), ("brighter.pgm", brighter)):
        (tmp_path / name).write_bytes(b"P5\n40 40\n65535\n" + frame.astype(">u2").tobytes())
        assert Image.open(tmp_path / name).mode == "I"
    one, two = load_image(tmp_path / "dark.pgm", 40, 1), load_image(tmp_path / "brighter.pgm", 40, 1)
    assert int(one.max()) == 1 and torch.equal(one[0, 1:], two[0, 1:])  # round(199 / 257) = 1


def test_a_float_image_a_little_over_one_is_still_read_as_zero_to_one(tmp_path):
    values = (_RAMP / 255).astype(np.float32)
    values[0, 0] = 1.01  # a resampled 0..1 image overshoots
    Image.fromarray(values).save(tmp_path / "over.tif")
    Image.fromarray(_RAMP.astype(np.uint8)).save(tmp_path / "eight.png")
    image, expected = load_image(tmp_path / "over.tif", 40, 1), load_image(tmp_path / "eight.png", 40, 1)
    assert int(image[0, 0, 0]) == 255 and torch.equal(image[0, 1:], expected[0, 1:])


def test_wide_grayscale_reads_negative_and_non_finite_values_as_black(tmp_path):
    values = (_RAMP / 255).astype(np.float32)
    values[0, :4] = [-0.5, np.nan, np.inf, -np.inf]
    Image.fromarray(values).save(tmp_path / "odd.tif")
    image = load_image(tmp_path / "odd.tif", 40, 1)[0]
    assert image[0, :4].tolist() == [0, 0, 0, 0] and image[1].tolist() == (_RAMP[1] % 256).tolist()


def test_exif_orientation_is_applied(messy):
    image = load_image(messy / "c/rotated.JPEG", 20).float()  # (3, 20, 20), red on top
    top, bottom = image[:, 2:8].mean((1, 2)), image[:, 12:18].mean((1, 2))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_alpha_composited_over_white(messy):
    image = load_image(messy / "a/rgba.png", 40).float()
    assert image[:, :, :18].mean((1, 2)).tolist() == pytest.approx([0, 0, 255], abs=2)
    assert image[:, :, 22:].mean((1, 2)).tolist() == pytest.approx([255, 255, 255], abs=2)


def test_palette_cmyk_and_gray_convert(messy):
    palette = load_image(messy / "c/palette.gif", S)
    reference = Image.open(messy / "c/palette.gif").convert("RGB").resize((S, S), box=(5, 0, 35, 30))
    reference = torch.from_numpy(np.array(reference)).permute(2, 0, 1)
    assert (palette.int() - reference.int()).abs().float().mean() < 3
    red = load_image(messy / "a/deep/er/cmyk.jpg", S).float().mean((1, 2))  # C=0 M=Y=255 K=0
    assert red[0] > 215 and red[1] < 40 and red[2] < 40
    gray = load_image(messy / "a/gray.PNG", S)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_draft_decode_matches_full_decode(messy):
    """The reduced-size JPEG decode agrees with a full decode + antialiased resize."""
    image = load_image(messy / "c/big.jpg", 64).float()  # 1600x1200 -> decoded at 1/8
    with Image.open(messy / "c/big.jpg") as full:
        full.load()
        assert full.size == (1600, 1200)
        reference = full.resize((64, 64), Image.Resampling.BOX, box=(200, 0, 1400, 1200))
    reference = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float()
    assert (image - reference).abs().mean() < 2.0


@pytest.mark.parametrize("load_size, decoded", [(64, (200, 150)), (256, (400, 300)), (1000, (1600, 1200))])
def test_large_jpeg_is_decoded_reduced_but_not_below_load_size(messy, monkeypatch, load_size, decoded):
    sizes = []
    resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        sizes.append(self.size)
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    assert load_image(messy / "c/big.jpg", load_size).shape == (3, load_size, load_size)
    assert sizes == [decoded]  # 1600x1200 at 1/8, 1/4, 1/1


def test_grayscale_draft_matches_rgb_luma(messy):
    gray = load_image(messy / "c/big.jpg", 64, channels=1).float()[0]
    rgb = load_image(messy / "c/big.jpg", 64, channels=3).float()
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # ITU-R BT.601
    assert (gray - luma).abs().mean() < 2.0


def test_collate_stacks_and_sums():
    batch = [(torch.full((3, 4, 4), i, dtype=torch.uint8), i) for i in range(3)]
    images, skipped = collate_images(batch)
    assert images.shape == (3, 3, 4, 4) and images[2, 0, 0, 0] == 2 and skipped == 3


def test_loader_with_two_workers_adds_up_skips(messy):
    dataset = ImageFolder(messy, S)
    loader = make_loader(dataset, batch_size=4, workers=2, drop_last=False, pin_memory=False)
    assert loader.persistent_workers
    seen, skipped = 0, 0
    for images, batch_skipped in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, S, S)
        seen += len(images)
        skipped += batch_skipped
    assert seen == len(ALL) and skipped == sum(EXPECTED_SKIPS)


def test_loader_shuffle_is_seeded(messy):
    dataset = ImageFolder(messy, 8)

    def order(seed: int) -> torch.Tensor:
        loader = make_loader(dataset, batch_size=len(ALL), workers=0, seed=seed, pin_memory=False)
        return next(iter(loader))[0]

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))


def _batches_in_a_spawned_process(rank: int, loader, out: str) -> None:
    torch.save([batch.tolist() for batch in loader], out)


def test_a_loader_goes_to_spawned_processes_and_keeps_its_order(tmp_path):
    """Multi-process probe: Lightning's ddp_spawn (and mp.spawn of a loader) failed in every child with 'unable to
    resize file ... Invalid argument': torch's own pickling of the loader's torch.Generator shares its state tensor;
    the loader's generator now travels as its state's bytes."""
    import pickle

    import torch.multiprocessing as mp

    loader = make_loader(torch.arange(12.0), batch_size=4, shuffle=True, seed=5)
    expected = [batch.tolist() for batch in make_loader(torch.arange(12.0), batch_size=4, shuffle=True, seed=5)]
    mp.spawn(_batches_in_a_spawned_process, args=(loader, str(tmp_path / "child.pt")), nprocs=1, join=True)
    assert torch.load(tmp_path / "child.pt") == expected
    copied = pickle.loads(pickle.dumps(loader.generator))
    assert torch.equal(copied.get_state(), loader.generator.get_state()) and type(copied) is type(loader.generator)


def test_the_shuffle_order_of_every_epoch_is_the_seeds_whatever_the_workers():
    """A data-API probe: from the second epoch on, workers=2 (persistent) gave another order than workers=0 for
    one seed: each new iterator drew its workers' base seed from the generator the shuffle used too."""
    data = torch.arange(12.0)
    orders = {}
    for workers in (0, 2):
        loader = make_loader(data, batch_size=3, workers=workers, seed=3, pin_memory=False)
        orders[workers] = [torch.cat(list(loader)).tolist() for _ in range(3)]
    assert orders[0] == orders[2]
    assert len({tuple(epoch) for epoch in orders[0]}) == 3  # each epoch reshuffled
    assert all(sorted(epoch) == data.tolist() for epoch in orders[0])


def test_a_worker_start_up_cut_short_does_not_hang_the_exit(tmp_path):
    """Probe: eval --workers 200 under 'ulimit -n 256' printed 'too many open files' and then hung for ever at exit:
    the workers started before the failure ignore SIGTERM, and no iterator held them for the exit hook to kill."""
    import resource
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from byol_pytorch.data.loader import make_loader\n"
        "loader = make_loader(torch.arange(400.0), batch_size=2, workers=60, shuffle=False)\n"
        "next(iter(loader))\n"
    )

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, preexec_fn=few_files
    )
    assert done.returncode != 0 and "Too many open files" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - started < 60  # before: killed by the timeout


def test_more_workers_than_cpus_is_one_warning_per_process(monkeypatch, recwarn):
    """Probe: torch's three-line warning for more workers than CPUs came for every loader (twice per eval); the
    package says it once, in one line."""
    from byol_pytorch.data import loader as loader_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one CPU, for torch's check too
    monkeypatch.setattr(loader_module, "_MANY_WORKERS_SAID", [])
    for _ in range(2):
        batches = [b.tolist() for b in make_loader(torch.arange(4.0), batch_size=2, workers=3, shuffle=False)]
        assert batches == [[0.0, 1.0], [2.0, 3.0]]
    said = [str(w.message) for w in recwarn if "worker" in str(w.message).lower()]  # torch's: none
    assert said == [
        "3 loader workers for the 1 CPUs this process may use: loading may slow down or stall; lower the worker "
        "count (more than the CPUs helps only slow remote reads)"
    ]


def test_loader_refuses_to_drop_every_batch(messy):
    with pytest.raises(ValueError, match="every batch would be dropped"):
        make_loader(ImageFolder(messy, 8), batch_size=64, workers=0)


def test_a_stream_of_known_length_shorter_than_a_batch_is_refused_and_one_of_unknown_length_is_taken():
    """A probe: an ``IterableDataset`` of 5 images with ``len()`` gave a loader of no batch at all, so a loop
    over it trained nothing without a word; a map-style dataset of 5 was refused."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.zeros(5, 3, 8, 8))

    class Counted(Stream):
        def __len__(self):
            return 5

    with pytest.raises(ValueError, match="5 images but a batch size of 8: every batch would be dropped"):
        make_loader(Counted(), batch_size=8)
    assert [len(batch) for batch in make_loader(Counted(), batch_size=4)] == [4]
    assert [len(batch) for batch in make_loader(Counted(), batch_size=8, drop_last=False)] == [5]
    assert list(make_loader(Stream(), batch_size=8)) == []  # its length is unknown: nothing to check


def test_no_readable_file_raises_runtime_error(tmp_path):
    _write(tmp_path / "a.jpg", b"")
    _write(tmp_path / "b.png", b"not a png")
    dataset = ImageFolder(tmp_path, 8)
    with pytest.raises(RuntimeError, match="none of the 2 image files"):
        dataset[0]


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        index_images(tmp_path / "missing")
    _write(tmp_path / "file.jpg", b"")
    with pytest.raises(ValueError, match="is not a folder"):
        ImageFolder(tmp_path / "file.jpg", 8)
    empty = tmp_path / "empty"
    _write(empty / "notes.txt", b"")
    _write(empty / ".hidden/a.jpg", b"")
    with pytest.raises(ValueError, match=r"no images found under .*empty.*\.jpg, \.jpeg"):
        index_images(empty)


@pytest.mark.parametrize("size", [8.5, "8", True, np.float32(8)])
def test_a_load_size_that_is_not_an_int_is_refused_when_the_dataset_is_built(tmp_path, size):
    """Before: ImageFolder(root, 8.5) was built and failed at the first read, inside PIL's resize (in a loader
    worker, mid-run); HFImageDataset and the shard datasets the same."""
    import datasets

    from byol_pytorch.data.hf import HFImageDataset
    from byol_pytorch.data.shards import ShardDataset, ShardSamples

    _smooth_rgb(20, 20, 0).save(_write(tmp_path / "c" / "a.png", b""))
    rows = datasets.Dataset.from_dict({"image": [_smooth_rgb(20, 20, 0)]})
    builds = [
        lambda: ImageFolder(tmp_path, size),
        lambda: LabelledImageFolder(tmp_path, size),
        lambda: HFImageDataset(rows, size),
        lambda: ShardDataset([tmp_path / "s.tar"], size, batch_size=2),
        lambda: ShardSamples([tmp_path / "s.tar"], size),
        lambda: load_image(tmp_path / "c" / "a.png", size),
    ]
    for build in builds:
        with pytest.raises(
            TypeError, match=rf"load_size must be a whole number \(an int\), got {re.escape(repr(size))}"
        ):
            build()
    assert ImageFolder(tmp_path, np.int64(8))[0][0].shape == (3, 8, 8)  # numpy's ints are ints
    with pytest.raises(TypeError, match=r"channels must be a whole number \(an int\), got 3.0"):
        ImageFolder(tmp_path, 8, channels=3.0)


def test_the_image_suffixes_browsers_and_cameras_save_are_indexed(tmp_path):
    """Before: .jfif (JPEG as Windows browsers save it), .jpe and .avif files were left out without a word."""
    picture = _smooth_rgb(20, 20, 0)
    for name in ("one.png", "two.jfif", "three.jpe", "four.pnm"):
        picture.save(tmp_path / name, format="PNG" if name.endswith(".png") else "PPM" if "pnm" in name else "JPEG")
    dataset = ImageFolder(tmp_path, 8)
    assert sorted(p.name for p in dataset.paths) == ["four.pnm", "one.png", "three.jpe", "two.jfif"]
    assert all(skipped == 0 for _, skipped in (dataset[i] for i in range(len(dataset))))
    assert ".avif" in IMAGE_EXTENSIONS


def test_rgb_to_one_channel_is_pillows_luma_and_gray_to_three_is_replicated():
    """Before: match_channels(rgb, 1) kept the red channel (a pure red picture came out white)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    reference = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb])[:, None]
    got = match_channels(torch.from_numpy(rgb).permute(0, 3, 1, 2), 1)
    assert got.dtype == torch.uint8 and got.shape == (2, 1, 16, 16)
    assert np.abs(got.numpy().astype(int) - reference.astype(int)).max() <= 1  # Pillow rounds in fixed point
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    torch.testing.assert_close(match_channels(red, 1), torch.full((1, 1, 2, 2), 0.299))
    gray = torch.rand(1, 1, 4, 4)
    assert torch.equal(match_channels(gray, 3), gray.expand(1, 3, 4, 4))


def test_an_index_of_another_folder_is_refused(tmp_path):
    """Before: ImageFolder("A", index=index_images("B")) served B's files under A's name."""
    for name in ("a", "b"):
        _smooth_rgb(20, 20, 0).save(_write(tmp_path / name / "x.png", b"").with_name("x.png"))
    with pytest.raises(ValueError, match=r"index is of the folder .*b', not of root .*a'"):
        ImageFolder(tmp_path / "a", 8, index=index_images(tmp_path / "b"))
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert len(ImageFolder(tmp_path / "link", 8, index=index_images(tmp_path / "a"))) == 1  # the same folder


def test_a_pathlib_path_is_a_data_spec_like_its_str(tmp_path):
    """Before: open_unlabelled(Path(...)) said "a data spec must be a non-empty string" where ImageFolder and
    BYOLTrainer take a Path."""
    from byol_pytorch.data import data_kind, labelled_split, open_labelled, open_unlabelled

    for i in range(5):
        _smooth_rgb(20, 20, i).save(_write(tmp_path / "cls" / f"{i}.png", b""))
        _smooth_rgb(20, 20, i).save(_write(tmp_path / "other" / f"{i}.png", b""))
    assert data_kind(tmp_path) == data_kind(str(tmp_path)) == "folder"
    assert len(open_unlabelled(tmp_path, 8)) == len(open_unlabelled(str(tmp_path), 8)) == 10
    assert open_labelled(tmp_path, 8).targets == open_labelled(str(tmp_path), 8).targets
    assert [len(part) for part in labelled_split(tmp_path, 8)] == [8, 2]
    with pytest.raises(ValueError, match="a data spec must be a non-empty string or path"):
        open_unlabelled(3, 8)


@pytest.fixture
def pixel_limit(monkeypatch):
    """Sets BYOL_PYTORCH_MAX_IMAGE_PIXELS; Pillow's global and the once-per-process warning are restored after."""
    import byol_pytorch.data.folder as folder

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(folder, "_large_warned", False)
    monkeypatch.setattr(folder, "_applied_limit", None)
    return lambda value: monkeypatch.setenv(folder.PIXEL_LIMIT_ENV, value)


def test_an_image_over_the_pixel_limit_is_passed_over_with_one_warning_naming_it_and_the_fix(tmp_path, pixel_limit):
    from byol_pytorch.data.folder import PIXEL_LIMIT_ENV, LargeImageWarning

    _smooth_rgb(40, 25, 0).save(tmp_path / "a_fits.png")  # 1,000 pixels: the limit itself
    _smooth_rgb(40, 26, 1).save(tmp_path / "b_large.png")  # 1,040
    _smooth_rgb(40, 30, 2).save(tmp_path / "c_larger.png")
    pixel_limit("1_000")
    dataset = ImageFolder(tmp_path, S)
    with pytest.warns(LargeImageWarning) as shown:
        image, skipped = dataset[1]  # b_large is passed over: a_fits (wrapping around) comes instead
        dataset[2]
        with pytest.raises(BrokenImageError, match="exceeds limit") as caught:
            load_image(tmp_path / "b_large.png", S)  # any reader: embed, eval, shards make
    assert caught.value.too_large
    assert skipped == 1 and torch.equal(image, dataset[0][0])
    large = [w for w in shown if issubclass(w.category, LargeImageWarning)]  # (and Pillow's, from half the limit)
    assert len(large) == 1 and "b_large.png" in str(large[0].message) and PIXEL_LIMIT_ENV in str(large[0].message)
    pixel_limit("0")  # no limit
    assert load_image(tmp_path / "c_larger.png", S).shape == (3, S, S)


def test_an_image_under_the_pixel_limit_reads_without_pillows_warning_in_a_command(tmp_path, pixel_limit):
    import warnings

    from byol_pytorch.app import cli

    _smooth_rgb(40, 20, 0).save(tmp_path / "a.png")  # 800 pixels: over half the limit, where Pillow warns
    pixel_limit("1000")
    with cli._package_warnings_as_lines():  # a command's warnings; the library leaves Pillow's filters alone
        warnings.simplefilter("error", UserWarning)
        assert load_image(tmp_path / "a.png", S).shape == (3, S, S)
    with pytest.warns(Image.DecompressionBombWarning):
        load_image(tmp_path / "a.png", S)


def test_the_pixel_limit_is_exact_for_an_odd_count_and_pillows_comes_back_when_unset(
    tmp_path, pixel_limit, monkeypatch
):
    import byol_pytorch.data.folder as folder
    from byol_pytorch.data.folder import PIXEL_LIMIT_ENV

    _smooth_rgb(1001, 1, 0).save(tmp_path / "a.png")
    _smooth_rgb(1002, 1, 0).save(tmp_path / "b.png")
    pixel_limit("1001")
    assert load_image(tmp_path / "a.png", S).shape == (3, S, S)
    with pytest.raises(BrokenImageError, match="exceeds limit"):
        load_image(tmp_path / "b.png", S)  # a review: (N + 1) // 2 let N + 1 pixels through
    assert Image.MAX_IMAGE_PIXELS == 500.5
    monkeypatch.delenv(PIXEL_LIMIT_ENV)
    load_image(tmp_path / "b.png", S)  # read: Pillow's own limit again
    assert Image.MAX_IMAGE_PIXELS == folder._pillow_limit


@pytest.mark.parametrize("value", ["lots", "-5", "1.5"])
def test_a_bad_pixel_limit_stops_the_dataset_with_the_variable_named(tmp_path, pixel_limit, value):
    from byol_pytorch.app import cli
    from byol_pytorch.data.shards import ShardSamples

    (tmp_path / "images").mkdir()
    _smooth_rgb(40, 20, 0).save(tmp_path / "images" / "a.png")
    assert cli.main(["shards", "make", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "shards")]) == 0
    pixel_limit(value)
    message = f"BYOL_PYTORCH_MAX_IMAGE_PIXELS='{value}': give a whole number"
    with pytest.raises(ValueError, match=message):
        ImageFolder(tmp_path / "images", S)
    with pytest.raises(ValueError, match=message):  # a review: shards read every sample as unreadable
        ShardSamples(str(tmp_path / "shards"), S)


def test_invalid_sizes_are_rejected(messy):
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(messy, 8, channels=4)
    with pytest.raises(ValueError, match="load_size"):
        load_image(messy / "d.bmp", 0)


def test_labelled_folder_classes_targets_and_substitute_label(tmp_path):
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
        for i in range(2):
            _write(tmp_path / cls / f"{i}.jpg", _jpeg_bytes(Image.new("RGB", (20, 20), colour)))
    _write(tmp_path / "cat" / "2_broken.jpg", b"")  # last cat file: replaced by dog/0.jpg
    _write(tmp_path / ".trash/x.jpg", b"")
    dataset = LabelledImageFolder(tmp_path, 8)
    assert dataset.classes == ["cat", "dog"]
    assert dataset.targets == [0, 0, 0, 1, 1]
    image, label = dataset[2]
    assert label == 1 and image[1].float().mean() > 200  # the green dog
    assert dataset[0][1] == 0 and dataset[0][0][0].float().mean() > 200
    batch = next(iter(make_loader(dataset, batch_size=5, workers=0, shuffle=False)))
    assert batch[0].shape == (5, 3, 8, 8) and batch[1].tolist() == [0, 0, 1, 1, 1]


def test_labelled_folder_layout_errors(tmp_path):
    _write(tmp_path / "flat.jpg", _jpeg_bytes(Image.new("RGB", (8, 8))))
    with pytest.raises(ValueError, match="has no class sub-folders; expected ROOT/CLASS_NAME/image.jpg"):
        LabelledImageFolder(tmp_path, 8)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class 'empty_class' is empty: .*; put its images in it, or remove it$"):
        LabelledImageFolder(tmp_path, 8)
    # a held-out split's empty class folder is a class with no images, as without the folder (a probe: fatal)
    _write(tmp_path / "full_class" / "a.jpg", _jpeg_bytes(Image.new("RGB", (8, 8))))
    held = LabelledImageFolder(tmp_path, 8, classes=["empty_class", "full_class", "third"])
    assert held.targets == [1] and held.classes == ["empty_class", "full_class", "third"]
    (tmp_path / "full_class" / "a.jpg").unlink()
    with pytest.raises(ValueError, match="has class sub-folders but no images in any of them"):
        LabelledImageFolder(tmp_path, 8, classes=["empty_class", "full_class"])
    with pytest.raises(ValueError, match="does not exist"):
        LabelledImageFolder(tmp_path / "missing", 8)


@pytest.mark.parametrize("image_size, expected", [(224, 256), (32, 37), (96, 110), (8, 9), (1, 1)])
def test_load_size_for_is_the_imagenet_ratio_rounded(image_size, expected):
    # 256/224 = 8/7: ImageNet's 256 px loads for 224 px crops, rounded half up, never below the crop.
    assert load_size_for(image_size) == expected == max(image_size, int(image_size * 8 / 7 + 0.5))


def test_load_size_for_a_height_and_width_loads_the_longer_side():
    # Images load as squares, so views of (h, w) need the longer side; BYOL takes (h, w) too.
    assert load_size_for((32, 48)) == load_size_for(48) == load_size_for([48, 32]) == 55
    assert load_size_for(np.int64(32)) == 37
    for bad in (32.0, True, "32", (1, 2, 3), ()):
        with pytest.raises(TypeError, match=r"image_size must be a side \(int\) or \(height, width\)"):
            load_size_for(bad)
    with pytest.raises(ValueError, match="image_size must be positive"):
        load_size_for((0, 32))


def test_match_channels_replicates_gray_and_keeps_matching_batches():
    gray = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    rgb = match_channels(gray, 3)
    assert rgb.shape == (2, 3, 4, 4) and rgb.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(rgb[:, c], gray[:, 0])
    colour = torch.rand(2, 3, 4, 4)
    assert match_channels(colour, 3) is colour  # nothing to do: the same tensor
    luma = 0.299 * colour[:, :1] + 0.587 * colour[:, 1:2] + 0.114 * colour[:, 2:]
    torch.testing.assert_close(match_channels(colour, 1), luma)  # gray as Pillow's convert("L") makes it
    assert torch.equal(match_channels(colour, 4), colour[:, :1].expand(-1, 4, -1, -1))  # a 4-channel net's input
    # a 2-channel net (--in-chans 2; images load with 3): the luma twice (a review: the refusal broke such runs)
    torch.testing.assert_close(match_channels(colour, 2), luma.expand(-1, 2, -1, -1))
    for given, channels in ((4, 3), (4, 1), (5, 2)):  # a probe: RGBA became its red channel three times over
        with pytest.raises(ValueError, match=rf"not {channels} of {given}: convert the images first .*x\[:, :3\]"):
            match_channels(torch.rand(2, given, 4, 4), channels)


def test_a_loop_left_by_an_error_in_a_worker_does_not_hang_the_exit(tmp_path):
    # Our workers ignore SIGTERM (the main process handles it), which the interpreter's exit sends
    # to its daemonic children before waiting for them: without the loader's exit hook a script
    # whose loop ended in an exception waited for ever.
    import subprocess
    import sys

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i}.jpg").write_bytes(b"not an image")
    script = (
        "from byol_pytorch.data import open_unlabelled\n"
        "from byol_pytorch.data.loader import make_loader\n"
        f"for batch in make_loader(open_unlabelled({str(tmp_path)!r}, 16), 2, workers=2, shuffle=False):\n"
        "    pass\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "could be read" in result.stderr and "killed by signal" not in result.stderr


def test_a_held_out_folder_is_labelled_by_the_training_split_class_names(tmp_path):
    from byol_pytorch.data.sources import labelled_split

    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("cat", "fox"))):
        for label, name in enumerate(classes):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * label, 10 * i, 0)).save(tmp_path / split / name / f"{i}.png")
    bank, queries = labelled_split(str(tmp_path), 8)
    assert bank.classes == queries.classes == ["cat", "dog", "fox"]
    assert sorted(set(queries.targets)) == [0, 2]  # a val fox is the bank's fox (2), not its dog (1)
    (tmp_path / "val" / "owl").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "owl" / "0.png")
    with pytest.raises(ValueError, match="classes the training split lacks \\('owl'\\)"):
        labelled_split(str(tmp_path), 8)


def test_tar_files_where_images_were_expected_are_named_with_the_fix(tmp_path):
    """Before: 'is not a folder; pass the folder that holds the images', or 'no images found', for tar files."""
    (tmp_path / "one.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match=r"one.tar.gz' is a compressed tar; shards are plain .tar files: decompress"):
        ImageFolder(tmp_path / "one.tar.gz", S)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    (zipped / "train-0.tgz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match=r"no images found .* it holds 1 compressed tar file\(s\): shards are plain"):
        ImageFolder(zipped, S)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("train-0.tar", "train-1.tar", "README.md", "index.json"):
        (mixed / name).write_bytes(b"x")
    with pytest.raises(ValueError, match=r"it holds 2 .tar file\(s\) beside 1 other file\(s\): a folder is read as"):
        ImageFolder(mixed, S)
    (mixed / "README.md").unlink()
    (mixed / "sub").mkdir()  # a folder is not a file beside the shards
    with pytest.raises(ValueError, match=r"it holds 2 .tar file\(s\): shards, not images"):
        ImageFolder(mixed, S)


def test_a_macos_archive_folder_is_no_class(tmp_path, make_labelled):
    """Before: unzipping on a Mac leaves __MACOSX/ beside the classes, and eval refused it as an empty class."""
    from byol_pytorch.data.folder import LabelledImageFolder

    root = make_labelled(tmp_path / "lab", classes=2, per_class=3)
    (root / "__MACOSX" / "class_0").mkdir(parents=True)
    (root / "__MACOSX" / "class_0" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble, not a PNG
    (root / "lost+found").mkdir()  # final read: a volume's root holds it, and it was refused as an empty class
    assert LabelledImageFolder(root, 8).classes == ["class_0", "class_1"]


def test_a_leading_tilde_is_the_home_folder_in_every_python_data_entry(tmp_path, monkeypatch, make_shards):
    """A data-API probe: open_unlabelled("~/imgs") said the folder does not exist, where cifar10:~/... and
    hf:~/... specs and every CLI flag expand it (so does torchvision's ImageFolder)."""
    from byol_pytorch.data import load_or_scan, open_labelled, open_unlabelled
    from byol_pytorch.data.shards import ShardSamples

    monkeypatch.setenv("HOME", str(tmp_path))
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "imgs" / label / f"{i}.png")
    make_shards(tmp_path / "shards", shards=2, per_shard=3, broken=False)
    assert len(index_images("~/imgs")) == len(load_or_scan("~/imgs", "~/index.npz")) == 4
    assert (tmp_path / "index.npz").is_file()
    assert len(ImageFolder("~/imgs", 8)) == len(open_unlabelled("~/imgs", 8)) == 4
    assert LabelledImageFolder("~/imgs", 8).classes == ["a", "b"] and len(open_labelled("~/imgs", 8)) == 4
    assert len(open_unlabelled("~/shards", 8)) == len(ShardSamples("~/shards/train-{0000..0001}.tar", 8)) == 6


def test_class_folders_holding_the_same_images_through_links_are_named(tmp_path):
    """A review: one folder linked as two classes was named, but not a class linked to the root (every image again
    under its label) or into another class."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (90 * i, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "all").symlink_to(tmp_path)
    (tmp_path / "inner").symlink_to(tmp_path / "a")
    with pytest.warns(
        UserWarning, match=r"through links \('all' and 'a'; 'a' and 'inner'; 'all' and 'b'; \.\.\.\): those images"
    ):
        data = LabelledImageFolder(tmp_path, 8)
    assert data.classes == ["a", "all", "b", "inner"]
    (tmp_path / "all").unlink()
    (tmp_path / "inner").unlink()
    (tmp_path / "b").rename(tmp_path.parent / f"{tmp_path.name}_b")  # a class linked to a folder of its own
    (tmp_path / "b").symlink_to(tmp_path.parent / f"{tmp_path.name}_b")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning
        assert len(LabelledImageFolder(tmp_path, 8).targets) == 4


def test_a_link_inside_a_class_to_a_folder_above_it_is_not_walked(tmp_path):
    """A probe: ``cat/up -> ..`` made the scan of ``cat`` enter the data root again, so every image of ``dog`` was
    also a ``cat`` (9 samples of 6). A link above the scanned folder is not walked; a link beside it still is."""
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / name / f"{i}.png")
    (data / "cat" / "up").symlink_to("..")
    (data / "cat" / "top").symlink_to(tmp_path)  # two levels up
    labelled = LabelledImageFolder(data, 8)
    assert list(labelled.targets) == [0, 0, 0, 1, 1, 1]
    assert [labelled.sample_id(i) for i in range(3)] == ["cat/0.png", "cat/1.png", "cat/2.png"]
    assert len(index_images(data / "cat")) == 3 and len(index_images(data)) == 6
    (tmp_path / "more").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "more" / "x.png")
    (data / "cat" / "beside").symlink_to(tmp_path / "more")  # not above: walked
    assert [index_images(data / "cat").relative(i) for i in range(4)] == ["0.png", "1.png", "2.png", "beside/x.png"]


@pytest.mark.parametrize(
    "given, error, match",
    [
        (dict(workers=1.5), TypeError, "workers must be a whole number, got 1.5"),
        (dict(workers="2"), TypeError, "workers must be a whole number, got '2'"),
        (dict(batch_size="4"), TypeError, r"batch_size must be a whole number, got '4'"),
        (dict(seed=1.5), TypeError, "seed must be a whole number, got 1.5"),
        (dict(seed=2**70), ValueError, "seed must fit in 64 bits"),
        (dict(shuffle="no"), TypeError, "shuffle must be True or False, got 'no'"),
        (dict(drop_last=None), TypeError, "drop_last must be True or False, got None"),
    ],
)
def test_loader_arguments_of_the_wrong_type_are_named(messy, given, error, match):
    with pytest.raises(error, match=match):
        make_loader(ImageFolder(messy, 8), **{"batch_size": 2, **given})


def test_loader_of_an_empty_dataset_to_shuffle_says_so():
    with pytest.raises(ValueError, match="the dataset holds no samples to shuffle"):
        make_loader(torch.zeros(0, 3), batch_size=2, drop_last=False)
    assert list(make_loader(torch.zeros(0, 3), batch_size=2, shuffle=False, drop_last=False)) == []
    assert len(list(make_loader(torch.zeros(3, 2), 2, seed=np.int64(3)))) == 1  # numpy's int is an int


def test_match_channels_refuses_what_is_not_a_batch_or_a_channel_count():
    with pytest.raises(ValueError, match=r"expects images \(B, C, H, W\), got \(3, 4, 4\): add a batch dimension"):
        match_channels(torch.rand(3, 4, 4), 1)  # its H is not a channel count
    with pytest.raises(ValueError, match=r"channels must be at least 1 \(the net's input channels\), got 0"):
        match_channels(torch.rand(2, 3, 4, 4), 0)  # was an empty (2, 0, 4, 4) batch
    with pytest.raises(TypeError, match=r"takes a torch tensor, got ndarray \(numpy: torch.from_numpy\)"):
        match_channels(np.zeros((2, 3, 4, 4)), 1)
    assert match_channels(torch.rand(2, 1, 4, 4), np.int64(3)).shape == (2, 3, 4, 4)  # numpy's int, as before


def test_sample_images_of_a_tensor_dataset_and_its_count_checked():
    from byol_pytorch.data.sources import first_items, sample_images

    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).view(5, 3, 2, 2)
    got = sample_images(images, 2)  # items are images: was channel 0 of each, (2, 2, 2)
    assert torch.equal(got, images[[0, 4]])
    for count, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="count must be (at least 1 .how many images.|a whole number)"):
            sample_images(images, count)
    with pytest.raises(ValueError, match="count must be at least 1"):
        first_items(images, -1)  # was [] without a word


def test_labelled_split_names_a_missing_held_out_folder_and_unknown_options(tmp_path):
    from byol_pytorch.data.sources import labelled_split

    for label, name in enumerate(("cat", "dog")):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (60 * label, 10 * i, 0)).save(tmp_path / "train" / name / f"{i}.png")
    with pytest.raises(ValueError, match=r"holds a train/ folder and no val/ or test/ beside it.*every fifth image"):
        labelled_split(str(tmp_path), 8)  # was "holds images of one class only"
    assert [len(part) for part in labelled_split(str(tmp_path / "train"), 8)] == [8, 2]  # the way out works
    with pytest.raises(TypeError, match=r"unknown option\(s\) foo; it takes image_column, label_column and split"):
        labelled_split(str(tmp_path / "train"), 8, foo=1)  # was "foo applies to hf: data only"

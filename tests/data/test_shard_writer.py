"""`byol-pytorch shards make` / `shards index`: every readable image in exactly one shard, broken files counted."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol_pytorch.app import cli
from byol_pytorch.data.shard_writer import parse_size, sample_key
from byol_pytorch.data.shards import ShardSamples, is_shard_spec

pytest.importorskip("webdataset")


def members(folder):
    found = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                assert member.name not in found, f"{member.name} in two shards"
                found[member.name] = (shard.name, tar.extractfile(member).read())
    return found


def test_make_packs_every_readable_image_once(tmp_path, messy, tiny_flags, capsys):
    shutil.copy(messy / "a" / "0.jpg", messy / "a" / "v1.2.jpg")  # dots in the name
    (messy / "a" / "0.png").write_bytes((messy / "a" / "deeper" / "1.png").read_bytes())  # same stem as 0.jpg
    readable = {
        str(p.relative_to(messy)): p.read_bytes()
        for p in messy.rglob("*")
        if p.suffix in (".jpg", ".png") and p.name not in ("corrupt.jpg", "empty.png")
    }
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "40KB"]) == 0
    captured = capsys.readouterr()
    assert "2 files under" in captured.err and "corrupt.jpg" in captured.err and "empty.png" in captured.err
    found = members(out)
    expected = {f"{sample_key(rel)}.{rel.rsplit('.', 1)[-1]}": data for rel, data in readable.items()}
    assert {name: data for name, (_, data) in found.items()} == expected  # each readable image once, bytes as-is
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert len(shards) > 2 and not list(out.glob(".*"))  # no temporary file left
    assert all(p.stat().st_size <= 40_000 for p in out.glob("*.tar"))
    index = json.loads((out / "index.json").read_text())
    assert index["wids_version"] == 1 and [e["url"] for e in index["shardlist"]] == shards
    per_shard = {s: sum(1 for shard, _ in found.values() if shard == s) for s in shards}
    assert [e["nsamples"] for e in index["shardlist"]] == [per_shard[s] for s in shards]
    assert is_shard_spec(str(out)) and len(ShardSamples(str(out), 32)) == len(readable) == 26
    pattern = str(out / f"train-{{000000..{len(shards) - 1:06d}}}.tar")
    assert cli.main(["shards", "index", pattern, "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [e["nsamples"] for e in again["shardlist"]] == [e["nsamples"] for e in index["shardlist"]]
    assert [e["url"] for e in again["shardlist"]] == [f"shards/{s}" for s in shards]
    run = ["train", "--data", str(out), "--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "2"]
    assert cli.main(run) == 0, capsys.readouterr().err


def test_make_errors_are_one_line(tmp_path, messy, capsys):
    assert parse_size("1GB") == 10**9
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(tmp_path / "o"), "--shard-size", "lots"]) == 1
    assert capsys.readouterr().err.strip() == (
        "byol-pytorch: error: --shard-size: 'lots' is not a size (e.g. 1GB, 500MB, 64MiB)"
    )
    assert cli.main(["shards", "index", str(tmp_path / "none-{0..1}.tar"), "--out", str(tmp_path / "i.json")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byol-pytorch: error: 2 of the 2 shards")


def test_training_on_the_shards_sees_the_images_of_the_folder(tmp_path, tiny_flags, monkeypatch, capsys):
    """One epoch on the folder and one on its shards hand the learner the same decoded images (pixel for pixel)."""
    import hashlib

    import numpy as np
    import torch
    from PIL import Image

    from byol_pytorch import BYOL

    folder, rng = tmp_path / "images", np.random.default_rng(5)
    (folder / "sub").mkdir(parents=True)
    for i in range(24):
        pixels = rng.integers(0, 256, (40, 33 + i % 7, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i % 3 else "") / f"{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "broken.png").write_bytes(b"\x89PNG not an image")
    (folder / "sub" / "cut.jpg").write_bytes((folder / "0.jpg").read_bytes()[:200])
    shards = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(folder), "--out", str(shards), "--shard-size", "30KB"]) == 0
    assert len(list(shards.glob("*.tar"))) > 2

    seen: list[str] = []
    original = BYOL.forward

    def forward(self, x, *args, **kwargs):  # what the training step hands the learner
        if not kwargs.get("return_embedding") and x.dtype == torch.uint8:
            seen.extend(hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in x.cpu())
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(BYOL, "forward", forward)
    flags = [*tiny_flags, "--batch-size", "2", "--bn-stats", "trained"]
    # an epoch: the folder's 26 files in 13 batches (2 broken, each replaced by a readable one), the shards' 24 in 12
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "f"), *flags, "--max-steps", "13"]) == 0
    from_folder, seen[:] = list(seen), []
    assert cli.main(["train", "--data", str(shards), "--out", str(tmp_path / "s"), *flags, "--max-steps", "12"]) == 0
    assert len(from_folder) == 26 and len(seen) == 24, capsys.readouterr().err
    assert len(set(seen)) == 24 and set(seen) == set(from_folder)  # each readable image once, the same pixels


def test_shard_size_is_a_bound_for_non_ascii_and_long_names(tmp_path):
    # tarfile writes a PAX header for a non-ASCII or long name: counted, so a shard stays within the size.
    from byol_pytorch.data.shard_writer import make_shards

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        name = f"фото_{i:03d}.png" if i % 2 else f"{'long_name_' * 12}{i:03d}.png"
        Image.new("RGB", (16, 16), (i * 6, 0, 0)).save(folder / name)
    made = make_shards(folder, tmp_path / "shards", 20 * 1024)
    sizes = [path.stat().st_size for path in made.shards]
    assert len(sizes) > 1 and max(sizes) <= 20 * 1024, sizes
    assert sum(made.counts) == 40


@pytest.mark.parametrize("size, lone", [("5000", True), ("10KB", True), ("40KB", False)])
def test_a_size_that_gives_each_image_a_shard_is_told(tmp_path, size, lone, capsys):
    """Before: --shard-size 5000 (tar rounds every file up to 10240 bytes) wrote one shard per image without a word."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(folder), "--out", str(out), "--shard-size", size]) == 0
    err = capsys.readouterr().err
    counts = [sum(1 for m in tarfile.open(shard) if m.name.endswith(".png")) for shard in sorted(out.glob("*.tar"))]
    assert (counts == [1] * 6) is lone, counts
    told = f"each of the 6 shards holds a single image: --shard-size {size} is smaller than two of these images"
    assert (told in err) is lone, err


def test_make_with_labels_writes_each_class_index(tmp_path, make_labelled, capsys):
    """Before: shards made from a labelled folder had no labels, and eval on them refused ('have no labels')."""
    from byol_pytorch.data.folder import LabelledImageFolder

    folder = make_labelled(tmp_path / "lab", classes=3, per_class=6)
    Image.new("RGB", (9, 9)).save(folder / "loose.png")  # in no class folder: left out, with a warning
    out = tmp_path / "shards"
    argv = ["shards", "make", "--data", str(folder), "--out", str(out), "--labels", "--shard-size", "20KiB"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "1 images under" in err and err.count("warning:") == 1  # review: the folder's own warning too, before
    shards = sorted(out.glob("*.tar"))
    assert len(shards) > 1 and is_shard_spec(str(out))  # classes.json is allowed beside them
    assert all(shard.stat().st_size <= 20 * 1024 for shard in shards)  # the bound counts the .cls members
    assert max(sum(1 for m in tarfile.open(shard) if m.name.endswith(".cls")) for shard in shards) > 1
    reference = LabelledImageFolder(folder, 8)
    assert json.loads((out / "classes.json").read_text()) == {"classes": reference.classes}
    expected = {sample_key(reference.paths.relative(i)): label for i, label in enumerate(reference.targets)}
    read = {key.split(":", 1)[1]: label for _, label, key, ok in ShardSamples(str(out), 8, labelled=True) if ok}
    assert read == expected  # every image once, with its class index
    flat = ["shards", "make", "--data", str(folder / "class_0"), "--out", str(tmp_path / "x"), "--labels"]
    assert cli.main(flat) == 1
    assert "has no class sub-folders" in capsys.readouterr().err


def test_a_class_named_like_webdatasets_metadata_is_written_and_read_back(tmp_path, make_labelled, capsys):
    """Before: the images of a class folder `__background__` were written and counted (index.json: 15) but every
    reader skipped them as webdataset metadata (`__NAME__/...`): `shards index` counted 10, eval saw 2 classes."""
    folder = make_labelled(tmp_path / "lab", classes=2, per_class=5)
    (folder / "class_0").rename(folder / "__background__")
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(folder), "--out", str(out), "--labels"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["shardlist"][0]["nsamples"] == 10
    read = [(label, key) for _, label, key, ok in ShardSamples(str(out), 8, labelled=True) if ok]
    assert len(read) == 10 and sorted(label for label, _ in read) == [0] * 5 + [1] * 5
    assert sum(key.split(":", 1)[1].startswith("%5F_background__/") for _, key in read) == 5
    assert cli.main(["shards", "index", str(out), "--out", str(tmp_path / "i.json")]) == 0
    assert "1 shards, 10 samples" in capsys.readouterr().out


def test_the_class_names_written_beside_the_shards_are_read_back(tmp_path, make_labelled, tiny_flags, capsys):
    """A probe: classes.json was written and never read: eval named the classes of shards by index and embed wrote
    no class names, where a folder gives both."""
    from byol_pytorch.data import labelled_split

    folder = make_labelled(tmp_path / "lab", classes=2, per_class=5)
    (folder / "class_0").rename(folder / "dog")
    (folder / "class_1").rename(folder / "cat")
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(folder), "--out", str(out), "--labels"]) == 0
    assert ShardSamples(str(out), 8, labelled=True).classes == ["cat", "dog"]
    assert ShardSamples(str(out), 8).classes is None  # unlabelled reading names none
    bank, _ = labelled_split(str(out), 8)
    assert bank.classes == ["cat", "dog"]  # what the kNN monitor names the classes by
    from byol_pytorch.training.validation import KnnMonitor

    monitor = KnnMonitor(str(out), 8, 3, torch.device("cpu"))  # names only: shards do not list their labels
    assert monitor.missing_classes(torch.tensor([0, 0, 0])) == []  # a review: "dog has no readable image"
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(out), "--out", str(run), *tiny_flags, "--max-steps", "1"]) == 0
    embedded = tmp_path / "emb"
    argv = ["embed", "--data", str(out), "--checkpoint", str(run / "last.pt"), "--out", str(embedded), "--labels"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads((embedded / "embed.json").read_text())["classes"] == ["cat", "dog"]


def test_the_samples_are_shuffled_by_the_seed_so_a_shard_mixes_the_classes(tmp_path, make_labelled, capsys):
    """Before: samples went in sorted path order, each class in one run: with a shuffle buffer smaller than a class
    (the default 1000 against ImageNet's 1300 a class), a batch held one or two classes (a probe: 1 to 4 of 10)."""
    folder = make_labelled(tmp_path / "lab", classes=4, per_class=8)

    def order(out, *flags):
        argv = ["shards", "make", "--data", str(folder), "--out", str(tmp_path / out), "--labels", *flags]
        assert cli.main(argv) == 0
        return [label for _, label, _, _ in ShardSamples(str(tmp_path / out), 8, labelled=True)]

    shuffled = order("a")
    assert sorted(shuffled) == sorted(order("sorted", "--no-shuffle")) and order("sorted2", "--no-shuffle") == sorted(
        shuffled
    )  # the paths' order: each class in one run
    assert order("b") == shuffled and order("c", "--seed", "1") != shuffled  # the seed decides the order
    assert all(len(set(shuffled[i : i + 8])) >= 2 for i in range(0, 32, 8))  # every run of 8 mixes classes
    assert "in a shuffled order" in capsys.readouterr().out


def test_the_summary_names_the_brace_pattern_to_pass(tmp_path, messy, capsys):
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "40KB"]) == 0
    last = len(list(out.glob("*.tar"))) - 1
    assert f"--data '{out}/train-{{000000..{last:06d}}}.tar' (or --data {out})" in capsys.readouterr().out


def test_make_refuses_what_would_write_a_wrong_set_before_writing(tmp_path, messy, capsys, monkeypatch):
    """A probe: --data "" packed the current folder; a URL was mangled into "image folder 'http:/...' does not
    exist"; --out equal to --data mixed the shards into the images (then read as a folder of images); an --out
    holding an earlier make's index.json or classes.json kept the stale file beside new shards; shards index
    --out on one of the shards overwrote it with JSON; make_shards(..., "1GB") failed deep inside and left the
    incomplete marker, refusing the next call."""
    from byol_pytorch.data.shard_writer import make_shards
    from byol_pytorch.data.shards import INCOMPLETE_NAME

    monkeypatch.chdir(tmp_path)
    cases = [
        (["--data", "", "--out", "o1"], "--data is empty: name the folder of images to pack"),
        (["--data", "http://127.0.0.1:9/images", "--out", "o2"], "shards make packs a local folder of images"),
        (["--data", str(messy), "--out", str(messy)], f"--out {messy} is --data: write the shards to a folder"),
    ]
    for flags, message in cases:
        assert cli.main(["shards", "make", *flags]) == 1
        assert message in capsys.readouterr().err
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "classes.json").write_text("{}")
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(stale)]) == 1
    assert f"--out {stale} already holds classes.json of shards; choose an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in stale.iterdir()) == ["classes.json"]
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "40KB"]) == 0
    shard = out / "train-000000.tar"
    before = shard.read_bytes()
    for target in (shard, tmp_path / "new.tar"):
        assert cli.main(["shards", "index", str(out), "--out", str(target)]) == 1
        assert "is a tar file (a shard?): name the index a .json file" in capsys.readouterr().err
    assert shard.read_bytes() == before
    with pytest.raises(TypeError, match=r"shard_size must be an int \(bytes: parse_size\('1GB'\)\), got '1GB'"):
        make_shards(messy, tmp_path / "api", "1GB")
    assert not (tmp_path / "api" / INCOMPLETE_NAME).exists()
    with pytest.raises(TypeError, match=r"^seed must be an int, got 1.5$"):
        make_shards(messy, tmp_path / "api", 10**6, seed=1.5)
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(tmp_path / "neg"), "--seed", "-1"]) == 1
    assert "--seed must be 0 or more, got -1" in capsys.readouterr().err  # a review: numpy's error, and the marker
    assert not (tmp_path / "neg" / INCOMPLETE_NAME).exists()
    made = make_shards(messy, tmp_path / "api", parse_size("1GB"), seed=np.int64(3))  # numpy's ints are ints
    assert len(made.shards) == 1  # the next call runs


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_stopped_make_removes_what_it_wrote_and_can_run_again(tmp_path, messy, tiny_flags, monkeypatch, capsys, stop):
    """Before: SIGTERM left the shard being written as a hidden .tmp, and train read the partial set (318 of 600
    images) without a word; then (a probe) the finished shards and the marker stayed, refused by every reader, and
    the rerun into the same --out was refused until they were removed by hand."""
    import os
    import signal

    from byol_pytorch.data import shard_writer

    real, calls = shard_writer._readable, []

    def stopped_at_the_tenth(path):
        calls.append(1)
        if len(calls) == 10:
            if stop == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this thread, here
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(shard_writer, "_readable", stopped_at_the_tenth)
    out = tmp_path / "shards"
    argv = ["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "10KB"]
    if stop == "SIGTERM":
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == 128 + signal.SIGTERM
        assert "stopped by SIGTERM: the shards it had written are removed; run it again" in capsys.readouterr().err
    else:
        assert cli.main(argv) == 130
    assert len(calls) == 10 and out.is_dir() and not list(out.iterdir())  # no shard, .tmp, index or marker
    monkeypatch.setattr(shard_writer, "_readable", real)
    assert cli.main(argv) == 0


def test_the_shards_of_a_killed_make_are_refused_until_made_again(tmp_path, messy, tiny_flags, capsys):
    """A make killed (SIGKILL: no clean-up) leaves its marker: every reader refuses the partial set, and the rerun
    says what to remove, the hidden temporary files included (a probe: they survived the advice)."""
    from byol_pytorch.data.shards import INCOMPLETE_NAME

    out = tmp_path / "shards"
    argv = ["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "10KB"]
    assert cli.main(argv) == 0
    (out / "index.json").unlink()
    (out / INCOMPLETE_NAME).write_text("killed\n")  # as a killed make leaves it: shards, no index, the marker
    (out / ".train-000009.tar.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "killed before it ended wrote (.shards-make-incomplete is there): remove its .tar files, its hidden" in err
    assert "hidden .tar.tmp files" in err
    run = ["train", "--data", str(out), "--out", str(tmp_path / "run"), *tiny_flags, "--max-steps", "1"]
    assert cli.main(run) == 1
    assert "holds the shards of a `byol-pytorch shards make` that was stopped" in capsys.readouterr().err
    for shard in out.glob("*.tar"):  # a make stopped before its first shard: the marker alone (a second review)
        shard.unlink()
    assert cli.main(["shards", "index", str(out), "--out", str(tmp_path / "i.json")]) == 1
    assert "stopped before it ended" in capsys.readouterr().err
    shutil.rmtree(out)
    assert cli.main(argv) == 0 and not (out / INCOMPLETE_NAME).exists()  # a whole set: no marker


@pytest.mark.parametrize("prefix", ["", "a/b", "..", ".hidden"])
def test_a_prefix_that_is_no_file_name_part_is_one_line_and_writes_nothing(tmp_path, messy, capsys, prefix):
    """Before: '' wrote OUT-000000.tar beside --out, 'a/b' failed on a temp path."""
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(out), "--prefix", prefix]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"byol-pytorch: error: --prefix {prefix!r}: give the start of the shards' file names")
    assert not out.exists() and not list(tmp_path.rglob("*.tar"))


def test_a_full_disk_at_the_index_names_it_and_leaves_no_temporary(tmp_path, messy, monkeypatch, capsys):
    """Before: 'no space left on the device holding 'a file'' and a .idx.json.tmp left behind."""
    import errno
    import pathlib

    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "40KB"]) == 0
    real = pathlib.Path.write_text

    def full(self, text, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    assert cli.main(["shards", "index", str(out), "--out", str(tmp_path / "idx.json")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("byol-pytorch: error: no space left on the device holding ") and "idx.json" in line
    assert not list(tmp_path.glob(".*")) and not (tmp_path / "idx.json").exists()


def test_a_full_disk_while_packing_names_the_shard_and_leaves_no_temporary(tmp_path, messy, monkeypatch, capsys):
    """Before: 'no space left on the device holding 'a file'' and the shard's .tmp left taking the space."""
    import errno

    real, calls = tarfile.TarFile.addfile, []

    def full_on_the_fifth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", full_on_the_fifth)
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "4KB"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("byol-pytorch: error: no space left on the device holding ") and "a file" not in line
    assert f"{out}/train-0000" in line and ".tar'" in line
    assert not list(out.glob(".*.tmp"))  # the shard being written is gone
    assert not list(out.iterdir())  # and the finished ones and the marker: the make can run again (a probe)
    monkeypatch.setattr(tarfile.TarFile, "addfile", real)
    assert cli.main(["shards", "make", "--data", str(messy), "--out", str(out), "--shard-size", "4KB"]) == 0


def test_labelled_shards_count_the_images_left_out_beside_the_classes(tmp_path):
    """A data-API probe: the images left out were counted as the whole tree's images minus the labelled ones, so one
    folder linked as two classes (read once by the tree's scan, once per class) gave -3 and hid 3 loose images."""
    from byol_pytorch.data.shard_writer import make_shards

    (tmp_path / "store" / "cats").mkdir(parents=True)
    (tmp_path / "root" / "dog").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "store" / "cats" / f"{i}.png")
        Image.new("RGB", (8, 8), (0, 40 * i, 0)).save(tmp_path / "root" / f"loose{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "root" / "dog" / "d.png")
    for name in ("cat", "kitten"):
        (tmp_path / "root" / name).symlink_to(tmp_path / "store" / "cats")
    with pytest.warns(UserWarning, match=r"hold the same images through links \('cat' and 'kitten'\): those images"):
        made = make_shards(tmp_path / "root", tmp_path / "shards", 10**9, labels=True)
    assert made.unlabelled == 3 and sum(made.counts) == 7  # 3 cats twice (two classes) and a dog


def test_labelled_shards_inside_their_data_folder_are_refused(tmp_path):
    """A probe: shards make --labels --out DATA/shards succeeded, then every labelled use of DATA failed on a class
    'shards' holding .tar files."""
    from byol_pytorch.data.shard_writer import make_shards

    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name / "0.png")
    with pytest.raises(ValueError, match=r"--out .*shards is inside --data .*data: with --labels, its folder would"):
        make_shards(tmp_path / "data", tmp_path / "data" / "shards", 10**9, labels=True)
    assert not (tmp_path / "data" / "shards").exists()  # nothing written
    assert sum(make_shards(tmp_path / "data", tmp_path / "data" / "shards", 10**9).counts) == 2  # unlabelled: allowed


def test_labelled_shards_of_a_folder_split_into_train_and_val_are_refused(tmp_path, capsys):
    """A probe: shards make --labels of ROOT/{train,val}/CLASS wrote classes.json ["train", "val"], every label a
    split, where embed --labels refuses that folder; unlabelled shards of it, and of each split, are made."""
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / name / "0.png")
    out = tmp_path / "shards"
    assert cli.main(["shards", "make", "--data", str(tmp_path / "data"), "--out", str(out), "--labels"]) == 1
    data = tmp_path / "data"
    assert capsys.readouterr().err.strip() == (
        f"byol-pytorch: error: --data {data} is split into train/ and val/, so --labels would label the images by "
        f"split: make the shards of each split on its own, --data {data / 'train'} --labels and --data "
        f"{data / 'val'} --labels, each with its own --out"
    )
    assert not out.exists()
    assert cli.main(["shards", "make", "--data", str(data / "train"), "--out", str(out), "--labels"]) == 0
    assert json.loads((out / "classes.json").read_text())["classes"] == ["cat", "dog"]
    assert cli.main(["shards", "make", "--data", str(data), "--out", str(tmp_path / "all")]) == 0  # no labels: taken

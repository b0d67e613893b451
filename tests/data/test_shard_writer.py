"""`byol-pytorch shards make` / `shards index`: every readable image in exactly one shard, broken files counted."""

import json
import shutil
import tarfile
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_stopped_make_leaves_no_temporary_and_its_shards_are_refused_until_made_again(
    tmp_path, messy, tiny_flags, monkeypatch, capsys, stop
):
    """Before: SIGTERM left the shard being written as a hidden .tmp, and train read the partial set (318 of 600
    images) without a word; the rerun said only "already holds .tar files"."""
    import os
    import signal

    from byol_pytorch.data import shard_writer
    from byol_pytorch.data.shards import INCOMPLETE_NAME

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
        assert "stopped by SIGTERM: the shards written so far hold part" in capsys.readouterr().err
    else:
        assert cli.main(argv) == 130
    assert (out / INCOMPLETE_NAME).exists() and list(out.glob("*.tar")) and not list(out.glob("*.tmp"))
    monkeypatch.setattr(shard_writer, "_readable", real)
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "stopped before it ended wrote (.shards-make-incomplete is there): remove its .tar files and" in err
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
    assert not list(out.glob(".*.tmp"))  # the shard being written is gone; the finished ones stay
    assert all(tarfile.open(path).getnames() for path in out.glob("*.tar"))

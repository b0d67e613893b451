"""Tar shards: the spec rule, the split between ranks and workers, broken samples, exact resume, the extra."""

import sys
import tarfile

import numpy as np
import pytest
import torch

from byol_pytorch.data import shards as shards_module
from byol_pytorch.data.folder import load_size_for
from byol_pytorch.data.loader import make_loader
from byol_pytorch.data.shards import ShardDataset, expand_shards, is_shard_spec, make_shard_loader, shard_samples

pytest.importorskip("webdataset")


def ids_of(loader):
    """The sample ids (red channel) of every image a loader yields, and the skipped total."""
    ids, skipped = [], 0
    for images, count in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 9, 9)
        ids += images[:, 0, 0, 0].tolist()
        skipped += count
    return ids, skipped


def test_spec_rule(tmp_path, make_shards, messy):
    pattern = make_shards(tmp_path / "shards", broken=False)
    assert is_shard_spec(pattern) and is_shard_spec("x/{a,b}.tar") and is_shard_spec("one.tar")
    assert is_shard_spec(str(tmp_path / "shards"))  # a folder holding only .tar files
    assert not is_shard_spec(str(messy)) and not is_shard_spec("cifar10:data") and not is_shard_spec(None)
    (tmp_path / "shards" / "notes.txt").write_text("x")
    assert not is_shard_spec(str(tmp_path / "shards"))  # anything else there: an image folder
    (tmp_path / "photos.tar").mkdir()
    assert not is_shard_spec(str(tmp_path / "photos.tar"))  # a folder named like a tar is a folder
    assert [p.name for p in expand_shards(pattern)] == [f"train-{k:04d}.tar" for k in range(4)]
    assert [shard_samples(p) for p in expand_shards(pattern)] == [6, 6, 6, 6]  # from the headers
    with pytest.raises(ValueError, match=r"2 of the 6 shards .* are missing"):
        expand_shards(pattern.replace("0003", "0005"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match="not an uncompressed tar file"):
        shard_samples(tmp_path / "bad.tar")


@pytest.mark.parametrize(
    "where", ["inside a header", "at a header", "inside a member's data", "garbage header", "after a pax header"]
)
def test_a_shard_cut_short_or_damaged_is_named_not_read_as_shorter(where, tmp_path, make_shards):
    """Probe: a shard cut at byte 15000 (inside a header) was read as a whole tar of fewer samples: embed and eval
    ran on 293 of 300 images without a word. Python's tarfile takes a header cut short, a missing one or one of
    garbage for the archive's end; a whole tar ends in a block of zeros."""
    import tarfile

    pattern = make_shards(tmp_path / "shards", broken=False)
    shard = tmp_path / "shards" / "train-0001.tar"
    data = shard.read_bytes()
    third = tarfile.open(shard).getmembers()[2]  # a header after two whole members
    cut = {
        "inside a header": data[: third.offset + 100],
        "at a header": data[: third.offset],
        "inside a member's data": data[: third.offset_data + third.size // 2],
        "garbage header": data[: third.offset] + b"x" * 512 + data[third.offset + 512 :],
        # webdataset's TarWriter gives each member a pax header (a float mtime): a cut on a block just after one
        # (review: named 'damaged' before)
        "after a pax header": data[: third.offset - 512],
    }[where]
    shard.write_bytes(cut)
    with pytest.raises(ValueError) as error:
        [shard_samples(p) for p in expand_shards(pattern)]
    message = str(error.value)
    assert message.startswith(f"{str(shard)!r} is ") and message.endswith("copy or write the shard again"), message
    expected = "is damaged at byte" if where == "garbage header" else "is cut short: it stops at byte"
    assert expected in message, message


def test_a_path_with_braces_that_exists_is_taken_as_written(tmp_path, make_shards, messy):
    """Before: a folder named 'my {a,b} photos' was expanded as a shard pattern and reported missing."""
    import shutil

    photos = tmp_path / "my {a,b} photos"
    shutil.copytree(messy, photos)
    assert not is_shard_spec(str(photos))  # an image folder, braces and all
    tars = tmp_path / "set {1,2}"
    make_shards(tmp_path / "shards", broken=False)
    shutil.copytree(tmp_path / "shards", tars)
    assert is_shard_spec(str(tars)) and len(expand_shards(str(tars))) == 4  # a folder of .tar files
    single = tars / "train-{0..1}.tar"
    (tars / "train-0000.tar").rename(single)
    assert expand_shards(str(single)) == [single]  # one shard whose name has braces
    assert is_shard_spec(str(tmp_path / "x-{0..1}.tar"))  # a pattern: nothing exists under that name


def test_two_ranks_two_workers_read_each_shard_once(tmp_path, make_shards):
    pattern = make_shards(tmp_path / "shards", shards=8, per_shard=3, broken=False)
    for epoch in (0, 1):
        seen, per_reader = [], []
        for rank in (0, 1):
            data = ShardDataset(pattern, 9, batch_size=3, rank=rank, world_size=2, workers=2, shuffle_buffer=2)
            data.set_epoch(epoch)
            per_reader += [data.reader_shards(epoch, rank * 2 + w) for w in (0, 1)]
            seen += ids_of(make_shard_loader(data))[0]  # two worker processes
        assert sorted(seen) == list(range(1, 25))  # every sample once: no shard read twice, none missed
        assert sorted(s for shards in per_reader for s in shards) == list(range(8))
        if epoch == 0:
            first = per_reader
    assert per_reader != first  # the shard order is reshuffled every epoch


def test_broken_samples_are_replaced_by_the_next_and_counted(tmp_path, make_shards):
    data = ShardDataset(make_shards(tmp_path / "shards"), 9, batch_size=4, shuffle_buffer=0)
    data.set_epoch(0)
    assert data.batches_per_epoch == 6 and len(data) == 24
    ids, skipped = ids_of(make_shard_loader(data))
    assert skipped == 2  # the garbage bytes and the sample without an image
    assert len(ids) == 24 and set(ids) == set(range(1, 25)) - {8, 15}
    order = [s for shard in data.reader_shards(0, 0) for s in range(shard * 6 + 1, shard * 6 + 7)]  # tar order
    expected = [{8: 9, 15: 16}.get(i, i) for i in order]  # a broken sample -> the next one, also used at its place
    assert ids == expected


def test_resume_continues_exactly_without_opening_finished_shards(tmp_path, make_shards, monkeypatch):
    pattern = make_shards(tmp_path / "shards")
    data = ShardDataset(pattern, 9, batch_size=2, workers=0, shuffle_buffer=4)
    data.set_epoch(1)
    full, _ = ids_of(make_shard_loader(data))
    assert data.batches_per_epoch == 12 and len(full) == 24
    opened = []
    original = shards_module._samples
    monkeypatch.setattr(shards_module, "_samples", lambda path: opened.append(path.name) or original(path))
    data.set_epoch(1, start_batch=7)  # 14 samples used: two shards done, the third at its 3rd sample
    rest, _ = ids_of(make_shard_loader(data))
    assert rest == full[14:]
    order = data.reader_shards(1, 0)
    assert opened == [f"train-{k:04d}.tar" for k in order[2:]]  # the finished shards were not read again


def test_resume_with_workers_matches_the_round_robin(tmp_path, make_shards):
    data = ShardDataset(make_shards(tmp_path / "shards"), 9, batch_size=2, workers=2, shuffle_buffer=3)
    data.set_epoch(0)
    full, _ = ids_of(make_shard_loader(data))
    data.set_epoch(0, start_batch=5)  # worker 1's reader is next: the resumed loader's worker 0 takes it
    assert ids_of(make_shard_loader(data))[0] == full[10:]


def test_sizes_checked(tmp_path, make_shards):
    pattern = make_shards(tmp_path / "shards", shards=2, broken=False)
    with pytest.raises(ValueError, match=r"2 shards cannot be split between 2 process\(es\) x 2 loader worker"):
        ShardDataset(pattern, 9, batch_size=2, world_size=2, workers=2)
    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        ShardDataset(pattern, 9, batch_size=8, workers=2)
    data = ShardDataset(pattern, load_size_for(32), batch_size=2)
    assert next(iter(make_shard_loader(data)))[0].shape == (2, 3, 37, 37)


def test_missing_webdataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setitem(sys.modules, "webdataset.tariterators", None)
    with tarfile.open(tmp_path / "a.tar", "w"):
        pass
    with pytest.raises(ImportError, match=r'pip install "byol-pytorch\[shards\]"'):
        ShardDataset(str(tmp_path / "a.tar"), 9, batch_size=2)


def test_a_shard_shrunk_during_the_run_is_a_clear_error(tmp_path, make_shards):
    data = ShardDataset(make_shards(tmp_path / "shards", broken=False), 9, batch_size=4, shuffle_buffer=0)
    for k in range(4):
        with tarfile.open(tmp_path / "shards" / f"train-{k:04d}.tar", "w"):
            pass  # emptied after the samples were counted
    with pytest.raises(shards_module.NoReadableImagesError, match="fewer samples than counted at the start"):
        next(iter(make_shard_loader(data)))


def test_a_shard_that_cannot_be_read_is_a_value_error(tmp_path):
    folder = tmp_path / "shard.tar"
    folder.mkdir()  # opening it raises IsADirectoryError, an OSError
    with pytest.raises(ValueError, match="cannot read the shard"):
        shard_samples(folder)


def test_files_named_with_dots_that_merge_into_one_sample_are_named_once(tmp_path, make_shards, recwarn):
    """Before: a tar of photo.2023.0001.png, ... read as one sample of one image, with no word of why."""
    import numpy as np
    from conftest import sample_png

    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "dotted.tar", "w") as tar:
        for i in range(6):
            path = tmp_path / f"photo.2023.{i:04d}.png"
            path.write_bytes(sample_png(i + 1, rng))
            tar.add(path, arcname=path.name)
    clean = make_shards(tmp_path / "clean", shards=2, broken=False)
    ShardDataset(clean, 9, batch_size=2)
    with tarfile.open(tmp_path / "masks.tar", "w") as tar:  # an image and its mask per sample (a review's case)
        for i in range(4):
            for name in (f"{i:03d}.jpg", f"{i:03d}.seg.png"):
                (tmp_path / name).write_bytes(sample_png(i + 1, rng))
                tar.add(tmp_path / name, arcname=name)
    assert ShardDataset([tmp_path / "masks.tar"], 9, batch_size=2).counts == [4]
    assert not [w for w in recwarn if "image files" in str(w.message)]  # one sample's own images: nothing to say
    with pytest.warns(UserWarning) as caught:
        dataset = ShardDataset([tmp_path / "dotted.tar", tmp_path / "dotted.tar"], 9, batch_size=1)
    assert dataset.counts == [1, 1]
    lines = [str(w.message) for w in caught if "image files" in str(w.message)]
    assert len(lines) == 1, lines  # once, not once per shard
    assert "sample 'photo' holds 6 image files (photo.2023.0000.png, photo.2023.0001.png, " in lines[0]
    assert "ends at the first dot of a file's name" in lines[0] and "byol-pytorch shards make" in lines[0]


@pytest.mark.parametrize("world, workers", [(1, 1), (1, 2), (1, 3), (2, 1)])
def test_epoch_batches_match_the_readers_and_the_worker_choice_reads_most(tmp_path, make_shards, world, workers):
    """DDP probe: 3 shards [14, 14, 12] read by 2 workers gave 24 of 40 samples an epoch, silently; the default
    worker count now reads at least 90% of what the best count would."""
    from byol_pytorch.data.shards import epoch_batches, shard_workers

    counts = [14, 14, 12]
    pattern = make_shards(tmp_path / "shards", per_shard=counts, broken=False)
    per_rank = []
    for rank in range(world):
        data = ShardDataset(pattern, 9, batch_size=4, rank=rank, world_size=world, workers=workers, shuffle_buffer=0)
        data.set_epoch(0)
        batches = [images for images, _ in make_shard_loader(data)]
        per_rank.append(len(batches))
        assert data.epoch_samples() == data.batches_per_epoch * 4 * world
    assert per_rank == [epoch_batches(counts, world, workers, 4)] * world  # the rule, against the loader's count
    assert [epoch_batches(counts, 1, w, 4) for w in (1, 2, 3)] == [10, 6, 9]
    assert shard_workers(counts, 1, 3, 4) == 3 and shard_workers(counts, 1, 2, 4) == 1  # 9 >= 0.9 x 10; 6 < 9
    assert data.with_workers(1).batches_per_epoch == epoch_batches(counts, world, 1, 4)


def test_fewer_shards_than_processes_names_the_fix_that_applies(tmp_path, make_shards):
    """DDP probe: one shard for two processes said 'lower --workers to 1' where it was 1 already."""
    pattern = make_shards(tmp_path / "shards", shards=1, broken=False)
    with pytest.raises(ValueError, match=r"1 shards cannot be split .*split the data into more shards or start fewer"):
        ShardDataset(pattern, 9, batch_size=2, world_size=2, workers=1)


@pytest.mark.parametrize(
    "given, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int, got float"),
        ({"world_size": 2, "rank": 5}, ValueError, "rank 5 is out of range for world_size 2: ranks are 0 to 1"),
        ({"rank": -1}, ValueError, "rank must be at least 0"),
        ({"workers": -1}, ValueError, "workers must be at least 0"),
        ({"multiple_of": 0}, ValueError, "multiple_of must be at least 1"),
    ],
)
def test_shard_reading_arguments_out_of_range_are_named(tmp_path, make_shards, given, error, match):
    """A data-API probe: batch_size=0 was a ZeroDivisionError; rank 5 of 2 said the shards changed during the run."""
    pattern = make_shards(tmp_path / "shards", shards=2, per_shard=4, broken=False)
    with pytest.raises(error, match=match):
        ShardDataset(pattern, 8, **{"batch_size": 2, **given})
    with pytest.raises(ValueError, match="workers must be at least 0, got -1"):
        ShardDataset(pattern, 8, batch_size=2).with_workers(-1)


def test_sample_images_of_the_training_reader_gives_images_not_batches(tmp_path, make_shards):
    """A data-API probe: the training reader's (batch, skipped) items were stacked whole, a 5-D tensor
    counted in batches, which recalibrate_batchnorm then failed on with a bare conv2d error."""
    from byol_pytorch.data.shards import ShardSamples
    from byol_pytorch.data.sources import sample_images

    pattern = make_shards(tmp_path / "shards", shards=2, per_shard=4, broken=False)
    batched = sample_images(ShardDataset(pattern, 8, batch_size=3, seed=0), 5)
    assert batched.shape == (5, 3, 8, 8) and batched.dtype == torch.uint8
    # a reader built for loader workers (train's, BYOLTrainer's) is read here all the same (a review)
    assert sample_images(ShardDataset(pattern, 8, batch_size=1, workers=2, seed=0), 5).shape == (5, 3, 8, 8)
    every = {bytes(image.numpy()) for image, *_ in ShardSamples(pattern, 8)}  # each image is one of the data's
    assert {bytes(image.numpy()) for image in batched} <= every


def test_shards_without_an_image_member_name_the_data_for_the_clean_statistics(tmp_path):
    """A remote probe: shards of .txt/.json members only said "--bn-stats clean: no readable image to estimate
    BatchNorm statistics from", naming neither the data nor what is wrong with it."""
    import io

    from byol_pytorch.data.shards import ShardSamples
    from byol_pytorch.data.sources import sample_images

    shard = tmp_path / "t-0000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            data = b'{"caption": "no image"}'
            info = tarfile.TarInfo(f"s{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"no readable image in 3 samples to estimate BatchNorm .*no "):
        sample_images(ShardSamples(str(shard), 8), 512)
    broken = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 0, "a", False)] * 5
    with pytest.raises(ValueError, match=r"no readable image in 5 samples .*check the data"):
        sample_images(broken, 512)


def test_make_loader_of_a_shard_dataset_with_a_batch_size_names_batch_size_none(tmp_path, make_shards):
    data = ShardDataset(make_shards(tmp_path / "shards"), 9, batch_size=4, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"ShardDataset yields whole batches itself: pass batch_size=None"):
        make_loader(data, batch_size=2)
    first = next(iter(make_loader(data, None)))
    assert first[0].shape == (4, 3, 9, 9)  # a batch of images, as make_shard_loader gives it


def test_seed_shuffle_buffer_and_epoch_are_whole_numbers(tmp_path, make_shards):
    pattern = make_shards(tmp_path / "shards")
    with pytest.raises(TypeError, match="seed must be a whole number, got 1.5"):
        ShardDataset(pattern, 9, batch_size=2, seed=1.5)  # was seed 1
    with pytest.raises(ValueError, match=r"shuffle_buffer must be at least 0 \(below 2: tar order\), got -1"):
        ShardDataset(pattern, 9, batch_size=2, shuffle_buffer=-1)
    with pytest.raises(TypeError, match="shuffle_buffer must be a whole number, got 1.5"):
        ShardDataset(pattern, 9, batch_size=2, shuffle_buffer=1.5)
    data = ShardDataset(pattern, 9, batch_size=2, seed=np.int64(3))
    with pytest.raises(TypeError, match="epoch must be a whole number, got 1.7"):
        data.set_epoch(1.7)  # was epoch 1
    data.set_epoch(np.int64(2), 1)
    assert (data.epoch, data.start_batch, data.seed) == (2, 1, 3)

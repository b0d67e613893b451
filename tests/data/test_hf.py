"""Local Hugging Face datasets: save_to_disk, imagefolder, parquet; the image column; broken rows; no Hub."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from byol_pytorch.data.folder import load_image
from byol_pytorch.data.hf import HFImageDataset, image_column, is_hf_spec, load_local_dataset, parse_hf_spec

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """load_dataset's arrow cache under the test's folder, not the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_saved_dataset_decodes_like_a_file_and_replaces_broken_rows(tmp_path, make_hf_saved):
    root = make_hf_saved(tmp_path / "saved")
    data = HFImageDataset(str(root), 9)
    assert len(data) == 24 and data.column == "image"
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    row = datasets.load_from_disk(str(root)).cast_column("image", datasets.Image(decode=False))[3]["image"]
    (tmp_path / "row3.png").write_bytes(row["bytes"])
    image, skipped = data[3]
    assert skipped == 0 and torch.equal(image, load_image(tmp_path / "row3.png", 9))  # the folder path's pixels
    image, skipped = data[5]  # garbage bytes: row 6 instead, counted
    assert skipped == 1 and torch.equal(image, data[6][0]) and int(image[0, 0, 0]) == 7
    assert data[5][1] == 1  # known broken: still counted
    gray, _ = HFImageDataset(str(root), 9, channels=1)[0]
    assert gray.shape == (1, 9, 9)


def test_splits_of_a_dataset_dict(tmp_path, make_hf_saved):
    train = datasets.load_from_disk(str(make_hf_saved(tmp_path / "a", rows=6, broken=None)))
    test = datasets.load_from_disk(str(make_hf_saved(tmp_path / "b", rows=4, broken=None)))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))
    assert len(HFImageDataset(str(tmp_path / "dict"), 9)) == 6  # train by default
    assert len(HFImageDataset(str(tmp_path / "dict"), 9, split="test")) == 4
    with pytest.raises(ValueError, match="has no split 'val'; its splits: train, test"):
        load_local_dataset(tmp_path / "dict", "val")
    with pytest.raises(ValueError, match="single dataset without splits"):
        load_local_dataset(tmp_path / "a", "test")


def test_imagefolder_and_parquet(tmp_path, make_hf_saved):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "5.png").write_bytes(b"garbage")
    data = HFImageDataset(str(folder), 9)
    assert len(data) == 6
    assert sum(data[i][1] for i in range(6)) == 1  # the garbage file, counted once

    saved = datasets.load_from_disk(str(make_hf_saved(tmp_path / "saved", rows=8, broken=2)))
    saved.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    one = HFImageDataset(str(tmp_path / "pq" / "part-0.parquet"), 9)
    every = HFImageDataset(str(tmp_path / "pq"), 9)  # a folder of parquet files
    assert len(one) == len(every) == 8 and one[2][1] == 1
    assert torch.equal(one[4][0], HFImageDataset(saved, 9)[4][0])  # a Dataset object works too


def test_image_column_auto_choice_and_errors(tmp_path, make_hf_saved):
    two = datasets.load_from_disk(str(make_hf_saved(tmp_path / "two", rows=4, broken=None, extra_image=True)))
    with pytest.raises(ValueError, match=r"several image columns: image, mask; choose one \(--image-column NAME\)"):
        image_column(two)
    assert image_column(two, "mask") == "mask" and HFImageDataset(two, 9, column="mask").column == "mask"
    with pytest.raises(ValueError, match="column 'label' is not an image column .*image columns: image, mask"):
        image_column(two, "label")
    with pytest.raises(ValueError, match="no column 'pixels'; the columns: image, label, mask"):
        image_column(two, "pixels")
    with pytest.raises(ValueError, match=r"no image column \(a datasets.Image feature, .*\) among the columns: label"):
        image_column(two.remove_columns(["image", "mask"]))


def test_a_parquet_file_without_the_dataset_metadata_reads_its_encoded_images(tmp_path):
    """Before: a {bytes, path} struct column named 'image' (pyarrow, pandas) was 'no image column', and a
    column of raw bytes or file paths was 'not an image column' even when named."""
    import io

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    encoded, files = [], []
    for i in range(4):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (60 * i, 10, 200)).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
        (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())
        files.append(str(tmp_path / f"{i}.png"))
    table = pa.table({"image": [{"bytes": b, "path": None} for b in encoded], "label": [0, 1, 0, 1]})
    pq.write_table(table, tmp_path / "structs.parquet")
    pq.write_table(pa.table({"raw": encoded, "file": files}), tmp_path / "columns.parquet")
    expected = [load_image(path, 9) for path in files]
    structs = HFImageDataset(str(tmp_path / "structs.parquet"), 9)
    assert structs.column == "image" and all(torch.equal(structs[i][0], expected[i]) for i in range(4))
    raw = HFImageDataset(str(tmp_path / "columns.parquet"), 9)  # the one bytes column; paths only when named
    assert raw.column == "raw" and all(torch.equal(raw[i][0], expected[i]) for i in range(4))
    named = HFImageDataset(str(tmp_path / "columns.parquet"), 9, column="file")
    assert all(torch.equal(named[i][0], expected[i]) for i in range(4))


def test_only_local_paths(tmp_path):
    assert parse_hf_spec("hf:user/cats") == "user/cats" and is_hf_spec("hf:x") and not is_hf_spec("x")
    with pytest.raises(ValueError, match="only local paths are supported.*nothing is downloaded"):
        HFImageDataset("user/cats-that-do-not-exist", 9)
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(ValueError, match="is a file but not a .parquet file"):
        HFImageDataset(str(tmp_path / "x.csv"), 9)


def test_missing_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r'pip install "byol-pytorch\[datasets\]"'):
        HFImageDataset("anything", 9)


def test_a_dataset_without_rows_is_a_value_error():
    empty = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ValueError, match="has no rows"):
        HFImageDataset(empty, 32, 3)


@pytest.mark.parametrize("form", ["pandas", "arrow", "torch", "numpy", "columns"])
def test_a_dataset_in_any_output_format_reads_as_the_unformatted_one(form):
    """Before: a Dataset set to pandas failed at construction ("truth value of a Series is ambiguous") and one
    set to arrow at the first item ("'ChunkedArray' object has no attribute 'get'"); one whose format shows
    only some columns (``set_format(None, columns=["label"])``) was "no image column"."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(3)]
    plain = datasets.Dataset.from_dict(
        {"image": pictures, "label": [0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    formatted = plain.with_format(None, columns=["label"]) if form == "columns" else plain.with_format(form)
    for labelled in (False, True):
        got, want = HFImageDataset(formatted, 8, labelled=labelled), HFImageDataset(plain, 8, labelled=labelled)
        assert got.targets == want.targets and got.classes == want.classes
        for i in range(3):
            torch.testing.assert_close(got[i][0], want[i][0], rtol=0, atol=0)
    kept = (formatted.format["type"], formatted.format["columns"])  # the user's dataset is left as it was
    assert kept == ((None, ["label"]) if form == "columns" else (form, ["image", "label"]))


def test_rows_without_labels_and_an_unlabelled_test_split(tmp_path, make_hf_saved):
    from byol_pytorch.data.hf import UnlabelledRowsError
    from byol_pytorch.data.sources import labelled_split

    train = datasets.load_from_disk(str(make_hf_saved(tmp_path / "a", rows=15, broken=None)))  # 5 per class
    unlabelled = train.map(lambda row: {"label": -1})  # a benchmark's test split: labels hidden as -1
    partly = train.map(lambda row, i: {"label": None if i == 2 else row["label"]}, with_indices=True)
    datasets.DatasetDict({"train": train, "test": unlabelled}).save_to_disk(str(tmp_path / "hidden"))
    datasets.DatasetDict({"train": train, "test": partly}).save_to_disk(str(tmp_path / "partly"))
    with pytest.raises(UnlabelledRowsError, match="'test': none of its 15 rows has a label in 'label'"):
        HFImageDataset(str(tmp_path / "hidden"), 9, split="test", labelled=True)
    # The kNN split holds out a fifth of train when the test split has no labels at all ...
    bank, queries = labelled_split(f"hf:{tmp_path / 'hidden'}", 9)
    assert len(bank) + len(queries) == 15 and len(queries) > 0
    assert sorted(bank.indices + queries.indices) == list(range(15))  # both from train
    # ... and names the rows when only some lack one.
    with pytest.raises(UnlabelledRowsError, match="'test': 1 of its 15 rows have no label in 'label'"):
        labelled_split(f"hf:{tmp_path / 'partly'}", 9)


def test_an_empty_path_is_an_error_and_a_home_path_is_expanded(tmp_path, make_hf_saved, monkeypatch):
    with pytest.raises(ValueError, match=r"hf: needs a path after the colon \(hf:PATH\)"):
        load_local_dataset("")
    make_hf_saved(tmp_path / "home" / "pets", rows=6, broken=None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert len(HFImageDataset("~/pets", 9)) == 6


def test_splits_encoded_apart_are_numbered_by_the_training_split_class_names(tmp_path):
    """class_encode_column on each split alone numbers the classes each split has: the test split without
    'ant' shifted every label by one, and the kNN scored 0.05 instead of 0.50 (silently)."""
    from byol_pytorch.data.sources import labelled_split

    def split(names):
        images = [Image.new("RGB", (9, 9), (40 * i, 10, 10)) for i in range(len(names))]
        return datasets.Dataset.from_dict({"image": images, "label": names}).cast_column("image", datasets.Image())

    train = split(["ant", "bee", "cat"] * 5).class_encode_column("label")
    test = split(["bee", "cat", "cat"]).class_encode_column("label")  # its own numbering: bee 0, cat 1
    assert test.features["label"].names == ["bee", "cat"]
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "apart"))
    bank, queries = labelled_split(f"hf:{tmp_path / 'apart'}", 9)
    assert [queries[i][1] for i in range(3)] == [1, 2, 2]  # bee and cat by train's numbering (ant 0)
    assert queries.classes == bank.classes == ["ant", "bee", "cat"]
    other = split(["bee", "dog"]).class_encode_column("label")
    datasets.DatasetDict({"train": train, "test": other}).save_to_disk(str(tmp_path / "unknown"))
    with pytest.raises(ValueError, match="split 'test' has classes the training split has not: dog"):
        labelled_split(f"hf:{tmp_path / 'unknown'}", 9)


def test_a_lone_split_names_its_rows_and_unnamed_classes_keep_their_numbers(tmp_path):
    """Review: a lone 'validation' split's ids read 'train:N'; a held-out ClassLabel(num_classes=2) (names '0',
    '1') against train's names was refused; --hf-split '' was a traceback; a text column was taken for paths."""
    from byol_pytorch.data.sources import labelled_split

    images = [Image.new("RGB", (9, 9), (25 * i, 10, 10)) for i in range(10)]
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(10)]}).cast_column(
        "image", datasets.Image()
    )
    datasets.DatasetDict({"validation": data}).save_to_disk(str(tmp_path / "lone"))
    lone = HFImageDataset(str(tmp_path / "lone"), 9)
    assert lone.split == "validation" and lone.sample_id(3) == "validation:3"
    named = data.cast_column("label", datasets.ClassLabel(names=["cat", "dog"]))
    unnamed = data.cast_column("label", datasets.ClassLabel(num_classes=2))
    datasets.DatasetDict({"train": named, "test": unnamed}).save_to_disk(str(tmp_path / "unnamed"))
    _, queries = labelled_split(f"hf:{tmp_path / 'unnamed'}", 9)
    assert [queries[i][1] for i in range(10)] == [i % 2 for i in range(10)]  # the integers stand
    bank, queries = labelled_split(f"hf:{tmp_path / 'unnamed'}", 9, split="")  # no split named
    assert len(queries) == 10
    texts = data.add_column("caption", ["a picture"] * 10)
    with pytest.raises(ValueError, match="column 'caption' is not an image column"):
        image_column(texts, "caption")


def test_an_empty_split_is_left_out_and_an_empty_dataset_is_one_error(tmp_path):
    """Before: datasets' load_from_disk failed on the empty split it had saved, a traceback in every command."""
    import io

    from byol_pytorch.data import labelled_split, open_unlabelled

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buffer, "PNG")
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": buffer.getvalue(), "path": None}] * 10, "label": [0, 1] * 5},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    datasets.DatasetDict({"train": rows, "extra": rows.select([])}).save_to_disk(str(tmp_path / "dd"))
    assert len(open_unlabelled(f"hf:{tmp_path / 'dd'}", 16, 3)) == 10
    rows.select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="holds no rows"):
        open_unlabelled(f"hf:{tmp_path / 'empty'}", 16, 3)

    held = rows.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"])).map(lambda r: {"label": 2})
    train = rows.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    datasets.DatasetDict({"train": train, "validation": held}).save_to_disk(str(tmp_path / "c_only_held"))
    with pytest.raises(ValueError, match="validation split has classes its train split has no rows of \\('c'\\)"):
        labelled_split(f"hf:{tmp_path / 'c_only_held'}", 16, 3)  # before: scored, every query wrong


def test_a_label_column_of_class_names_says_how_to_encode_it():
    """Before: "no integer label column 'label'" for a column that is there, holding names."""
    from byol_pytorch.data.hf import label_column

    data = datasets.Dataset.from_dict({"image": [b"x", b"y"], "label": ["cat", "dog"]})
    with pytest.raises(ValueError, match=r"label column 'label' holds .*string.*class_encode_column\('label'\)"):
        label_column(data, "label")
    with pytest.raises(ValueError, match="no integer label column 'kind'; the columns: image"):
        label_column(data, "kind")
    assert label_column(data.class_encode_column("label"), "label") == "label"
    # Probe: found by its name alone (no --label-column), the column of names said 'has no label column (... its
    # columns: image, label)'; it now names the fix as well.
    with pytest.raises(ValueError, match=r"label column 'label' holds .*string.*class_encode_column\('label'\)"):
        label_column(data)
    assert label_column(data.class_encode_column("label")) == "label"
    both = datasets.Dataset.from_dict({"image": [b"x", b"y"], "label": ["cat", "dog"], "labels": [0, 1]})
    assert label_column(both) == "labels"  # review: the integer one is taken, as before
    listed = datasets.Dataset.from_dict({"image": [b"x", b"y"], "labels": [[0, 1], [1]]})
    assert label_column(listed) is None  # multi-label lists: no fix to name
    two = datasets.Dataset.from_dict(
        {"image": [b"x", b"y"], "label": [0, 1], "coarse": [0, 0]},
        features=datasets.Features(
            {
                "image": datasets.Value("binary"),
                "label": datasets.ClassLabel(names=["a", "b"]),
                "coarse": datasets.ClassLabel(names=["c"]),
            }
        ),
    )
    assert label_column(two) == "label"  # review: among several ClassLabel columns, 'label' by its name, as before
    with pytest.raises(ValueError, match=r"several label columns \(ClassLabel\): fine, coarse; choose one"):
        label_column(two.rename_column("label", "fine"))


def test_a_dataset_dict_object_an_empty_split_named_and_relative_paths_say_what_is_wrong(tmp_path, monkeypatch):
    """Probe: HFImageDataset(load_from_disk(...)) of a dataset with splits was "'DatasetDict' object has no
    attribute 'features'"; --hf-split naming a saved empty split said the split did not exist; a column of paths
    relative to another folder was 'not an image column'."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buffer, "PNG")
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": buffer.getvalue(), "path": None}] * 6, "label": [0, 1] * 3},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    both = datasets.DatasetDict({"train": rows, "test": rows.select(range(2)), "extra": rows.select([])})
    assert len(HFImageDataset(both, 16)) == 6
    test = HFImageDataset(both, 16, split="test")
    assert (len(test), test.split) == (2, "test")
    with pytest.raises(ValueError, match="the DatasetDict has no split 'val'; its splits: train, test, extra"):
        HFImageDataset(both, 16, split="val")
    with pytest.raises(TypeError, match="takes hf:'s PATH, a datasets.Dataset or a DatasetDict, got list"):
        HFImageDataset([rows], 16)
    both.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="split 'extra' holds no rows; its splits with rows: train, test"):
        load_local_dataset(tmp_path / "dd", "extra")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "imgs" / "0.png")
    datasets.Dataset.from_dict({"file": ["imgs/0.png"] * 4}).save_to_disk(str(tmp_path / "paths"))
    monkeypatch.chdir(tmp_path)
    assert len(HFImageDataset(tmp_path / "paths", 16, column="file")) == 4
    monkeypatch.chdir(tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"'imgs/0.png', is no file from here .*run from the folder they are"):
        HFImageDataset(tmp_path / "paths", 16, column="file")


def test_classes_with_no_rows_are_told_apart_from_unreadable_ones(tmp_path):
    """Probe: classes a ClassLabel names but no row carries (a filtered dataset) were warned of as 'no readable
    image: their files were passed over', though nothing was passed over."""
    from byol_pytorch.training.validation import KnnMonitor

    images = [Image.new("RGB", (12, 12), (40 * i, 90, 30)) for i in range(20)]
    rows = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(20)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}),
    )
    rows.save_to_disk(str(tmp_path / "two_of_three"))
    monitor = KnnMonitor(f"hf:{tmp_path / 'two_of_three'}", 12, 3, torch.device("cpu"))
    monitor.missing = monitor.missing_classes(torch.tensor([0, 1]))
    assert monitor.missing == ["c"]
    assert monitor.missing_warning("hf:x") == (
        "1 class(es) of hf:x have no image at all (c): the data names them among its classes but holds none of them "
        "(a filtered dataset, a subset of the classes), and the accuracy is over the other classes"
    )
    monitor.missing = monitor.missing_classes(torch.tensor([0]))  # b has rows: unreadable ones
    assert monitor.missing_warning("hf:x").startswith(
        "1 class(es) of hf:x have no readable image (b): their files were passed over; 1 class(es) of hf:x have no "
        "image at all (c)"
    )


def test_the_classes_counted_are_those_with_images_and_every_missing_one_is_shown_or_elided(tmp_path):
    """A probe: eval's header said '6 classes' for labels 0, 1 and 5 of ten named (the largest label + 1), and the
    warning named 5 of the 7 missing classes with no sign of the other two."""
    from conftest import small_cnn

    from byol_pytorch import BYOL
    from byol_pytorch.training.validation import KnnMonitor

    labels = [(0, 1, 5)[i % 3] for i in range(30)]
    images = [Image.new("RGB", (12, 12), (8 * i, 90, 30)) for i in range(30)]
    names = [f"n{i}" for i in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(tmp_path / "d"))
    monitor = KnnMonitor(f"hf:{tmp_path / 'd'}", 12, 3, torch.device("cpu"))
    monitor.features(BYOL(small_cnn(), 12, projection_size=8, projection_hidden_size=16).eval())
    assert (monitor.classes_present, monitor.num_classes) == (3, 6)  # 3 with images; scores over labels 0..5
    assert monitor.missing_warning("hf:d").startswith(
        "7 class(es) of hf:d have no image at all (n2, n3, n4, n6, n7, ...): the data names them"
    )


def test_parquet_files_split_by_name_and_files_of_no_split_beside_them_are_named(tmp_path):
    """Probe and review: the Hub's data/train-*.parquet and data/test-*.parquet were one 'train' split; and with
    train.parquet, validation.parquet and extra.parquet together every row, the validation ones too, was trained on."""
    rows = datasets.Dataset.from_dict({"image": [b"x"] * 4, "label": [0, 1, 0, 1]})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    rows.to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    rows.select(range(2)).to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "hub" / "README.md").write_text("a dataset card")
    assert len(load_local_dataset(tmp_path / "hub")) == 4 and len(load_local_dataset(tmp_path / "hub", "test")) == 2
    (tmp_path / "mixed").mkdir()
    for name in ("train", "validation", "extra"):
        rows.to_parquet(tmp_path / "mixed" / f"{name}.parquet")
    with pytest.raises(ValueError, match=r"1 parquet file\(s\) name no split \(extra\.parquet\) beside files of"):
        load_local_dataset(tmp_path / "mixed")
    (tmp_path / "mixed" / "extra.parquet").unlink()
    assert len(load_local_dataset(tmp_path / "mixed", "validation")) == 4

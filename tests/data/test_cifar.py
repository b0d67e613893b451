"""cifar.py: the official CIFAR python batches, their layout, the restricted unpickler, the labelled split."""

import os
import pickle

import numpy as np
import pytest
import torch

from byol_pytorch.data.cifar import CifarDataset, find_cifar_folder, load_cifar, load_pickle, parse_cifar_spec
from byol_pytorch.training.validation import split_labelled


def test_reads_the_batches_from_the_parent_or_the_folder_itself(tmp_path, make_cifar10):
    root = make_cifar10(tmp_path / "data", per_batch=4, test=6)
    folder = root / "cifar-10-batches-py"
    assert find_cifar_folder("cifar10", root) == folder and find_cifar_folder("cifar10", folder) == folder
    images, labels, classes = load_cifar("cifar10", root, "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [(4 + i) % 10 for i in range(20)]  # batches 1..5 in order
    assert classes[:2] == ["airplane", "automobile"] and len(classes) == 10
    # A row is the red plane, then green, then blue, each row-major: (3, 32, 32) as stored.
    raw = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert torch.equal(images[0], torch.from_numpy(raw).view(3, 32, 32))
    test_images, test_labels, _ = load_cifar("cifar10", folder, "test")
    assert test_images.shape == (6, 3, 32, 32) and test_labels.tolist() == list(range(6))


def test_dataset_items_for_training_and_for_evaluation(tmp_path, make_cifar10):
    root = make_cifar10(tmp_path, per_batch=2, test=4)
    train = CifarDataset("cifar10", root)
    image, skipped = train[3]
    assert len(train) == 10 and image.shape == (3, 32, 32) and image.dtype == torch.uint8 and skipped == 0
    labelled = CifarDataset("cifar10", root, "test", labelled=True, size=24, channels=1)
    image, label = labelled[2]
    assert image.shape == (1, 24, 24) and image.dtype == torch.uint8 and label == 2
    bank, queries = split_labelled(f"cifar10:{root}", 32, 3)
    assert (len(bank), len(queries)) == (10, 4) and queries.targets == [0, 1, 2, 3]


def test_numpy_1_pickles_name_numpy_core(tmp_path, make_cifar10):
    """The official files (and numpy < 2) refer to numpy.core.multiarray._reconstruct."""
    folder = make_cifar10(tmp_path, per_batch=2) / "cifar-10-batches-py"
    path = folder / "test_batch"
    data = path.read_bytes()
    assert b"numpy._core.multiarray\n" in data  # protocol 3: GLOBAL opcodes name modules as text
    path.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert load_pickle(path)[b"data"].shape == (10, 3072)


def test_protocol_2_pickles_written_by_python_3_load(tmp_path, make_cifar10):
    """Python 3 writes bytes at protocol 2 as _codecs.encode(text, 'latin1'): allowed, for latin-1 only."""
    folder = make_cifar10(tmp_path, per_batch=2) / "cifar-10-batches-py"
    path = folder / "test_batch"
    batch = load_pickle(path)
    path.write_bytes(pickle.dumps(batch, protocol=2))
    assert b"_codecs\nencode" in path.read_bytes()
    again = load_pickle(path)
    assert np.array_equal(again[b"data"], batch[b"data"]) and again[b"labels"] == batch[b"labels"]
    evil = b"c_codecs\nencode\n(Vx\nVrot13\ntR."  # another encoding: refused
    path.write_bytes(evil)
    with pytest.raises(ValueError, match="_codecs.encode with the encoding 'rot13'"):
        load_pickle(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["system", "eval", "torch"])
def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, make_cifar10, payload):
    folder = make_cifar10(tmp_path / "data", per_batch=2) / "cifar-10-batches-py"
    marker = tmp_path / "pwned"
    if payload == "system":
        evil = {b"data": _Exploit(marker), b"labels": [0]}
        name = os.system.__module__ + ".system"
    elif payload == "eval":
        evil = b'cbuiltins\neval\n(S\'__import__("os").system("touch ' + str(marker).encode() + b"\")'\ntR."
        name = "builtins.eval"
    else:  # any other global, harmless or not, is refused too
        evil = {b"data": torch.zeros(2), b"labels": [0]}
        name = "torch._utils._rebuild_tensor_v2"
    (folder / "data_batch_1").write_bytes(evil if isinstance(evil, bytes) else pickle.dumps(evil, protocol=3))
    with pytest.raises(ValueError, match=f"data_batch_1'.*refused to load the global {name}"):
        load_cifar("cifar10", folder, "train")
    assert not marker.exists()


def test_missing_batches_say_where_to_get_them(tmp_path):
    with pytest.raises(ValueError) as info:
        CifarDataset("cifar10", tmp_path)
    message = str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message and "\n" not in message
    assert "torchvision.datasets.CIFAR10(" in message and "download=True" in message
    with pytest.raises(ValueError, match="cifar-100-python.tar.gz"):
        load_cifar("cifar100", tmp_path)


def test_a_file_that_is_not_a_batch(tmp_path, make_cifar10):
    folder = make_cifar10(tmp_path, per_batch=2) / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch' is not a CIFAR batch"):
        load_cifar("cifar10", folder, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"expected b'data' as \(N, 3072\) uint8"):
        load_cifar("cifar10", folder, "test")


def test_a_cifar_root_given_as_a_folder_of_images_names_the_cifar_form(tmp_path, make_cifar10):
    """Before: "no images found under 'ROOT'" and nothing more (torchvision users keep CIFAR there)."""
    from byol_pytorch.data.file_index import index_images

    root = make_cifar10(tmp_path / "data")
    for given in (root, root / "cifar-10-batches-py"):
        with pytest.raises(ValueError, match=f"it holds CIFAR's python batches: pass --data cifar10:{given}$"):
            index_images(given)
    (tmp_path / "c100" / "cifar-100-python").mkdir(parents=True)
    (tmp_path / "c100" / "cifar-100-python" / "meta").write_bytes(b"")
    with pytest.raises(ValueError, match="pass --data cifar100:"):
        index_images(tmp_path / "c100")


def test_parse_cifar_spec():
    assert parse_cifar_spec("cifar10:/data") == ("cifar10", "/data")
    assert parse_cifar_spec("CIFAR100:rel/dir") == ("cifar100", "rel/dir")
    assert parse_cifar_spec("/data/images") is None and parse_cifar_spec("C:/images") is None
    assert parse_cifar_spec(None) is None


def test_labels_outside_the_sets_classes_are_a_value_error(tmp_path, make_cifar10):
    """Before: labels 10..29 in a cifar10 test batch made a '30 classes' kNN with no word."""
    import pickle

    root = make_cifar10(tmp_path, per_batch=4, test=4)
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    batch[b"labels"] = [10 + i for i in range(len(batch[b"labels"]))]
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=3)
    with pytest.raises(ValueError, match="test_batch': label 10 is outside cifar10's classes 0..9 \\(a cifar100:"):
        load_cifar("cifar10", root, "test")


def test_a_set_missing_one_batch_names_that_batch(tmp_path, make_cifar10):
    """Before: 'no cifar10 python batches in ...', as if none were there, and the advice to download the set."""
    root = make_cifar10(tmp_path, per_batch=2, test=2)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="holds cifar10 batches but not data_batch_3: the download or the unpack"):
        find_cifar_folder("cifar10", root)


def _rewrite_labels(folder, make, protocol):
    """Every batch of ``folder`` written again at ``protocol`` with its labels given as ``make(labels)``."""
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = load_pickle(folder / name)
        entry[b"labels"] = make(np.asarray(entry[b"labels"]))
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("make", [list, lambda a: a, lambda a: a.astype(np.uint8)], ids=["np-ints", "array", "uint8"])
def test_numpy_labels_and_protocol_5_pickles_load(tmp_path, make_cifar10, make, protocol):
    """Probe: a batch written at protocol 5 (numpy's _frombuffer) and labels as a list of numpy ints (numpy's
    scalar) were refused as unsafe globals."""
    folder = make_cifar10(tmp_path) / "cifar-10-batches-py"
    expected = load_cifar("cifar10", tmp_path, "train")[1]
    _rewrite_labels(folder, make, protocol)
    assert torch.equal(load_cifar("cifar10", tmp_path, "train")[1], expected)


@pytest.mark.parametrize(
    "make, got",
    [
        (lambda a: a[:, None], r"int64 \(8, 1\)"),
        (lambda a: None, "NoneType"),
        (lambda a: [str(v) for v in a], r"<U1 \(8,\)"),
        (lambda a: a + 0.7, r"float64 \(8,\)"),
    ],
)
def test_labels_that_are_not_n_whole_numbers_are_one_error_naming_the_file(tmp_path, make_cifar10, make, got):
    """Probe: (N, 1) labels were 'only 0-dimensional arrays can be converted to Python scalars' (a traceback through
    every command), None a TypeError, strings an error that named no file, floats silently cut to ints."""
    folder = make_cifar10(tmp_path) / "cifar-10-batches-py"
    _rewrite_labels(folder, make, 3)
    with pytest.raises(ValueError, match=rf"data_batch_1': b'labels' must be N whole-number labels .*got {got}"):
        load_cifar("cifar10", tmp_path, "train")

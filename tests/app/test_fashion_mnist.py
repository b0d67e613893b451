"""Tests for byol_pytorch/fashion_mnist.py on small IDX files written here, and the real ones."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from byol_pytorch.app.fashion_mnist import (
    DEFAULT_DATA_DIR,
    ENV_VAR,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
)


def _idx(values: np.ndarray, magic: int) -> bytes:
    """IDX bytes written with struct, independently of the reader."""
    return struct.pack(f">I{values.ndim}I", magic, *values.shape) + values.astype(np.uint8).tobytes()


def _write_split(directory: Path, prefix: str, n: int, compress: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for name, data in (
        (f"{prefix}-images-idx3-ubyte", _idx(images, 0x803)),
        (f"{prefix}-labels-idx1-ubyte", _idx(labels, 0x801)),
    ):
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_reads_small_idx_files(tmp_path, compress, split, prefix):
    images, labels = _write_split(tmp_path, prefix, 7, compress)
    x, y = load_fashion_mnist(tmp_path, split=split)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (7,) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(images))
    assert y.tolist() == labels.tolist()


def test_environment_variable_sets_the_folder(tmp_path, monkeypatch):
    _, labels = _write_split(tmp_path, "t10k", 3, compress=False, seed=1)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert load_fashion_mnist(split="test")[1].tolist() == labels.tolist()


def test_wrong_magic_number(tmp_path):
    _write_split(tmp_path, "train", 4, compress=False)
    labels = (tmp_path / "train-labels-idx1-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(labels)  # a labels file in its place
    with pytest.raises(ValueError, match=r"magic number 0x00000801, expected 0x00000803"):
        load_fashion_mnist(tmp_path)


def test_truncated_and_mismatched_files(tmp_path):
    _write_split(tmp_path, "train", 4, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_fashion_mnist(tmp_path)
    _write_split(tmp_path, "train", 4, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3), 0x801))
    with pytest.raises(ValueError, match="4 images but .* 3 labels"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.full(4, 12), 0x801))
    with pytest.raises(ValueError, match="label 12 outside 0..9"):
        load_fashion_mnist(tmp_path)


def test_bad_gzip(tmp_path):
    _write_split(tmp_path, "train", 2, compress=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_fashion_mnist(tmp_path)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "--data-dir DIR" in message


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist(tmp_path, split="val")


@pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "t10k-labels-idx1-ubyte.gz").exists()
    and not (DEFAULT_DATA_DIR / "t10k-labels-idx1-ubyte").exists(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_real_dataset(split, n, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    x, y = load_fashion_mnist(split=split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (n,) and y.dtype == torch.int64
    # The dataset is balanced: n / 10 images of each class.
    assert y.bincount(minlength=len(FASHION_MNIST_CLASSES)).tolist() == [n // 10] * 10
    assert x.float().mean().item() == pytest.approx(72.9, abs=1.0)  # 0.286 * 255, its known mean

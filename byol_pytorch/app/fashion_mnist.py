"""Fashion-MNIST from its four IDX files (Xiao, Rasul and Vollgraf, 2017).

The files are read as they are distributed, gzip-compressed or not:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``. An IDX file is a big-endian header (two zero bytes, a type
code, 0x08 = unsigned byte, and the number of dimensions), one 32-bit size per
dimension, then the values.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["FASHION_MNIST_CLASSES", "DEFAULT_DATA_DIR", "ENV_VAR", "load_fashion_mnist"]

# Label order of the dataset's README.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Where the Debian package dataset-fashion-mnist installs the files.
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "BYOL_FASHION_MNIST_DIR"

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The values of one IDX file, shaped by its header."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:  # BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read ({error})") from error
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not the expected IDX file (magic number 0x{found:08x}, expected 0x{magic:08x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than its IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"{path}: {len(data)} bytes but its header {shape} needs {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of Fashion-MNIST.

    Args:
        data_dir: folder holding the IDX files; ``None`` means the environment variable
            ``BYOL_FASHION_MNIST_DIR`` if set, else ``/usr/share/datasets/fashion-mnist``.
        split: "train" (60,000 images) or "test" (10,000).

    Returns:
        ``uint8`` images ``(N, 1, 28, 28)`` and ``int64`` labels ``(N,)`` in 0..9; names
        in ``FASHION_MNIST_CLASSES``.

    Raises:
        ValueError: unknown split, or a file whose magic number, sizes or labels are wrong.
        FileNotFoundError: the files are not there (one line saying how to get them).
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR
    directory = Path(data_dir)
    prefix = _PREFIX[split]
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], "
            f"{prefix}-labels-idx1-ubyte[.gz]) not found in {directory}: run "
            "`apt-get install -y dataset-fashion-mnist`, or pass --data-dir DIR "
            f"(or set {ENV_VAR}) for a folder with the four IDX files"
        )
    images = _read_idx(images_path, _IMAGES_MAGIC)  # (N, 28, 28)
    labels = _read_idx(labels_path, _LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} outside 0..9")
    # frombuffer views are read-only; copy once into tensors that own their memory.
    return (
        torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28)
        torch.from_numpy(labels.astype(np.int64)),  # (N,)
    )

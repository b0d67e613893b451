"""The benchmarks' data: Fashion-MNIST padded to 32 px (random images for smoke runs), and its kNN evaluation.

Fashion-MNIST's 28 px grey images are padded with 2 black pixels per side and repeated to three
channels, so that any ImageNet backbone takes them (issue 6's budget). Without the files a
``--smoke`` run uses random images of the same shape instead, and says so in ``Data.source``.
The evaluation is a weighted kNN (k 20, T 0.07, cosine) on the backbone's eval-mode features of
images normalised as the views normalise them (ImageNet mean/std, also the peer's).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from byol_pytorch import BYOLAugment
from byol_pytorch.app.fashion_mnist import load_fashion_mnist
from byol_pytorch.training.evaluate import extract_features, knn_accuracy

__all__ = ["SMOKE_BATCH", "SMOKE_TEST", "SMOKE_TRAIN", "Data", "knn", "load_data", "prepare", "random_images"]

SMOKE_TRAIN, SMOKE_TEST, SMOKE_BATCH = 128, 64, 32  # the smoke runs' training images, queries and batch


@dataclass
class Data:
    """Padded, three-channel uint8 images and their labels."""

    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor  # (M, 3, 32, 32) uint8
    test_y: torch.Tensor  # (M,) int64
    source: str


def random_images(
    count: int,
    size: int,
    channels: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(count, channels, size, size) uniformly random uint8 images: what the smoke runs and speed benchmarks feed."""
    shape = (count, channels, size, size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator, device=device)


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) uint8 -> (N, 3, 32, 32) uint8: 2 black pixels per side, grey repeated to RGB."""
    return F.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()


def load_data(data_dir: Path | None = None, smoke: bool = False) -> Data:
    """Fashion-MNIST (or, for `smoke` without the files, random images, said in `source`).

    Args:
        data_dir: the IDX files (None: byol_pytorch's search path).
        smoke: keep the first SMOKE_TRAIN training images and SMOKE_TEST test images.
    """
    try:
        train_x, train_y = load_fashion_mnist(data_dir, split="train")
        test_x, test_y = load_fashion_mnist(data_dir, split="test")
        source = "Fashion-MNIST"
    except (FileNotFoundError, ValueError) as error:
        if not smoke:
            raise
        print(f"Fashion-MNIST not found ({error}); the smoke run uses random images", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        train_x, test_x = random_images(SMOKE_TRAIN, 28, 1, g), random_images(SMOKE_TEST, 28, 1, g)
        train_y, test_y = torch.arange(SMOKE_TRAIN) % 10, torch.arange(SMOKE_TEST) % 10
        source = "random images (smoke)"
    if smoke:
        train_x, train_y = train_x[:SMOKE_TRAIN], train_y[:SMOKE_TRAIN]
        test_x, test_y = test_x[:SMOKE_TEST], test_y[:SMOKE_TEST]
    return Data(prepare(train_x), train_y.long(), prepare(test_x), test_y.long(), source)


def scale_data(data: Data, size: int) -> Data:
    """The 32 px images upscaled to `size` (bilinear, rounded to uint8): the same content, more pixels."""
    if size == data.train_x.shape[-1]:
        return data

    def up(x: torch.Tensor) -> torch.Tensor:
        out = [
            F.interpolate(c.float(), size=(size, size), mode="bilinear", align_corners=False)
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
            for c in x.split(4096)
        ]
        return torch.cat(out)

    return Data(up(data.train_x), data.train_y, up(data.test_x), data.test_y, f"{data.source}, {size} px")


def knn(net: nn.Module, data: Data, bank: int, device: torch.device) -> float:
    """Weighted kNN accuracy (k 20, T 0.07) of the net's pooled features, as a percentage.

    The first `bank` training images are the bank, the test images the queries.
    """
    normalize = BYOLAugment(32).normalize  # uint8 -> [0, 1] -> ImageNet mean/std
    bank_f = extract_features(net, data.train_x[:bank], batch_size=512, device=device, transform=normalize)
    test_f = extract_features(net, data.test_x, batch_size=512, device=device, transform=normalize)
    return 100.0 * knn_accuracy(
        bank_f, data.train_y[:bank], test_f, data.test_y, num_classes=10, k=20, temperature=0.07
    )

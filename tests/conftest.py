"""Shared fixtures: small backbones built without downloading weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


def small_cnn(channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """A plain user CNN with BatchNorm and a classifier, as someone would write it."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


@pytest.fixture
def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return small_cnn()


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, single-threaded tests.

    CI and development boxes here have 2 shared cores: two intra-op threads spin
    against each other and make small steps up to ~50x slower, so every test runs on
    one thread (restored afterwards) and starts from the same seed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)

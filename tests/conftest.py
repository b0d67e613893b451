"""Shared fixtures: small backbones built without downloading weights, and tiny data folders.

Test files take what they share from here as fixtures (``cnn``, ``make_cnn``,
``tiny_flags``, ``messy``, ``make_messy_folder``, ``make_labelled``, ``make_shards``,
``make_hf_saved``); no test file imports another.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from byol_pytorch import BYOL

pytest_plugins = ["ci_skips"]  # under CI, a skip for any reason but CUDA fails the session

# gcsfs's default file system first asks Google's gRPC API for a bucket's type (60 s to time out
# against a local emulator); the plain one, set before gcsfs is imported, talks JSON over HTTP only.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# The smallest `byol-pytorch train` recipe that still runs a real timm ResNet.
TINY_FLAGS = (
    "--model",
    "resnet10t",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--projection-size",
    "32",
    "--projection-hidden-size",
    "64",
    "--workers",
    "0",
)


def markdown_rows(table: str, header_start: str, key_cells: int = 1) -> dict[str, list[str]]:
    """Rows of the Markdown table whose header starts with `header_start`, keyed by their first cells joined by '/'."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows["/".join(cells[:key_cells])] = cells
    return rows


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


def train_steps(learner, x, steps, lr=1e-3):
    """The README's loop (Adam, update_moving_average() with momentum); the losses."""
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = learner(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if learner.use_momentum:
            learner.update_moving_average()
        losses.append(loss.item())
    return losses


def stats_free_learner(**kwargs) -> BYOL:
    """GroupNorm backbone, LayerNorm heads, deterministic views: no batch statistics anywhere."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return BYOL(
        net,
        image_size=16,
        projection_size=8,
        projection_hidden_size=16,
        use_batchnorm=False,
        augment_fn=nn.Identity(),
        augment_fn2=lambda x: x.flip(-1),
        **kwargs,
    )


def build_messy_folder(root: Path, good: int = 24) -> Path:
    """Nested folders of JPEG/PNG, grayscale and RGBA images, plus corrupt, empty and text files."""
    rng = np.random.default_rng(0)
    (root / "a" / "deeper").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(good):
        kind = i % 4
        size = (36 + i % 5, 44)
        if kind == 0:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "a" / f"{i}.jpg")
        elif kind == 1:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "a" / "deeper" / f"{i}.png")
        elif kind == 2:
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), "L").save(root / "b" / f"{i}_gray.png")
        else:
            Image.fromarray(rng.integers(0, 256, (*size, 4), dtype=np.uint8), "RGBA").save(root / "b" / f"{i}_rgba.png")
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "readme.txt").write_text("not an image")
    return root


def build_labelled(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """``ROOT/class_C/I.png``: class C is a noisy plain colour (red, green, blue, red, ...)."""
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        colour = np.zeros(3)
        colour[c % 3] = 200
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def build_cifar10(root: Path, per_batch: int = 8, test: int = 10) -> Path:
    """``ROOT/cifar-10-batches-py`` in the official format: pickled dicts of numpy arrays.

    Each batch holds ``b"batch_label"``, ``b"labels"``, ``b"data"`` ((N, 3072) uint8,
    the red plane, then green, then blue) and ``b"filenames"``, as the Python 2 pickles of
    the official tarball read with ``encoding="bytes"``; protocol 3 writes bytes as bytes
    (protocol 2 would go through ``_codecs.encode``, which Python 2 never wrote). Class c
    is a noisy image tinted by c, so kNN has something to find.
    """
    import pickle

    rng = np.random.default_rng(2)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(name: str, count: int, offset: int) -> None:
        labels = [(offset + i) % 10 for i in range(count)]
        tint = np.array([[25 * c, 255 - 25 * c, 120] for c in labels], dtype=np.float64)  # (N, 3)
        noise = rng.normal(0, 30, (count, 3, 1024))
        data = np.clip(tint[:, :, None] + noise, 0, 255).astype(np.uint8).reshape(count, 3072)
        entry = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{offset + i}.png".encode() for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=3))

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch, i * per_batch)
    batch("test_batch", test, 0)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=3))
    return root


def sample_png(sample_id: int, rng: np.random.Generator) -> bytes:
    """A PNG whose red channel is ``sample_id`` everywhere (it survives the resize): its identity."""
    import io

    pixels = rng.integers(0, 256, (40, 36 + sample_id % 5, 3), dtype=np.uint8)
    pixels[:, :, 0] = sample_id
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_shards(root: Path, shards: int = 4, per_shard: int | list[int] = 6, broken: bool = True) -> str:
    """``ROOT/train-{0000..N-1}.tar`` in webdataset's layout; returns that brace pattern.

    ``per_shard``: samples in each shard, or a list of each shard's count (``shards`` is then its
    length). Sample ``i`` of shard ``k`` has id ``k * per_shard + i + 1`` (the samples before it
    plus ``i + 1``; its red channel, see ``sample_png``) and a ``.cls`` file. With ``broken``,
    shard 1's second sample holds garbage bytes and shard 2's third sample has no image file at all.
    """
    import webdataset

    counts = [per_shard] * shards if isinstance(per_shard, int) else list(per_shard)
    shards = len(counts)
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for k, count in enumerate(counts):
        with webdataset.TarWriter(str(root / f"train-{k:04d}.tar")) as sink:
            for i in range(count):
                sample_id, sample = sum(counts[:k]) + i + 1, {"__key__": f"s{k:02d}_{i:03d}"}
                if broken and (k, i) == (1, 1):
                    sample["png"] = b"\x89PNG garbage, not an image"
                elif not (broken and (k, i) == (2, 2)):
                    sample["png"] = sample_png(sample_id, rng)
                sample["cls"] = sample_id
                sink.write(sample)
    return str(root / f"train-{{0000..{shards - 1:04d}}}.tar")


def build_hf_saved(root: Path, rows: int = 24, broken: int | None = 5, extra_image: bool = False) -> Path:
    """A ``datasets.Dataset`` saved with ``save_to_disk``: an ``image`` column (ids 1..rows, see
    ``sample_png``), a ``label`` column, row ``broken`` holding garbage bytes; with
    ``extra_image`` a second image column ``mask``."""
    import datasets

    rng = np.random.default_rng(4)
    images = [{"bytes": sample_png(i + 1, rng), "path": None} for i in range(rows)]
    if broken is not None:
        images[broken] = {"bytes": b"garbage, not an image", "path": None}
    columns: dict = {"image": images, "label": [i % 3 for i in range(rows)]}
    features = {"image": datasets.Image(), "label": datasets.Value("int64")}
    if extra_image:
        columns["mask"] = images
        features["mask"] = datasets.Image()
    data = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    data.save_to_disk(str(root))
    return root


@pytest.fixture(scope="session")
def make_shards():
    """``make_shards(root, shards=4, per_shard=6, broken=True) -> pattern``: see ``build_shards``."""
    pytest.importorskip("webdataset")
    return build_shards


@pytest.fixture(scope="session")
def make_hf_saved():
    """``make_hf_saved(root, rows=24, broken=5, extra_image=False) -> root``: see ``build_hf_saved``."""
    pytest.importorskip("datasets")
    return build_hf_saved


@pytest.fixture(scope="session")
def make_cifar10():
    """``make_cifar10(root, per_batch=8, test=10) -> root``: see ``build_cifar10``."""
    return build_cifar10


@pytest.fixture
def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return small_cnn()


@pytest.fixture(scope="session")
def make_cnn():
    """``small_cnn(channels=3, num_classes=10)``, the builder itself."""
    return small_cnn


@pytest.fixture(scope="session")
def tiny_flags() -> tuple[str, ...]:
    """Flags of a tiny `byol-pytorch train` run (resnet10t, 32 px, batch 4, no loader workers)."""
    return TINY_FLAGS


@pytest.fixture(scope="session")
def make_messy_folder():
    """``make_messy_folder(root, good=24) -> root``: see ``build_messy_folder``."""
    return build_messy_folder


@pytest.fixture(scope="session")
def make_labelled():
    """``make_labelled(root, classes=3, per_class=10) -> root``: see ``build_labelled``."""
    return build_labelled


@pytest.fixture
def messy(tmp_path) -> Path:
    """A messy folder of 24 good images and 3 bad files under ``tmp_path / "images"``."""
    return build_messy_folder(tmp_path / "images")


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


@pytest.fixture
def record_fault():
    """``record_fault(fault, injected, held, seconds=None)``: a row of docs/FAULTS.md (with ``BYOL_FAULTS_REPORT``)."""
    import json
    import os

    def record(fault: str, injected: int, held: str, seconds: float | None = None) -> None:
        target = os.environ.get("BYOL_FAULTS_REPORT")
        if target:
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(
                    json.dumps({"fault": fault, "injected": injected, "held": held, "seconds": seconds}) + "\n"
                )

    return record


@pytest.fixture
def live_reads(monkeypatch):
    """Remote shards read one sample ahead in 12 kB range requests, so that reads go on while a run
    trains (an outage meets a live read), retried 5 times from 0.2 s. Returns the list of retry
    attempts, one entry per failed read."""
    import functools

    from byol_pytorch.data import remote, remote_shards

    monkeypatch.setattr(remote, "BLOCK", 12_000)
    monkeypatch.setattr(remote, "READ_AHEAD", 1)  # one sample held ahead of the consumer
    waits: list[int] = []

    class Watched(remote.ReadPolicy):
        def wait(self, attempt: int) -> float:
            waits.append(attempt)
            return super().wait(attempt)

    monkeypatch.setattr(remote_shards, "ReadPolicy", functools.partial(Watched, retries=5, backoff=0.2))
    return waits


@pytest.fixture
def after_update(monkeypatch):
    """``after_update(step, action)``: ``action()`` right after a run's ``update_moving_average`` call ``step``."""
    original = BYOL.update_moving_average

    def install(step, action):
        def update(self):
            original(self)
            if self._ema_count == step:
                action()

        monkeypatch.setattr(BYOL, "update_moving_average", update)

    return install

"""Tests of byol_pytorch.training.evaluate against references written independently."""

import functools
import math
import statistics
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from byol_pytorch.training.evaluate import (
    collapse_report,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
)

# --------------------------------------------------------------------------- kNN


def reference_knn(train, labels, test, num_classes, k, temperature):
    """Brute force: Python loops, float64, a stable sort, ties to the lower index/class."""

    def unit(v):
        v = [float(a) for a in v]
        norm = math.sqrt(sum(a * a for a in v))
        return [a / norm for a in v]

    bank = [unit(row) for row in train]
    predictions = []
    for row in test:
        query = unit(row)
        sims = [sum(a * b for a, b in zip(query, entry)) for entry in bank]
        order = sorted(range(len(bank)), key=lambda j: -sims[j])  # stable: lower j first
        scores = [0.0] * num_classes
        for j in order[:k]:
            scores[int(labels[j])] += math.exp(sims[j] / temperature)
        best = 0
        for c in range(1, num_classes):
            if scores[c] > scores[best]:
                best = c
        predictions.append(best)
    return predictions


def test_knn_matches_reference_on_random_features():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    test = torch.randn(25, 8, generator=g)
    for k in (1, 5, 20, 59):
        for temperature in (0.07, 1.0):
            expected = reference_knn(train, labels, test, 4, k, temperature)
            got = knn_predict(train, labels, test, 4, k=k, temperature=temperature, batch_size=7)
            assert got.dtype == torch.int64 and got.shape == (25,)
            assert got.tolist() == expected, (k, temperature)


def test_knn_ties_keep_lower_bank_index_then_lower_class():
    e = torch.eye(4)
    # for the query e0, bank entries 1, 2 and 3 are equally similar (cosine 1)
    train = torch.stack([e[1], e[0], 3 * e[0], 0.5 * e[0], e[2]])
    labels = torch.tensor([0, 2, 1, 0, 1])
    query = e[0:1]
    # k=1: the tie among 1, 2, 3 keeps index 1 -> class 2
    assert knn_predict(train, labels, query, 3, k=1).tolist() == [2]
    # k=2: indices 1, 2 -> classes 2 and 1 with equal weight -> lowest class, 1
    assert knn_predict(train, labels, query, 3, k=2).tolist() == [1]
    # k=3: classes 2, 1, 0 tie -> 0
    assert knn_predict(train, labels, query, 3, k=3).tolist() == [0]
    for k in (1, 2, 3):
        assert knn_predict(train, labels, query, 3, k=k).tolist() == reference_knn(train, labels, query, 3, k, 0.07)


def test_knn_many_exact_ties_match_reference():
    # Scaled one-hot bank vectors: every cosine is one coordinate of the unit query,
    # exact in float32, so the many ties are real ties in both implementations.
    g = torch.Generator().manual_seed(1)
    axes = torch.randint(0, 3, (40,), generator=g)
    train = torch.eye(3)[axes] * (1 + torch.rand(40, 1, generator=g))
    labels = torch.arange(40) % 2
    queries = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0]])
    for k in (1, 3, 5, 9):
        expected = reference_knn(train, labels, queries, 2, k, 0.07)
        assert knn_predict(train, labels, queries, 2, k=k).tolist() == expected, k


def test_knn_k_larger_than_a_class_and_temperature():
    # two class-0 neighbours very close to the query, five class-1 neighbours further away
    query = torch.tensor([[1.0, 0.0]])
    near = torch.tensor([[1.0, 0.05], [1.0, -0.05]])
    far = torch.tensor([[1.0, 1.0], [1.0, 1.1], [1.0, 0.9], [1.0, 1.2], [1.0, 0.8]])
    train = torch.cat([near, far])
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    # small T: the two nearest dominate although class 1 has more of the k=5 votes
    assert knn_predict(train, labels, query, 2, k=5, temperature=0.07).tolist() == [0]
    # large T: nearly a majority vote, 3 of 5 for class 1
    assert knn_predict(train, labels, query, 2, k=5, temperature=100.0).tolist() == [1]
    for temperature in (0.07, 100.0):
        assert knn_predict(train, labels, query, 2, k=5, temperature=temperature).tolist() == reference_knn(
            train, labels, query, 2, 5, temperature
        )


def test_knn_k_larger_than_bank_is_clipped():
    g = torch.Generator().manual_seed(2)
    train = torch.randn(10, 4, generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    test = torch.randn(6, 4, generator=g)
    clipped = knn_predict(train, labels, test, 3, k=1000, temperature=0.5)
    assert clipped.tolist() == knn_predict(train, labels, test, 3, k=10, temperature=0.5).tolist()
    assert clipped.tolist() == reference_knn(train, labels, test, 3, 10, 0.5)


def test_knn_tiny_temperature_does_not_overflow():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    # exp(1 / 1e-4) overflows float64; the shifted weights do not
    assert knn_predict(train, labels, test, 2, k=3, temperature=1e-4).tolist() == [0, 1]


def test_knn_accuracy_on_clusters_and_inferred_classes():
    g = torch.Generator().manual_seed(3)
    centres = 10 * torch.randn(5, 16, generator=g)
    train_y = torch.arange(100) % 5
    test_y = torch.arange(50) % 5
    train = centres[train_y] + torch.randn(100, 16, generator=g)
    test = centres[test_y] + torch.randn(50, 16, generator=g)
    assert knn_accuracy(train, train_y, test, test_y) == 1.0
    wrong = (test_y + 1) % 5
    assert knn_accuracy(train, train_y, test, wrong, num_classes=5) == 0.0


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda f, y: knn_predict(f, y[:5], f, 3), ValueError, "10 rows"),
        (lambda f, y: knn_predict(f[:0], y[:0], f, 3), ValueError, "empty"),
        (lambda f, y: knn_predict(f[:, :, None], y, f, 3), ValueError, "2-D"),
        (lambda f, y: knn_predict(f, y, f[:, :3], 3), ValueError, "dimensions"),
        (lambda f, y: knn_predict(f, y, f, 3, k=0), ValueError, "k must be a positive"),
        (lambda f, y: knn_predict(f, y, f, 3, k=-2), ValueError, "k must be a positive"),
        (lambda f, y: knn_predict(f, y, f, 3, temperature=0.0), ValueError, "temperature"),
        (lambda f, y: knn_predict(f, y, f, 3, temperature=-1.0), ValueError, "temperature"),
        (lambda f, y: knn_predict(f, y, f, 2), ValueError, r"\[0, num_classes=2\)"),
        (lambda f, y: knn_predict(f, y.float(), f, 3), TypeError, "integer class"),
        (lambda f, y: knn_predict(f.tolist(), y, f, 3), TypeError, "torch.Tensor"),
        (lambda f, y: knn_predict(f * float("nan"), y, f, 3), ValueError, "NaN"),
        (lambda f, y: knn_accuracy(f, y, f, y[:4]), ValueError, "4 entries"),
    ],
)
def test_knn_errors(call, error, match):
    features = torch.randn(10, 4)
    labels = torch.arange(10) % 3
    with pytest.raises(error, match=match):
        call(features, labels)


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_blobs_reach_100_percent():
    g = torch.Generator().manual_seed(0)
    centres = 8 * torch.randn(4, 16, generator=g)
    train_y, test_y = torch.arange(400) % 4, torch.arange(200) % 4
    train = centres[train_y] + torch.randn(400, 16, generator=g)
    test = centres[test_y] + torch.randn(200, 16, generator=g)
    # wildly different scales per dimension: the standardisation must absorb them
    scale = torch.logspace(-3, 4, 16)
    train, test = train * scale, test * scale
    assert linear_probe(train, train_y, test, test_y) == 1.0
    # chunked gradients: the same optimum
    assert linear_probe(train, train_y, test, test_y, batch_size=64) == 1.0


def test_linear_probe_random_labels_are_at_chance():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(1000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y = torch.randint(0, 5, (1000,), generator=g)
    test_y = torch.randint(0, 5, (1000,), generator=g)
    accuracy = linear_probe(train, train_y, test, test_y)
    assert 0.12 < accuracy < 0.28  # chance is 0.2; the binomial std is 0.013


def test_linear_probe_is_deterministic_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(300, 8, generator=g), torch.randn(100, 8, generator=g)
    train_y = (train[:, 0] + 0.5 * torch.randn(300, generator=g) > 0).long()
    test_y = (test[:, 0] > 0).long()
    state = torch.get_rng_state()
    first = linear_probe(train, train_y, test, test_y, epochs=30)
    assert torch.equal(state, torch.get_rng_state())
    assert first == linear_probe(train, train_y, test, test_y, epochs=30)
    assert first > 0.9


def test_linear_probe_handles_constant_dimensions():
    g = torch.Generator().manual_seed(3)
    train_y, test_y = torch.arange(200) % 2, torch.arange(100) % 2
    train = torch.cat([train_y[:, None] * 4.0 + torch.randn(200, 1, generator=g), torch.full((200, 3), 7.0)], dim=1)
    test = torch.cat(
        [test_y[:, None] * 4.0 + torch.randn(100, 1, generator=g), torch.full((100, 3), 7.5)], dim=1
    )  # differs from the training constant
    assert linear_probe(train, train_y, test, test_y) > 0.95


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"num_classes": 2}, ValueError, "num_classes=2"),
    ],
)
def test_linear_probe_errors(kwargs, error, match):
    features, labels = torch.randn(12, 3), torch.arange(12) % 3
    with pytest.raises(error, match=match):
        linear_probe(features, labels, features, labels, **kwargs)
    with pytest.raises(ValueError, match="12 rows"):
        linear_probe(features, labels[:6], features, labels)


# --------------------------------------------------------------------------- collapse


def reference_report(z):
    """std per dimension with statistics.pstdev, effective rank from numpy's SVD."""
    rows = [[a / math.sqrt(sum(b * b for b in row)) for a in row] for row in z.tolist()]
    std = statistics.fmean(statistics.pstdev(column) for column in zip(*rows))
    s = np.linalg.svd(np.array(rows), compute_uv=False)
    s = s[s > 1e-12 * s.max()]
    p = s / s.sum()
    return std, float(np.exp(-(p * np.log(p)).sum()))


def test_collapse_report_matches_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 6, generator=g) @ torch.randn(6, 10, generator=g)  # rank 6
    report = collapse_report(z)
    std, rank = reference_report(z)
    assert report["dim"] == 10
    assert report["std"] == pytest.approx(std, rel=1e-6)
    assert report["effective_rank"] == pytest.approx(rank, rel=1e-6)
    assert 1 < report["effective_rank"] <= 6


def test_constant_embeddings_warn():
    z = torch.randn(1, 64).expand(256, 64)
    with pytest.warns(RuntimeWarning, match="collapsed.*lower .*learning rate"):
        report = collapse_report(z)
    assert report["collapsed"] is True
    assert report["std"] == 0.0
    assert report["effective_rank"] == pytest.approx(1.0)
    noisy = z + 1e-3 * torch.randn(256, 64)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        assert collapse_report(noisy)["collapsed"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collapse_report(z, warn=False)["collapsed"] is True


def test_gaussian_embeddings_are_healthy():
    z = torch.randn(512, 128, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = collapse_report(z)
    assert report["collapsed"] is False
    assert report["std"] == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert report["effective_rank"] > 0.7 * 128


def test_random_init_resnet_features_are_not_collapsed():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Identity()
    g = torch.Generator().manual_seed(0)
    # smooth random images: low-resolution noise upsampled
    images = nn.functional.interpolate(torch.rand(64, 3, 8, 8, generator=g), size=32, mode="bilinear")
    features = extract_features(net, images, batch_size=32, transform=lambda x: (x - 0.45) / 0.225)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = collapse_report(features)
    assert report["collapsed"] is False and report["dim"] == 512


@pytest.mark.parametrize(
    "z, error, match",
    [
        (torch.randn(1, 8), ValueError, "at least 2"),
        (torch.randn(8), ValueError, "2-D"),
        (torch.zeros(0, 8), ValueError, "empty"),
        (torch.full((4, 8), float("inf")), ValueError, "NaN or inf"),
        (torch.ones(4, 8, dtype=torch.long), TypeError, "floating-point"),
    ],
)
def test_collapse_report_errors(z, error, match):
    with pytest.raises(error, match=match):
        collapse_report(z)


# --------------------------------------------------------------------------- features


class ModeProbe(nn.Module):
    """Conv net that records whether it ran in training mode."""

    def __init__(self, pool_output=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.drop = nn.Dropout(0.5)
        self.pool_output = pool_output
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training or self.bn.training or self.drop.training)
        y = self.drop(self.bn(self.conv(x)))  # (B, 5, H, W)
        return y.mean(dim=(2, 3)) if self.pool_output else y


def test_extract_features_eval_mode_no_grad_and_modes_restored():
    torch.manual_seed(0)
    model = ModeProbe()
    model.train()
    model.drop.eval()  # mixed modes must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    running_mean = model.bn.running_mean.clone()
    images = torch.rand(10, 3, 6, 6)

    features = extract_features(model, images, batch_size=4)

    assert model.seen_training == [False, False, False]
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(model.bn.running_mean, running_mean)
    assert features.shape == (10, 5) and features.dtype == torch.float32
    assert not features.requires_grad and features.device.type == "cpu"
    # 4-D outputs are averaged over H, W
    model.eval()
    with torch.no_grad():
        expected = model(images).mean(dim=(2, 3))
    torch.testing.assert_close(features, expected)


def test_extract_features_restores_modes_when_the_model_raises():
    class Broken(ModeProbe):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(model, torch.rand(2, 3, 4, 4))
    assert model.seen_training == [False]
    assert all(m.training for m in model.modules())


def test_extract_features_partial_and_bound_method_find_the_module():
    model = ModeProbe(pool_output=True).train()
    extract_features(functools.partial(model), torch.rand(3, 3, 4, 4))
    extract_features(model.forward, torch.rand(3, 3, 4, 4))
    assert model.seen_training == [False, False]
    assert model.training


def test_extract_features_loader_pairs_transform_and_token_pooling():
    tokens = nn.Linear(4, 6)  # (B, T, 4) -> (B, T, 6)
    data = torch.randint(0, 256, (9, 7, 4), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.arange(9)), batch_size=4)
    features = extract_features(tokens, loader, transform=lambda x: x.float() / 255)
    with torch.no_grad():
        expected = tokens(data.float() / 255).mean(dim=1)  # mean over the 7 tokens
    torch.testing.assert_close(features, expected)
    # a plain list of tensors works too, order kept
    features = extract_features(tokens, [data[:5].float() / 255, data[5:].float() / 255])
    torch.testing.assert_close(features, expected)


def test_extract_features_errors():
    model = ModeProbe(pool_output=True)
    images = torch.rand(4, 3, 4, 4)
    with pytest.raises(TypeError, match="returned a tuple.*functools.partial"):
        extract_features(lambda x: (x.flatten(1), x), images)
    with pytest.raises(ValueError, match="expected \\(B, D\\)"):
        extract_features(lambda x: x[:, 0, 0, 0], images)
    with pytest.raises(ValueError, match=r"returned one number \(a BYOL learner's loss\?\).*functools.partial"):
        extract_features(lambda x: x.sum(), images)
    with pytest.raises(ValueError, match="no images"):
        extract_features(model, images[:0])
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [])
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(model, images, batch_size=0)
    with pytest.raises(ValueError, match="model.to"):
        extract_features(model, images, device="cuda")
    with pytest.raises(TypeError, match="expected a tensor"):
        extract_features(model, [{"image": images}])
    with pytest.raises(RuntimeError, match="Hint.*uint8"):
        extract_features(model, torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_knn_accuracy_refuses_query_labels_outside_the_classes():
    features, labels = torch.eye(4), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"test_labels must lie in \[0, num_classes=2\), found values in \[-1, 1\]"):
        knn_accuracy(features, labels, features, torch.tensor([-1, 0, 1, 0]), k=2)
    with pytest.raises(ValueError, match=r"test_labels must lie in \[0, num_classes=2\).*\[0, 5\]"):
        knn_accuracy(features, labels, features, torch.tensor([5, 0, 1, 0]), num_classes=2, k=2)
    # numpy's integers count as integers (as elsewhere in the package)
    assert knn_accuracy(features, labels, features, labels, num_classes=np.int64(2), k=np.int64(1)) == 1.0
    assert knn_predict(features, labels, features, 2, k=1, temperature=np.float32(0.1)).tolist() == [0, 1, 0, 1]


def test_extract_features_refuses_labels_that_are_not_one_per_image(tmp_path):
    from PIL import Image

    from byol_pytorch.data import ImageFolder, make_loader

    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    loader = make_loader(ImageFolder(tmp_path, 8), 2, shuffle=False, drop_last=False)
    model = ModeProbe(pool_output=True)
    with pytest.raises(TypeError, match=r"ImageFolder yields \(images, skipped count\).*LabelledImageFolder"):
        extract_features(model, loader, transform=lambda x: x.float(), return_labels=True)
    assert extract_features(model, loader, transform=lambda x: x.float()).shape[0] == 5  # its images are fine
    pairs = [(torch.rand(3, 3, 4, 4), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="2 labels for a batch of 3 images"):
        extract_features(model, pairs, return_labels=True)

"""Evaluation of learned representations: features, weighted kNN, linear probe, collapse.

Every function here is pure (no global state, no global RNG) and takes plain tensors,
so the training loop, the demo and the tests can call each one on its own:

* :func:`extract_features` runs a model over images and returns (N, D) features.
* :func:`knn_predict` / :func:`knn_accuracy`: the weighted k-nearest-neighbour
  classifier that self-supervised papers use as a cheap monitor.
* :func:`linear_probe`: multinomial logistic regression on frozen features.
* :func:`collapse_report`: says whether embeddings have collapsed to a point.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._hidden import pool_hidden
from .._modules import module_device, saved_modes
from ..collapse import effective_rank as rank_of
from ..collapse import embedding_std

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "linear_probe", "collapse_report"]

# Collapsed if std < 0.005 / sqrt(D) (healthy: ~1 / sqrt(D)); measured in collapse_report.
_COLLAPSE_STD_FACTOR = 0.005


# --------------------------------------------------------------------------- checks


def _check_features(x: Any, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}; flatten or pool the features first")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; did training diverge?")


def _check_labels(y: Any, n: int, name: str) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must hold integer class indices, got {y.dtype}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries but its features have {n} rows")


def _check_label_range(y: torch.Tensor, num_classes: int, name: str) -> None:
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), found values in [{low}, {high}]")


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:  # numpy's ints too
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _infer_num_classes(*labels: torch.Tensor) -> int:
    return max(int(y.max()) for y in labels) + 1


# --------------------------------------------------------------------------- features


def _owning_module(model: Callable) -> nn.Module | None:
    """The module whose train/eval modes a callable depends on, if one can be found."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, functools.partial):
        return _owning_module(model.func)
    owner = getattr(model, "__self__", None)  # a bound method such as net.forward_features
    return owner if isinstance(owner, nn.Module) else None


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _iter_batches(data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(images, labels or None)`` per batch of a tensor or an iterable of batches / (images, labels) pairs."""
    if isinstance(data, torch.Tensor):
        if data.ndim == 0 or data.shape[0] == 0:
            raise ValueError(f"data holds no images (shape {tuple(data.shape)})")
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size], None
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tensor (N, C, H, W) or an iterable of batches, got {type(data).__name__}")
    for item in data:
        labels = None
        if isinstance(item, (tuple, list)) and item:
            item, labels = item[0], (item[1] if len(item) > 1 else None)  # (images, labels) or (images, skipped)
        if not isinstance(item, torch.Tensor):
            raise TypeError(
                f"data yielded a {type(item).__name__}; expected a tensor of images or an (images, label) pair"
            )
        yield item, labels


def _pool_output(out: Any, batch: int) -> torch.Tensor:
    if isinstance(out, (tuple, list, dict)):
        raise TypeError(
            f"the model returned a {type(out).__name__}, not one tensor; pass a callable that "
            "returns (B, D) features, e.g. functools.partial(learner, return_embedding=True, "
            "return_projection=False) for a BYOL learner"
        )
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned a {type(out).__name__}; expected a tensor")
    if out.ndim == 0:  # a BYOL learner called as it trains: its loss
        raise ValueError(
            "the model returned one number (a BYOL learner's loss?), not (B, D) features; pass "
            "functools.partial(learner, return_embedding=True, return_projection=False) for a BYOL learner"
        )
    # (B, C, H, W) average-pooled over H, W; (B, T, D) averaged over all tokens.
    out = pool_hidden(out, "mean", layer="the model", advice="Return (B, D) features")
    if out.shape[0] != batch:
        raise ValueError(f"the model returned {out.shape[0]} rows for a batch of {batch}")
    return out


def extract_features(
    model: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor | Iterable[Any],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    return_labels: bool = False,
) -> Any:
    """Runs ``model`` over images without gradients and stacks its outputs.

    The model is put in eval mode for the pass and every submodule gets its own
    ``training`` flag back afterwards, even if the pass raises. For a callable that is
    not a module, the module is found through ``functools.partial`` or a bound method;
    a lambda hides it, so put a lambda's module in eval mode yourself.

    Batches reach ``transform`` (or the model, without one) as they are, on ``device``:
    uint8 stays uint8, because a BYOL learner scales and normalises uint8 itself. For a
    bare backbone pass e.g. ``transform=lambda x: BYOLAugment.normalize(x.float() / 255)``.

    Args:
        model: an ``nn.Module`` or callable mapping a batch to (B, D) features. (B, C, H, W)
            outputs are average-pooled over H, W; (B, T, D) outputs are averaged over
            all tokens (class token included). Tuple outputs are refused.
        data: images (N, C, H, W), uint8 or float, or an iterable (e.g. a DataLoader)
            yielding image tensors or (images, label) pairs.
        batch_size: batch size when ``data`` is a tensor; a loader keeps its own.
        device: where the batches go. Default: the device of the model's parameters
            (CPU if it has none). The model is never moved.
        transform: applied to each batch on ``device`` before the model.
        return_labels: ``data`` yields ``(images, labels)`` pairs; return the labels too.

    Returns:
        Features (N, D), float32, on CPU, in the order of ``data``; with ``return_labels``,
        ``(features, labels (N,) int64)``.

    Raises:
        ValueError: ``batch_size`` not positive, empty ``data``, ``device`` other than the
            model's, or an output shape that cannot be pooled to (B, D).
        TypeError: ``data`` not a tensor or iterable of tensors, or a tuple/dict output.
    """
    _check_positive_int(batch_size, "batch_size")
    owner = _owning_module(model)
    model_device = module_device(owner)
    if device is None:
        device = model_device if model_device is not None else torch.device("cpu")
    device = torch.device(device)
    if model_device is not None and not _same_device(device, model_device):
        raise ValueError(
            f"the model is on {model_device} but device={device}; move it first with model.to({str(device)!r})"
        )

    dataset = getattr(data, "dataset", None)  # a DataLoader's
    if return_labels and getattr(dataset, "collate", None) == "images":
        raise TypeError(
            f"return_labels=True, but the loader's {type(dataset).__name__} yields (images, skipped count) "
            "batches, not labels: read labelled images (LabelledImageFolder, open_labelled) or leave return_labels"
        )
    chunks, label_chunks = [], []
    with saved_modes(owner), torch.no_grad():
        for batch, labels in _iter_batches(data, batch_size):
            if return_labels:
                if labels is None:
                    raise TypeError("return_labels=True needs data that yields (images, labels) pairs")
                label_chunks.append(torch.as_tensor(labels, dtype=torch.long).reshape(-1))
                if label_chunks[-1].numel() != batch.shape[0]:
                    raise ValueError(
                        f"data yielded {label_chunks[-1].numel()} labels for a batch of {batch.shape[0]} images; "
                        "return_labels=True needs (images, labels) batches with one label per image"
                    )
            x = batch.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            try:
                out = model(x)
            except RuntimeError as err:
                if x.is_floating_point():
                    raise
                raise RuntimeError(
                    f"{err}\nHint: the batch reached the model as {x.dtype}; a bare backbone "
                    "needs float input: pass transform=lambda x: normalize(x.float() / 255)"
                ) from err
            chunks.append(_pool_output(out, x.shape[0]).float().cpu())
    if not chunks:
        raise ValueError("data yielded no batches")
    features = torch.cat(chunks)  # (N, D)
    return (features, torch.cat(label_chunks)) if return_labels else features


# --------------------------------------------------------------------------- kNN


def _top_k(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` whose ties at the k-th place go to the lower bank index."""
    values, indices = sim.topk(k, dim=1)  # (B, k), (B, k)
    kth = values[:, -1:]  # (B, 1)
    # Rows where a neighbour as similar as the k-th one was left out: topk does not say
    # which of equal values it keeps, so order those rows by (similarity, -index).
    partial = (sim == kth).sum(dim=1) > (values == kth).sum(dim=1)  # (B,)
    if bool(partial.any()):
        rows = partial.nonzero().squeeze(1)
        sorted_sim, sorted_idx = sim[rows].sort(dim=1, descending=True, stable=True)
        values[rows], indices[rows] = sorted_sim[:, :k], sorted_idx[:, :k]
    return values, indices


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Weighted k-nearest-neighbour classification on cosine similarity.

    The classifier of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination"), whose k=20 and T=0.07 the DINO and solo-learn kNN
    monitors keep: features are L2-normalised, each query takes its k most similar bank
    entries, neighbour j votes for its class with weight exp(sim_j / T), and the class
    with the largest summed weight wins. Smaller T lets the closest neighbours dominate;
    large T approaches a plain majority vote.

    Ties are deterministic: among neighbours equally similar to the k-th one the lower
    bank indices are kept, and equal class scores go to the lowest class index
    (``argmax`` returns the first maximum). Weights are computed as
    exp((sim_j - sim_max) / T), the same ratios without overflow for any T > 0.

    Args:
        train_features: bank features (N, D).
        train_labels: bank class indices (N,) in [0, num_classes).
        test_features: query features (M, D), moved to the bank's device.
        num_classes: number of classes.
        k: neighbours per query; clipped to N when larger.
        temperature: T above, > 0.
        batch_size: queries per chunk; the similarity matrix is (batch_size, N).

    Returns:
        Predicted classes (M,), int64, on ``train_features``' device.

    Raises:
        ValueError: non-2-D, empty or non-finite features, mismatched lengths or feature
            sizes, labels out of range, k, num_classes or batch_size not positive,
            temperature not positive.
        TypeError: non-tensor inputs, or non-integer labels.
    """
    _check_features(train_features, "train_features")
    _check_features(test_features, "test_features")
    _check_labels(train_labels, train_features.shape[0], "train_labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have {train_features.shape[1]} dimensions but test_features have {test_features.shape[1]}"
        )
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(k, "k")
    _check_positive_int(batch_size, "batch_size")
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    _check_label_range(train_labels, num_classes, "train_labels")

    device = train_features.device
    bank = F.normalize(train_features.float(), dim=1)  # (N, D)
    bank_labels = train_labels.to(device).long()  # (N,)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], batch_size):
        queries = F.normalize(test_features[start : start + batch_size].to(device).float(), dim=1)
        sim = queries @ bank.T  # (B, N)
        top_sim, top_idx = _top_k(sim, k)  # (B, k), (B, k); descending
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (B, k), in (0, 1]
        scores = torch.zeros(queries.shape[0], num_classes, device=device)  # (B, C)
        scores.scatter_add_(1, bank_labels[top_idx], weights)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)  # (M,)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on labelled queries.

    Args:
        train_features: bank features (N, D).
        train_labels: bank class indices (N,).
        test_features: query features (M, D).
        test_labels: query class indices (M,).
        num_classes: number of classes; default: the largest label seen plus one.
        k: neighbours per query (Wu et al. 2018).
        temperature: vote temperature (Wu et al. 2018).

    Returns:
        The fraction of queries classified correctly, in [0, 1].

    Raises:
        ValueError, TypeError: as :func:`knn_predict`, and for ``test_labels``.
    """
    _check_features(train_features, "train_features")
    _check_features(test_features, "test_features")
    _check_labels(train_labels, train_features.shape[0], "train_labels")
    _check_labels(test_labels, test_features.shape[0], "test_labels")
    if num_classes is None:
        num_classes = _infer_num_classes(train_labels, test_labels)
    else:
        _check_positive_int(num_classes, "num_classes")
    _check_label_range(test_labels, num_classes, "test_labels")  # a query's class no prediction can be
    predictions = knn_predict(train_features, train_labels, test_features, num_classes, k=k, temperature=temperature)
    return (predictions == test_labels.to(predictions.device)).float().mean().item()


# --------------------------------------------------------------------------- linear probe


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    *,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
) -> float:
    """Test accuracy of a linear classifier trained on frozen features.

    Features are standardised with the training mean and std (dimensions constant on
    the training set are only centred). One ``nn.Linear`` minimises the mean
    cross-entropy plus ``0.5 * weight_decay * ||W||^2`` with full-batch L-BFGS
    (strong-Wolfe line search, history 10 as in SciPy's L-BFGS-B). This is multinomial
    logistic regression, a convex problem, and L-BFGS is its standard solver (the
    scikit-learn default, and the linear-probe protocol of CLIP, Radford et al. 2021):
    unlike SGD or Adam it needs no learning-rate schedule and no shuffling, and with
    ``weight_decay > 0`` the optimum is unique, so the seed barely matters. 10,000 x 512
    features, 10 classes, 100 iterations: under 5 s on one busy CPU core.
    ``weight_decay=1e-4`` equals scikit-learn's default ``C=1`` for 10,000 training
    samples; CLIP sweeps it, do so when numbers matter.

    Args:
        train_features, train_labels: the training set, features (N, D) and class indices (N,).
        test_features, test_labels: the test set, features (M, D) and class indices (M,).
        num_classes: number of classes; default: the largest label seen plus one.
        epochs: maximum L-BFGS iterations; each costs one or more full passes, and the
            solver stops earlier once the gradient or the loss stops changing.
        lr: L-BFGS step length before the line search (1 is the natural scale).
        weight_decay: L2 penalty on the weights (not the bias), >= 0.
        batch_size: rows per forward/backward chunk, to bound memory; the gradient is
            still that of the full batch. Default: all rows at once.
        seed: seeds the small random initial weights (a local generator; the global RNG
            is left alone).

    Returns:
        The fraction of test samples classified correctly, in [0, 1].

    Raises:
        ValueError, TypeError: invalid features or labels as in :func:`knn_predict`, a
            non-positive ``epochs``/``batch_size``/``lr`` or a negative ``weight_decay``.
    """
    _check_features(train_features, "train_features")
    _check_features(test_features, "test_features")
    _check_labels(train_labels, train_features.shape[0], "train_labels")
    _check_labels(test_labels, test_features.shape[0], "test_labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features have {train_features.shape[1]} dimensions but test_features have {test_features.shape[1]}"
        )
    _check_positive_int(epochs, "epochs")
    if batch_size is not None:
        _check_positive_int(batch_size, "batch_size")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if num_classes is None:
        num_classes = _infer_num_classes(train_labels, test_labels)
    _check_positive_int(num_classes, "num_classes")
    _check_label_range(train_labels, num_classes, "train_labels")
    _check_label_range(test_labels, num_classes, "test_labels")

    device = train_features.device
    x_train = train_features.float()
    mean = x_train.mean(dim=0)  # (D,)
    std = x_train.std(dim=0, unbiased=False)  # (D,)
    std = torch.where(std > 1e-6 * std.max(), std, torch.ones_like(std))
    x_train = (x_train - mean) / std  # (N, D)
    x_test = (test_features.to(device).float() - mean) / std  # (M, D)
    y_train = train_labels.to(device).long()
    y_test = test_labels.to(device).long()

    n, dim = x_train.shape
    chunk = n if batch_size is None else batch_size
    generator = torch.Generator().manual_seed(seed)
    linear = nn.utils.skip_init(nn.Linear, dim, num_classes, device=device)  # no global RNG
    with torch.no_grad():
        linear.weight.copy_(0.01 * torch.randn(num_classes, dim, generator=generator))
        linear.bias.zero_()
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=lr, max_iter=epochs, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for start in range(0, n, chunk):
            logits = linear(x_train[start : start + chunk])  # (b, C)
            loss = F.cross_entropy(logits, y_train[start : start + chunk], reduction="sum") / n
            if start == 0:
                loss = loss + 0.5 * weight_decay * linear.weight.pow(2).sum()
            loss.backward()
            total += loss.detach()
        return total

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        correct = sum(
            int((linear(x_test[start : start + chunk]).argmax(dim=1) == y_test[start : start + chunk]).sum())
            for start in range(0, x_test.shape[0], chunk)
        )
    return correct / x_test.shape[0]


# --------------------------------------------------------------------------- collapse


def collapse_report(embeddings: torch.Tensor, warn: bool = True) -> dict[str, Any]:
    """Measures how spread out embeddings are, and warns when they have collapsed.

    BYOL has no negatives, so nothing in its loss forbids mapping every input to the
    same vector; the predictor and the slow target prevent it in practice, not always.
    Two numbers, both on the L2-normalised embeddings:

    * ``std``: per-dimension standard deviation over the samples, averaged over the
      dimensions (SimSiam, Chen & He 2021, Sec. 4.1). Unit vectors spread over the
      sphere give about 1/sqrt(D); collapsed ones give about 0.
    * ``effective_rank``: exp of the entropy of the normalised singular values (Roy &
      Vetterli 2007) of the embedding matrix, uncentred as in RankMe (Garrido et al.
      2023): roughly how many directions the embeddings use, 1 for a single vector.
      Costs O(N D^2 + D^3) in float64 on the input's device; run it on a subset when that
      is too slow.

    ``collapsed`` is ``std < 0.005 / sqrt(D)``: several times below every untrained network
    measured and above a constant with 0.1% noise (the table is in docs/DESIGN.md, "The
    collapse report's bound"). No bound on ``effective_rank`` is used: untrained ResNets on
    small images already sit near 1; read it to spot dimensional collapse into a few directions.

    Args:
        embeddings: (N, D) with N >= 2, e.g. backbone features from
            :func:`extract_features`.
        warn: emit a ``RuntimeWarning`` that explains what to try when collapsed.

    Returns:
        ``{"std": float, "effective_rank": float, "dim": int, "collapsed": bool}``.

    Raises:
        ValueError: not 2-D, fewer than 2 rows, empty, or NaN/inf values.
        TypeError: not a floating-point tensor.
    """
    _check_features(embeddings, "embeddings")
    n, dim = embeddings.shape
    if n < 2:
        raise ValueError(f"collapse_report needs at least 2 embeddings, got {n}")
    z = embeddings.double()
    std = embedding_std(z).item()
    effective_rank = rank_of(z).item()

    std_bound = _COLLAPSE_STD_FACTOR / math.sqrt(dim)
    collapsed = std < std_bound
    if collapsed and warn:
        warnings.warn(
            f"the embeddings look collapsed: the std of the L2-normalised embeddings is "
            f"{std:.2e} (healthy ~1/sqrt(D) = {1 / math.sqrt(dim):.2e}, alarm below "
            f"{std_bound:.2e}) and they span {effective_rank:.2f} effective dimensions of "
            f"{min(n, dim)}. The network maps every input to nearly the same vector, so the "
            "loss can fall while the features carry no information. Try: a lower learning "
            "rate or a longer warm-up; a larger batch; checking that the two views really "
            "differ (augmentations on, not identical); keeping the predictor and giving it "
            "a larger or undecayed learning rate; a target decay tau closer to 1.",
            RuntimeWarning,
            stacklevel=2,
        )
    return {"std": std, "effective_rank": effective_rank, "dim": dim, "collapsed": collapsed}

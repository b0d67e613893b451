"""Figures of a run, written as image files: training curves and augmented views.

matplotlib is optional (``pip install 'byol-pytorch[plots]'``) and imported only when
a figure is drawn. Figures are drawn on ``matplotlib.figure.Figure`` with the Agg
canvas directly, never through ``pyplot``: no global backend is chosen or changed,
nothing opens a window, and no figure lingers in pyplot's registry.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write
from .._modules import PathLike

__all__ = ["plot_curves", "plot_views"]

_MISSING_MATPLOTLIB = "matplotlib is needed for plots: pip install matplotlib (or pip install 'byol-pytorch[plots]')"
_DPI = 100
_CURVES_SIZE = (10.0, 7.0)  # inches: 1000 x 700 px at 100 dpi
_VIEW_CELL = 2.0  # inches per image: 200 x 200 px at 100 dpi
_SMOOTHING = 0.9  # EMA factor of the smoothed loss line (TensorBoard's default slider)

Number = int | float


def _new_figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure bound to an Agg canvas, or the ImportError that says what to do."""
    try:
        import matplotlib  # noqa: F401  (imported first so a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_MISSING_MATPLOTLIB) from err
    figure = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, out_path: PathLike) -> Path:
    """Write the figure atomically in the format of the path's suffix (``.png`` added when there is none).

    Raises:
        ValueError: a suffix matplotlib cannot write, or a path that is a folder.
        OSError: the folder cannot be written (the old file, if any, is left as it was).
    """
    path = Path(out_path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    kind = path.suffix[1:].lower()
    supported = figure.canvas.get_supported_filetypes()
    if kind not in supported:
        formats = ", ".join("." + k for k in sorted(supported))
        raise ValueError(f"{path}: matplotlib cannot write .{kind} images; use a file ending in one of {formats}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass an image file such as {path / 'views.png'}")
    return atomic_write(path, lambda temp: figure.savefig(temp, dpi=_DPI, format=kind))


# --------------------------------------------------------------------------- curves


def _read_jsonl(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # a run still writing its last line
                break
            raise ValueError(
                f"{path}:{number} is not valid JSON ({err.msg}); metrics files hold one JSON object per line"
            ) from err
    return records


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have a step and a finite number under key."""
    steps, values = [], []
    for record in records:
        step, value = record.get("step"), record.get(key)
        if step is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def _ema(values: Sequence[float], factor: float) -> list[float]:
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = factor * average + (1 - factor) * value
        smoothed.append(average / (1 - factor**count))  # bias-corrected as in Adam
    return smoothed


def _empty_panel(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_projection_std(ax: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """``proj_std`` (the collapse alarm's figure), if logged, on a log axis right of the loss."""
    steps, values = _series(records, "proj_std")
    if not values:
        return
    right = ax.twinx()
    right.plot(steps, values, color="tab:red", linewidth=1.2, linestyle="--")
    if min(values) > 0:
        right.set_yscale("log")
    right.set_ylabel("projection std (collapse: falls towards 0)", color="tab:red")
    right.tick_params(axis="y", colors="tab:red")


def _plot_knn(ax: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """kNN accuracy from step 0, the untouched net's (``knn_reference``) as a labelled line; a readable axis."""
    steps, knn = _series(records, "knn_acc")
    _, references = _series(records, "knn_reference")
    ax.set_title("kNN accuracy")
    if not knn:
        _empty_panel(ax, "no kNN monitor")
        return
    ax.plot(steps, knn, color="tab:green", marker="o", linewidth=1.5, label="BYOL")
    values = list(knn)
    if references:
        reference = references[-1]
        values.append(reference)
        ax.axhline(reference, color="0.35", linestyle="--", linewidth=1.2, label=f"untouched net ({reference:.3f})")
        ax.legend(loc="best")
    low, high = min(values), max(values)
    margin = max(0.02, 0.15 * (high - low))  # one point, or a flat curve, still gets a readable band
    ax.set_ylim(max(0.0, low - margin), min(1.0, high + margin) if high <= 1.0 else high + margin)


def plot_curves(
    metrics: PathLike | Iterable[Mapping[str, Any]],
    out_path: PathLike,
    title: str | None = None,
) -> Path:
    """Draws the training curves of a run in a 2 x 2 grid.

    Panels: loss (log scale when all positive and spanning at least a decade; raw in
    light colour with a smoothed line on top once there are 20 points), kNN accuracy
    (points and line from step 0, the untouched net's ``knn_reference`` as a dashed line, the
    axis framing both; or "no kNN monitor"), learning rate, and the target decay tau.
    When logged, ``proj_std`` (the collapse alarm's per-dimension std of the online
    projections) is drawn dashed on a log axis right of the loss.
    Records without a ``step`` and values that are missing, non-numeric or non-finite
    are skipped; points are drawn in file order. The image is 1000 x 700 px (10 x 7 in
    at 100 dpi).

    Args:
        metrics: path to a ``metrics.jsonl`` (one JSON object per line with ``step`` and
            some of ``loss``, ``lr``, ``tau``, ``knn_acc``, ``knn_reference``, ``proj_std``; an unfinished last line is
            ignored), or the records themselves as dicts.
        out_path: image file to write (format from the suffix, e.g. ``.png``); parent
            folders are created.
        title: drawn above the grid.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ImportError: matplotlib is not installed.
        FileNotFoundError: ``metrics`` names a missing file.
        ValueError: a line that is not JSON, or no record with a ``step``.
        TypeError: a record that is not a dict.
    """
    if isinstance(metrics, (str, os.PathLike)):
        records = _read_jsonl(Path(metrics))
    else:
        records = list(metrics)
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(
                f"metrics record {index} is a {type(record).__name__}; "
                "expected a dict such as {'step': 10, 'loss': 0.5}"
            )
    if not any(record.get("step") is not None for record in records):
        raise ValueError("no metrics record has a 'step'; nothing to plot")

    figure = _new_figure(_CURVES_SIZE)
    (ax_loss, ax_knn), (ax_lr, ax_tau) = figure.subplots(2, 2, squeeze=False)

    steps, loss = _series(records, "loss")
    if loss:
        if len(loss) >= 20:
            ax_loss.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="raw")
            ax_loss.plot(steps, _ema(loss, _SMOOTHING), color="tab:blue", linewidth=2, label="smoothed")
            ax_loss.legend(loc="upper right")
        else:
            ax_loss.plot(steps, loss, color="tab:blue", linewidth=1.5, marker=".")
        if min(loss) > 0 and max(loss) / min(loss) >= 10:
            ax_loss.set_yscale("log")
    else:
        _empty_panel(ax_loss, "no loss logged")
    ax_loss.set_title("loss")
    _plot_projection_std(ax_loss, records)

    _plot_knn(ax_knn, records)

    for ax, key, label, color in (
        (ax_lr, "lr", "learning rate", "tab:orange"),
        (ax_tau, "tau", "target decay tau", "tab:purple"),
    ):
        steps, values = _series(records, key)
        if values:
            ax.plot(steps, values, color=color, linewidth=1.5, marker="." if len(values) < 20 else None)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        else:
            _empty_panel(ax, f"no {key} logged")
        ax.set_title(label)

    last = max((float(r["step"]) for r in records if isinstance(r.get("step"), (int, float))), default=0.0)
    for ax in (ax_loss, ax_knn, ax_lr, ax_tau):
        if ax.has_data():
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            ax.set_xlim(-0.03 * max(last, 1.0), max(last, 1.0) * 1.03)  # every panel from step 0 to the last
    if title:
        figure.suptitle(title)
    return _save(figure, out_path)


# --------------------------------------------------------------------------- views


def _as_images(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (B, C, H, W), got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)  # one image (C, H, W)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} must be (B, C, H, W) with B >= 1, got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)}; channels first)")
    return x.detach().cpu()


def _per_channel(
    values: Number | Sequence[Number] | torch.Tensor | None, channels: int, name: str
) -> torch.Tensor | None:
    if values is None:
        return None
    out = torch.as_tensor(values, dtype=torch.float32).flatten()
    if out.numel() not in (1, channels):
        raise ValueError(f"{name} has {out.numel()} values for {channels}-channel views")
    return out.expand(channels).reshape(channels, 1, 1)  # (C, 1, 1)


def _displayable(images: torch.Tensor, mean: Any | None, std: Any | None) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1]: integers scaled by 1/255, floats un-normalised."""
    if not images.is_floating_point():
        return images.float().div(255).clamp(0, 1)
    images = images.float()
    channels = images.shape[1]
    std_t, mean_t = _per_channel(std, channels, "std"), _per_channel(mean, channels, "mean")
    if std_t is not None:
        images = images * std_t
    if mean_t is not None:
        images = images + mean_t
    return images.clamp(0, 1)


def plot_views(
    originals: torch.Tensor,
    view1: torch.Tensor,
    view2: torch.Tensor,
    out_path: PathLike,
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    max_images: int = 8,
) -> Path:
    """Draws images next to their two augmented views, one row per image.

    Columns: original | view 1 | view 2. Float views are un-normalised as
    ``view * std + mean`` per channel, then clipped to [0, 1]; uint8 inputs are divided
    by 255. Each image fills a 2 x 2 in cell, so ``r = min(B, max_images)`` rows give a
    600 x (200 r) px image at 100 dpi.

    Args:
        originals: (B, C, H, W) or (C, H, W), uint8 or float in [0, 1], C in {1, 3};
            the size may differ from the views'.
        view1: first views, (B, C, h, w), float as produced by the augmentation, or uint8.
        view2: second views, like ``view1``.
        out_path: image file to write (format from the suffix); parent folders created.
        mean: per-channel mean (one number or C numbers) the views were normalised with,
            e.g. from ``BYOLAugment.resolve_mean_std``. ``None``: no shift.
        std: per-channel std the views were normalised with. ``None``: no scaling.
        max_images: at most this many rows.

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: shapes that are not (B, C, H, W) with C in {1, 3}, batches of
            different sizes, mean/std of the wrong length, ``max_images`` not positive.
        TypeError: inputs that are not tensors.
    """
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images <= 0:
        raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
    batches = [_as_images(originals, "originals"), _as_images(view1, "view1"), _as_images(view2, "view2")]
    sizes = [batch.shape[0] for batch in batches]
    if len(set(sizes)) != 1:
        raise ValueError(f"originals, view1 and view2 hold {sizes} images; they must match")
    rows = min(sizes[0], max_images)
    columns = [
        _displayable(batches[0][:rows], None, None),
        _displayable(batches[1][:rows], mean, std),
        _displayable(batches[2][:rows], mean, std),
    ]

    figure = _new_figure((3 * _VIEW_CELL, rows * _VIEW_CELL))
    axes = figure.subplots(rows, 3, squeeze=False)
    for col, title in enumerate(("original", "view 1", "view 2")):
        axes[0, col].set_title(title)
    for row in range(rows):
        for col, images in enumerate(columns):
            image = images[row]  # (C, H, W)
            ax = axes[row, col]
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")  # (H, W, 3)
            ax.set_axis_off()
    return _save(figure, out_path)

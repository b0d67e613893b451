"""What a training run reports: metrics.jsonl, TensorBoard, the progress bar, the kNN monitor.

``RUNDIR/metrics.jsonl`` gets one JSON object per logged step (``step``, ``epoch``,
``loss``, ``lr``, ``tau``, ``img_per_s``, ``time_s``, ``skipped_files``, and ``knn_acc``
when the monitor ran). Only rank 0 writes. A resumed run keeps the rows up to the
checkpoint's step and appends after them.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

__all__ = ["MetricsLog", "KnnMonitor", "split_labelled", "plot_curves_or_warn", "warn"]


def warn(message: str) -> None:
    """One warning line on stderr, prefixed like the command's errors."""
    print(f"byol-pytorch: warning: {message}", file=sys.stderr, flush=True)


def plot_curves_or_warn(metrics_path: Path, out_path: Path) -> None:
    """Draw ``curves.png`` from metrics.jsonl; one warning line when matplotlib is missing."""
    try:
        from .plots import plot_curves

        plot_curves(str(metrics_path), str(out_path))
    except ImportError as error:
        hint = "pip install matplotlib" if "matplotlib" in str(error) else "the plots module is missing"
        warn(f"curves.png skipped: {error} ({hint})")
    except (OSError, ValueError) as error:  # the run's results are saved: never fail here
        warn(f"curves.png skipped: {error}")


class MetricsLog:
    """Appends metric rows to ``RUNDIR/metrics.jsonl`` and, optionally, TensorBoard.

    Args:
        run_dir: the run folder.
        resume_step: keep the existing rows with ``step <= resume_step`` (None: start
            a new file).
        tensorboard: also write TensorBoard scalars under ``RUNDIR/tensorboard``.
        enabled: False on ranks other than 0 (nothing is written).

    Raises:
        ValueError: TensorBoard was asked for but is not installed.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = False, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut by a crash
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (numbers rounded for reading; non-finite values as strings)."""
        if not self.enabled:
            return
        clean = {
            k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else (str(v) if isinstance(v, float) else v))
            for k, v in row.items()
        }
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, global_step=int(row["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def split_labelled(root: str, load_size: int, channels: int) -> tuple[Any, Any]:
    """A labelled folder as (bank, queries) for the kNN monitor.

    ``ROOT/train`` + ``ROOT/val`` (or ``ROOT/test``), each with class sub-folders, are
    used as they are. Otherwise ``ROOT/CLASS/...`` is split per class: every fifth image
    (in file order) is a query, the others form the bank - the same split every time.

    Args:
        root: the labelled folder.
        load_size: side of the images handed out.
        channels: 1 or 3.

    Returns:
        ``(bank, queries)`` datasets yielding ``(uint8 (C, S, S), label)``.

    Raises:
        ValueError: no class sub-folders, or a class with too few images to split.
    """
    from .data import LabelledImageFolder

    base = Path(root)
    names = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
    held_out = "val" if "val" in names else ("test" if "test" in names else None)
    if "train" in names and held_out is not None:
        return (
            LabelledImageFolder(base / "train", load_size, channels),
            LabelledImageFolder(base / held_out, load_size, channels),
        )
    full = LabelledImageFolder(root, load_size, channels)
    seen: dict[int, int] = {}
    bank, queries = [], []
    for index, label in enumerate(full.targets):
        seen[label] = seen.get(label, 0) + 1
        (queries if seen[label] % 5 == 0 else bank).append(index)
    if not queries:
        raise ValueError(f"{root!r} has too few images per class for a kNN check (at least 5 per class)")
    return Subset(full, bank), Subset(full, queries)


def _labels(dataset) -> torch.Tensor:
    if isinstance(dataset, Subset):
        return torch.tensor([dataset.dataset.targets[i] for i in dataset.indices])
    return torch.tensor(dataset.targets)


class KnnMonitor:
    """Weighted kNN accuracy of the online backbone on a labelled folder (``--val-data``).

    Features are the learner's embeddings (``learner(x, return_embedding=True,
    return_projection=False)``) of uint8 images, normalised like the training views,
    extracted in eval mode; modes are restored after.

    Args:
        root: the labelled folder (see ``split_labelled``).
        load_size: side of the images: the training crop size.
        channels: images' channels (the backbone's).
        device: where features are computed.
        batch_size: images per forward.
        workers: loader processes.
    """

    def __init__(
        self, root: str, load_size: int, channels: int, device: torch.device, batch_size: int = 256, workers: int = 0
    ):
        self.bank, self.queries = split_labelled(root, load_size, channels)
        self.bank_labels, self.query_labels = _labels(self.bank), _labels(self.queries)
        self.num_classes = int(max(self.bank_labels.max(), self.query_labels.max())) + 1
        self.device, self.batch_size, self.workers = device, batch_size, workers

    def _features(self, learner: nn.Module, dataset) -> torch.Tensor:
        from .evaluate import extract_features

        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
        channels = getattr(learner, "channels", 3)

        def to_channels(images: torch.Tensor) -> torch.Tensor:  # gray into an N-channel net
            return images if images.shape[1] == channels else images[:, :1].expand(-1, channels, -1, -1)

        embed = functools.partial(learner, return_embedding=True, return_projection=False)
        return extract_features(embed, loader, device=self.device, transform=to_channels)  # (N, D)

    def features(self, learner: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bank_features, bank_labels, query_features, query_labels)`` of the learner's backbone."""
        return (
            self._features(learner, self.bank),
            self.bank_labels,
            self._features(learner, self.queries),
            self.query_labels,
        )

    def __call__(self, learner: nn.Module) -> float:
        """The kNN top-1 accuracy in [0, 1] of the queries against the bank."""
        from .evaluate import knn_accuracy

        bank, bank_labels, queries, query_labels = self.features(learner)
        return float(knn_accuracy(bank, bank_labels, queries, query_labels, self.num_classes))

"""What a training run records: metrics.jsonl, TensorBoard, curves.png at the end.

``RUNDIR/metrics.jsonl`` gets one JSON object per logged step (``step``, ``epoch``,
``loss``, ``lr``, ``tau``, ``img_per_s``, ``time_s``, ``skipped_files``, and ``knn_acc``
when the monitor ran). Only rank 0 writes. A resumed run keeps the rows up to the
checkpoint's step and appends after them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import warn

__all__ = ["MetricsLog", "plot_curves_or_warn"]


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

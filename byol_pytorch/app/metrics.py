"""What a training run records: metrics.jsonl, TensorBoard, Weights & Biases, curves.png at the end.

``RUNDIR/metrics.jsonl`` gets one JSON object per logged step (``step``, ``epoch``,
``loss``, ``lr``, ``tau``, ``img_per_s``, ``time_s``, ``skipped_files``, and ``knn_acc``
when the monitor ran). ``time_s`` counts from this invocation's start (a resumed run starts
again at 0); ``img_per_s`` is over the interval since the last row, a kNN evaluation in it
included. Only rank 0 writes. A resumed run keeps the rows up to the
checkpoint's step and appends after them.

With ``--wandb`` the same rows go to a W&B run (its config: the run's recipe and flags);
``close`` adds curves.png and views.png. The run's id is kept in ``RUNDIR/wandb_run_id``,
so that a resumed training run continues the same W&B run (``resume="allow"``). W&B's
files go to ``RUNDIR/wandb`` unless ``WANDB_DIR`` is set; ``WANDB_MODE=offline`` needs
no network (``wandb sync`` uploads later).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_write, names_the_file
from .errors import warn

__all__ = ["WANDB_ID_FILE", "MetricsLog", "draw_views_or_warn", "plot_curves_or_warn", "wandb_options"]

WANDB_ID_FILE = "wandb_run_id"
_WANDB_MISSING = "--wandb needs the wandb package: pip install 'byol-pytorch[wandb]'"


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


def wandb_options(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any] | None:
    """The W&B settings of ``--wandb`` (project, run name, config), or None without the flag."""
    if not getattr(args, "wandb", False):
        return None
    name = Path(str(getattr(args, "out", "run"))).resolve().name
    return {"project": getattr(args, "wandb_project", None) or "byol-pytorch", "name": name, "config": dict(config)}


def draw_views_or_warn(dataset: Any, learner: Any, out_path: Path, count: int = 8) -> Path:
    """``views.png``: the first ``count`` training images beside the learner's two views; warns on failure.

    The views are drawn under a forked generator, so the run's random state is untouched.
    """
    import torch

    try:
        from .plots import plot_views

        count = min(count, len(dataset))
        originals = torch.stack([dataset[i][0] for i in range(count)]).to(next(learner.parameters()).device)
        # manual_seed reseeds every GPU's generator too: fork them all (the CPU's alone on the CPU).
        gpus = list(range(torch.cuda.device_count())) if originals.is_cuda else []
        with torch.random.fork_rng(devices=gpus), torch.no_grad():
            torch.manual_seed(0)
            one, two = learner.augment1(originals), learner.augment2(originals)
        mean, std = learner.augment1.resolve_mean_std(originals.shape[1])
        plot_views(originals.cpu(), one.cpu(), two.cpu(), str(out_path), mean, std, max_images=count)
    except (ImportError, OSError, ValueError, AttributeError, TypeError, RuntimeError) as error:
        warn(f"views.png skipped: {error}")
    return out_path


class _WandbSink:
    """One W&B run: rows as history at their step, pictures at the end."""

    def __init__(self, run_dir: Path, options: dict[str, Any], resuming: bool):
        try:
            import wandb
        except ImportError:
            raise ValueError(_WANDB_MISSING) from None
        self.wandb = wandb
        self.id_file = run_dir / WANDB_ID_FILE
        run_id = self.id_file.read_text(encoding="utf-8").strip() if resuming and self.id_file.is_file() else ""
        self.new_id = not run_id
        if self.new_id:
            run_id = uuid.uuid4().hex[:8]  # W&B's id alphabet: lower-case letters and digits
        self.run_id = run_id
        try:
            self.run = wandb.init(
                project=options["project"],
                name=options.get("name"),
                id=run_id,
                resume="allow",
                config=options.get("config") or {},
                dir=os.environ.get("WANDB_DIR") or str(run_dir),
            )
        except Exception as error:  # wandb's own errors (no login, no network) are not ours to show as a traceback
            raise ValueError(
                f"--wandb: W&B could not start ({type(error).__name__}: {error}); run 'wandb login', or set "
                "WANDB_MODE=offline to log locally and 'wandb sync' later"
            ) from error

    def keep_id(self) -> None:
        """Write a new run's id for ``--resume``: called once every sink has started (a refused start leaves none)."""
        if self.new_id:
            atomic_write(self.id_file, lambda path: Path(path).write_text(self.run_id + "\n", encoding="utf-8"))
            self.new_id = False

    def abandon(self) -> None:
        """Finish the W&B run of a start that failed after W&B had started (another sink refused)."""
        self.run.finish(exit_code=1)

    def log(self, row: dict[str, Any]) -> None:
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=int(row["step"]))

    def close(self, pictures: Sequence[Path]) -> None:
        images = {p.stem: self.wandb.Image(str(p)) for p in pictures if Path(p).is_file()}
        if images:
            self.run.log(images)
        self.run.finish()


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _image_array(path: Path) -> Any:
    """An image file as an (H, W, 3) uint8 array (what ``SummaryWriter.add_image`` takes)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class MetricsLog:
    """Appends metric rows to ``RUNDIR/metrics.jsonl`` and, optionally, TensorBoard.

    Args:
        run_dir: the run folder.
        resume_step: keep the existing rows with ``step <= resume_step`` (None: start
            a new file).
        tensorboard: also write TensorBoard scalars under ``RUNDIR/tensorboard``; what a
            crashed run logged after ``resume_step`` (all of it, for a new start) is purged.
        enabled: False on ranks other than 0 (nothing is written).
        wandb: W&B settings from ``wandb_options`` (``project``, ``name``, ``config``), or
            None for no W&B run.

    Raises:
        ValueError: TensorBoard or W&B was asked for but is not installed.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        tensorboard: bool = False,
        enabled: bool = True,
        wandb: dict[str, Any] | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        self.last_step = resume_step or 0  # the pictures' step at close(): the last row's
        self.wandb_run: _WandbSink | None = None
        if not enabled:
            return
        # Every sink that can refuse opens before the first write into the run folder.
        summary_writer = _summary_writer_class() if tensorboard else None
        if wandb is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.wandb_run = _WandbSink(self.path.parent, wandb, resuming=resume_step is not None)
        try:
            self._open_files(resume_step, summary_writer)
        except BaseException:
            if self.wandb_run is not None:
                sink, self.wandb_run = self.wandb_run, None
                sink.abandon()
            raise
        if self.wandb_run is not None:
            self.wandb_run.keep_id()

    def _open_files(self, resume_step: int | None, summary_writer: Any) -> None:
        """metrics.jsonl (the rows up to ``resume_step`` kept) and the TensorBoard writer."""
        kept: list[str] = []
        old = self.path.read_bytes() if self.path.exists() else None
        if resume_step is not None and old is not None:
            for line in old.decode("utf-8", errors="replace").splitlines():
                try:
                    step = json.loads(line).get("step", math.inf)
                    if isinstance(step, (int, float)) and not isinstance(step, bool) and step <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut by a crash, or edited into something else
        text = "".join(line + "\n" for line in kept)
        if old != text.encode("utf-8"):
            atomic_write(self.path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))  # never half-written
        if summary_writer is not None:
            # Events a crashed run logged past the kept rows (or a run started again) are hidden from TensorBoard.
            purge = resume_step + 1 if resume_step is not None else 0
            self.writer = summary_writer(log_dir=str(self.path.parent / "tensorboard"), purge_step=purge)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (numbers rounded for reading; non-finite values as strings)."""
        if not self.enabled:
            return
        clean = {
            k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else (str(v) if isinstance(v, float) else v))
            for k, v in row.items()
        }
        with names_the_file(self.path), self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        if isinstance(row.get("step"), int):
            self.last_step = max(self.last_step, row["step"])
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, global_step=int(row["step"]))
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(row)

    def close(self, pictures: Sequence[Path] = ()) -> None:
        """Give TensorBoard and W&B the ``pictures`` that exist (curves.png, views.png); close both."""
        if self.writer is not None:
            for picture in pictures:
                if Path(picture).is_file():
                    image = _image_array(Path(picture))
                    self.writer.add_image(Path(picture).stem, image, global_step=self.last_step, dataformats="HWC")
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            sink, self.wandb_run = self.wandb_run, None
            sink.close(pictures)

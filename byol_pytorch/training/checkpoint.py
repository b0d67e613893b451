"""Checkpoints: atomic writes, ``weights_only`` loading, RNG state.

A training checkpoint is a plain dict that ``torch.load(path, map_location="cpu",
weights_only=True)`` reads (no pickled classes, so loading a file cannot run code; a GPU
run's tensors are saved on its GPU, so ``map_location`` on a machine without it)::

    format      "byol_pytorch"           (how we recognise our files)
    version     1
    step        optimizer steps done      epoch, batch_in_epoch: the data position
    learner     BYOL state_dict: online net, projector, predictor, target, ema_step
    optimizer   optimizer state_dict      scheduler, scaler: their state_dicts
    rng         torch CPU/CUDA, numpy and python generator states (tensors and numbers)
    args        the run's arguments, a plain dict of str/int/float/bool/None

A file is written to a temporary file in the same folder, flushed to disk, then
renamed over the old one (``os.replace`` is atomic on POSIX and Windows): a crash or a
kill while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import STALE_TEMP_SECONDS, atomic_write, remove_stale_temps
from .._modules import PathLike

__all__ = [
    "FORMAT",
    "VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "atomic_write",
    "remove_stale_temps",
    "load_state",
    "require_entries",
    "TRAINING_KEYS",
    "STALE_TEMP_SECONDS",
]

FORMAT = "byol_pytorch"
VERSION = 1


def _torch_save(obj: Any, temp: str) -> None:
    # Through a Python file object, so that a full disk raises OSError(ENOSPC) rather
    # than torch's "[enforce fail at inline_container.cc] unexpected pos" RuntimeError.
    with open(temp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as error:  # the zip writer's own check masks the OSError
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None


def save_checkpoint(path: PathLike, obj: dict[str, Any]) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (temp file in the same folder + rename).

    Args:
        path: destination, e.g. ``RUNDIR/last.pt``.
        obj: the checkpoint dict; ``format`` and ``version`` are added when missing.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written (e.g. ``ENOSPC``, ``EROFS``); an earlier
            file at ``path`` is left intact.
    """
    obj = {"format": FORMAT, "version": VERSION, **obj}
    return atomic_write(path, lambda temp: _torch_save(obj, temp))


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints with ``torch.load(..., weights_only=True)``.

    Args:
        path: the ``.pt`` file.
        map_location: where tensors go (default the CPU).

    Returns:
        The checkpoint dict (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a byol_pytorch checkpoint (not a torch file, a damaged or
            truncated one, holds objects a weights-only load refuses, or a dict without our
            ``format``), or comes from a newer version.
    """
    path = Path(path)
    if path.is_dir():
        inside = " (it holds last.pt: pass that)" if (path / "last.pt").is_file() else ""
        raise ValueError(
            f"checkpoint {str(path)!r} is a folder{inside}; pass RUNDIR/last.pt written by 'byol-pytorch train'"
        )
    if not path.is_file():
        run = path.parent / "metrics.jsonl"
        if path.name == "last.pt" and run.is_file():  # a run folder whose run has not saved yet
            raise FileNotFoundError(
                f"checkpoint {str(path)!r} does not exist: the run in {str(path.parent)!r} has saved none yet, or "
                "it was moved (train saves every --checkpoint-every steps, at its end, and when stopped by SIGTERM "
                "or Ctrl-C)"
            )
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # junk bytes reach the weights-only unpickler's KeyError, IndexError, struct.error, ...
        with open(path, "rb") as handle:
            zipped = handle.read(4) == b"PK\x03\x04"  # what torch.save writes
        if zipped and not zipfile.is_zipfile(path):  # its end (the zip's directory) is missing: cut short
            raise ValueError(
                f"{str(path)!r} is not a byol_pytorch checkpoint that loads: a PyTorch file damaged or cut short "
                "(a copy or a save that did not finish?); restore it, or move it aside and start the run again "
                "(train refuses to write over a last.pt) or --resume from an earlier copy"
            ) from None
        raise ValueError(
            f"{str(path)!r} is not a byol_pytorch checkpoint (not a PyTorch file that loads with "
            "weights_only=True); pass RUNDIR/last.pt written by 'byol-pytorch train'"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = "a dict without our 'format' key" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(
            f"{str(path)!r} is not a byol_pytorch checkpoint (it holds {what}); pass RUNDIR/last.pt "
            "written by 'byol-pytorch train'"
        )
    counts = {key: obj[key] for key in _COUNTS if key in obj and (obj[key] is not None or key == "version")}
    bad = [key for key, value in counts.items() if not isinstance(value, int) or isinstance(value, bool) or value < 0]
    if bad:
        raise ValueError(
            f"{str(path)!r} holds {bad[0]}={counts[bad[0]]!r}, not a count: the checkpoint was edited or written by "
            "another program"
        )
    if obj.get("version", 0) > VERSION:
        raise ValueError(
            f"{str(path)!r} is a checkpoint of format version {obj['version']}, newer than this "
            f"byol_pytorch reads ({VERSION}); upgrade byol-pytorch"
        )
    return obj


_COUNTS = ("version", "step", "epoch", "batch_in_epoch", "total_steps", "warmup_steps", "dataset_size", "world_size")


TRAINING_KEYS = ("step", "epoch", "batch_in_epoch", "total_steps", "learner", "optimizer", "scheduler", "rng", "args")
"""The entries a checkpoint needs to resume training from it."""


def require_entries(checkpoint: Mapping[str, Any], keys: Sequence[str], path: PathLike) -> None:
    """Check that ``checkpoint`` holds every entry of ``keys``.

    Args:
        checkpoint: a dict from ``load_checkpoint``.
        keys: the entries needed (e.g. ``TRAINING_KEYS``).
        path: the file, named in the message.

    Raises:
        ValueError: naming the missing entries.
    """
    missing = [key for key in keys if checkpoint.get(key) is None]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no {', '.join(repr(k) for k in missing)} entr{'y' if len(missing) == 1 else 'ies'} "
            "(a truncated, edited or foreign checkpoint); pass RUNDIR/last.pt written by 'byol-pytorch train' "
            "(or, for train --resume, start a new run without it)"
        )


def load_state(target: Any, checkpoint: Mapping[str, Any], key: str, path: PathLike) -> None:
    """``target.load_state_dict(checkpoint[key])``, with a ``ValueError`` when they do not fit.

    The one place where a checkpoint's learner, optimiser or scheduler state is loaded:
    a missing entry, tensors of other sizes or missing/unexpected keys become one
    message naming the file and what to do.

    Args:
        target: an ``nn.Module``, optimiser, scheduler or grad scaler.
        checkpoint: a dict from ``load_checkpoint``.
        key: its entry to load (``"learner"``, ``"optimizer"``...).
        path: the file, named in the message.

    Raises:
        ValueError: the entry is missing or does not fit ``target``.
    """
    require_entries(checkpoint, [key], path)
    try:
        target.load_state_dict(checkpoint[key])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise ValueError(
            f"{str(path)!r}: its {key!r} state does not fit the model its own recipe builds ({type(error).__name__}: "
            f"{detail}); the file was edited or written by another version: use another checkpoint (or, for "
            "train --resume, start a new run without it)"
        ) from error


# ---------------------------------------------------------------------- RNG state
def get_rng_state() -> dict[str, Any]:
    """Every global generator's state in a form ``torch.load(weights_only=True)`` reads.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {...}, "python": {...}}``.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys).astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from ``get_rng_state()``'s dict (CUDA states when CUDA exists)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda][: torch.cuda.device_count()])
    np_state = state.get("numpy")
    if np_state:
        np.random.set_state(
            (
                np_state["name"],
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["gauss"],
            )
        )
    py_state = state.get("python")
    if py_state:
        random.setstate((py_state["version"], tuple(int(v) for v in py_state["internal"].tolist()), py_state["gauss"]))

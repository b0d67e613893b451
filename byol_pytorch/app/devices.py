"""The ``--device`` of every command: parsed and checked before anything runs, one error line otherwise."""

from __future__ import annotations

import torch

from .errors import UserError

__all__ = ["resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device NAME`` names, checked to exist here; the default: cuda when available, else cpu.

    Args:
        name: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ... or None (``auto`` too) for the default.

    Returns:
        The device. A GPU named by its index (``cuda:N``) becomes the current CUDA device,
        so that what uses the current one (pinned memory of the loaders, cuDNN's handles)
        does not open a context on GPU 0 as well.

    Raises:
        UserError: a name PyTorch does not parse, or a device this machine does not have
            (no CUDA, a GPU index past the last, no MPS), with the fix.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was given but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        if device.index is not None:
            torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} was given but MPS is not available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: byol-pytorch runs on cpu, cuda or mps; use one of them")
    return device

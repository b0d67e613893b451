"""The oldest torch the package runs on, checked when it is imported: one clear message instead of a deep error.

The code calls ``torch.is_autocast_enabled(device_type)`` (torch 2.4), ``torch.amp.GradScaler(device)``
(2.3) and ``torch.compiler.is_compiling`` (2.3); setup.py asks for ``torch>=2.4`` too, but an
environment can hold an older torch installed by other means.
"""

from __future__ import annotations

import re

import torch

__all__ = ["MIN_TORCH", "require_torch"]

MIN_TORCH = (2, 4)


def require_torch(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the fix when ``version`` (default: the installed torch's) is too old.

    Examples:
        >>> require_torch("2.14.1+cu130")
        >>> require_torch("2.1.0")
        Traceback (most recent call last):
        ImportError: byol_pytorch needs torch >= 2.4, found 2.1.0: pip install -U "torch>=2.4"
    """
    found = torch.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", found)
    if match is not None and (int(match[1]), int(match[2])) < MIN_TORCH:
        floor = ".".join(map(str, MIN_TORCH))
        raise ImportError(f'byol_pytorch needs torch >= {floor}, found {found}: pip install -U "torch>={floor}"')

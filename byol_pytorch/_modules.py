"""Small facts about ``nn.Module`` objects that several parts of the package need.

* ``module_device``: where a module's tensors live;
* ``saved_modes``: a context that gives every submodule its own ``training`` flag back;
* ``deepcopy_module``: a deep copy of a module that holds computed tensors as plain attributes;
* ``kept_through_apply``: a buffer of run state that ``.to`` moves and ``to_empty`` does not wipe;
* ``PathLike``: what the package accepts as a file or folder name; ``user_path``: one as a ``Path``.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn

__all__ = [
    "PathLike",
    "deepcopy_module",
    "inside_folder",
    "kept_through_apply",
    "module_device",
    "module_device_dtype",
    "saved_modes",
    "switch",
    "user_path",
]

PathLike = str | os.PathLike
"""A file or folder name: ``str`` or ``pathlib.Path``."""


def user_path(path: PathLike) -> Path:
    """``path`` as a ``Path``, a leading ``~`` expanded (as torchvision's datasets and the shell do)."""
    return Path(os.path.expanduser(os.fspath(path)))


def inside_folder(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` (written yet or not) is ``folder`` or lies under it, links resolved."""
    try:
        return user_path(path).resolve().is_relative_to(user_path(folder).resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


_M = TypeVar("_M", bound=nn.Module)


def deepcopy_module(module: _M) -> _M:
    """``copy.deepcopy(module)``, the weight a ``weight_norm`` / ``spectral_norm`` hook computed copied detached.

    The hook forms of ``torch.nn.utils.weight_norm`` and ``spectral_norm`` keep the weight they
    compute as a plain attribute; while it carries its graph, ``copy.deepcopy`` refuses the
    module ("Only Tensors created explicitly by the user (graph leaves) support the deepcopy
    protocol"). Their hook computes it again from the copied parameters at every forward, so a
    detached copy of its value is what the copy needs. Any other computed attribute (a tied
    view, ``self.wt = self.fc.weight.t()``) is refused as before: a detached copy of it would
    stop following its parameter.

    Examples:
        >>> layer = torch.nn.utils.weight_norm(nn.Linear(2, 2))
        >>> layer.weight.is_leaf, deepcopy_module(layer).weight.is_leaf
        (False, True)
    """
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    memo: dict[int, object] = {}
    for sub in module.modules():
        for hook in sub._forward_pre_hooks.values():
            value = vars(sub).get(hook.name) if isinstance(hook, (WeightNorm, SpectralNorm)) else None
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def kept_through_apply(before: torch.Tensor, after: torch.Tensor, initial: float) -> torch.Tensor:
    """A non-persistent buffer of run state (a flag, a counter) after ``Module._apply``: its own values on
    ``after``'s device, in its own dtype.

    ``_apply`` gives buffers ``fn(buffer)``; ``to_empty`` (models built on the meta device)
    makes that uninitialised memory, and no ``load_state_dict`` fills a buffer that is not
    saved. A buffer that held no values (on the meta device) starts at ``initial``.

    Examples:
        >>> kept_through_apply(torch.tensor([1.0, 2.0]), torch.empty(2), 0.0)
        tensor([1., 2.])
        >>> kept_through_apply(torch.ones(2, device="meta"), torch.empty(2), 0.0)
        tensor([0., 0.])
    """
    if before.is_meta:
        return torch.full_like(before, initial, device=after.device)
    return before.to(after.device)


def module_device(module: nn.Module | None) -> torch.device | None:
    """The device of the first parameter (else buffer) of ``module``; None when it holds none.

    Args:
        module: any module, or None.

    Returns:
        The device, or None for a module without tensors (or None).

    Examples:
        >>> module_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    if module is not None:
        for tensor in [*module.parameters(), *module.buffers()][:1]:
            return tensor.device
    return None


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the first floating parameter or buffer (CPU, float32 when none).

    Args:
        module: any module.

    Returns:
        ``(device, dtype)`` an input for ``module`` should have.
    """
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@contextlib.contextmanager
def saved_modes(module: nn.Module | None, eval_mode: bool = True) -> Iterator[None]:
    """Put ``module`` in eval mode (optionally) and restore every submodule's flag after.

    ``module.train(mode)`` sets one flag for the whole tree; a user's net may mix them
    (a frozen BatchNorm in eval mode inside a training net). This context records each
    submodule's flag and gives it back on exit, also when the body raises, through the
    module's own ``train()`` where the flag differs (some models override it).

    Args:
        module: the module (None: nothing to do).
        eval_mode: call ``module.eval()`` on entry.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with saved_modes(net):
        ...     net[0].training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in module.modules()] if module is not None else []  # parents first
    try:
        if module is not None and eval_mode:
            module.eval()
        yield
    finally:
        for m, mode in modes:  # train() runs a module's own override; children are set after parents
            if m.training != mode:
                m.train(mode)


def switch(name: str, value: object) -> bool:
    """``value`` if it is True or False; else a ``TypeError`` naming ``name`` (1, "no" and None are not switches)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def whole_number(name: str, value: object, least: int, why: str = "", floats: bool = False) -> int:
    """``value`` as an int of at least ``least`` (Python and NumPy integers, not bools; with ``floats``, also
    floats that are whole numbers, as ``1e5`` is).

    Raises:
        TypeError: not a whole number (``2.5``, ``"4"``, ``None``, ``True``; ``4.0`` unless ``floats``), naming
            ``name``.
        ValueError: below ``least``, naming ``name`` (and ``why``, a parenthesis after the bound).
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        if floats and isinstance(value, float) and value.is_integer():
            value = int(value)
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})") from None
    if number < least:
        raise ValueError(f"{name} must be at least {least}{why}, got {number}")
    return number

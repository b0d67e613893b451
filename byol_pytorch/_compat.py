"""Module paths of 1.1.0 that moved in 1.2.0: they keep working for one release, with a DeprecationWarning.

``import byol_pytorch.checkpoint`` (or ``from byol_pytorch.cli import main``) is answered by a
finder that ``byol_pytorch/__init__.py`` installs: a path that moved as a whole is the new module
itself; a 1.1.0 module whose names went to several places is a new module object that takes
each name from where it lives now. Either way the import warns once, naming the new path.
The table holds strings only, so the layers below ``byol_pytorch`` import nothing through it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "install"]

REMOVAL = "1.3.0"
# old path -> new module, or {name: new module} for a 1.1.0 module whose names moved apart
MOVED: dict[str, str | dict[str, str]] = {
    "byol_pytorch.cli": "byol_pytorch.app.cli",
    "byol_pytorch.train": "byol_pytorch.app.train",
    "byol_pytorch.demo": "byol_pytorch.app.demo",
    "byol_pytorch.plots": "byol_pytorch.app.plots",
    "byol_pytorch.fashion_mnist": "byol_pytorch.app.fashion_mnist",
    "byol_pytorch.evaluate": "byol_pytorch.training.evaluate",
    "byol_pytorch.models": "byol_pytorch.training.models",
    "byol_pytorch.optim": {
        "lr_help": "byol_pytorch.app.recipe",
        "*": "byol_pytorch.training.optim",
    },
    "byol_pytorch.trainer": "byol_pytorch.training.trainer",
    "byol_pytorch.checkpoint": {
        "export_backbone": "byol_pytorch.training.models",
        "*": "byol_pytorch.training.checkpoint",
    },
    "byol_pytorch.loop": {
        "EpochSampler": "byol_pytorch.data.sampling",
        "step_batches": "byol_pytorch.data.sampling",
        "ignore_signals_in_worker": "byol_pytorch.data.loader",
        "match_channels": "byol_pytorch.data.folder",
        "DistContext": "byol_pytorch.training.distributed",
        "setup_distributed": "byol_pytorch.training.distributed",
        "*": "byol_pytorch.training.engine",
    },
    "byol_pytorch.monitor": {
        "MetricsLog": "byol_pytorch.app.metrics",
        "plot_curves_or_warn": "byol_pytorch.app.metrics",
        "warn": "byol_pytorch.app.errors",
        "*": "byol_pytorch.training.validation",
    },
}


def _where(old: str) -> str:
    target = MOVED[old]
    return target if isinstance(target, str) else ", ".join(sorted(set(target.values())))


def _stacklevel() -> int:
    """The warning's stack level: the first frame outside the import machinery and this module.

    ``warnings.warn`` itself does not count importlib's bootstrap frames, so neither does this.
    """
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and (frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename):
        name = frame.f_code.co_filename
        frame = frame.f_back
        if not ("importlib" in name and "_bootstrap" in name):
            level += 1
    return level


class _SplitModule(types.ModuleType):
    """A 1.1.0 module whose names now live in several modules: each name read from its new home."""

    def __init__(self, name: str, table: dict[str, str]) -> None:
        super().__init__(name, f"Deprecated alias: the names of 1.1.0's {name} (see byol_pytorch._compat).")
        self._table = table

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        module = importlib.import_module(self._table.get(attr, self._table["*"]))
        try:
            return getattr(module, attr)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}") from None


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        warnings.warn(
            f"{spec.name} moved in byol_pytorch 1.2.0 to {_where(spec.name)}; the old path is removed in "
            f"{REMOVAL}: import from the new one",
            DeprecationWarning,
            stacklevel=_stacklevel(),
        )
        target = MOVED[spec.name]
        if isinstance(target, str):
            return importlib.import_module(target)  # the module itself: its functions, classes and state
        return _SplitModule(spec.name, target)

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # already complete


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
    """Answer the moved paths (idempotent)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())

"""The peer: lucidrains/byol-pytorch, installed in isolation and loaded by file path.

The peer's distribution shares our import name (``byol_pytorch``) and its package
``__init__`` imports ``accelerate`` (for its trainer). So it is installed with
``pip install --no-deps --target .bench/peer byol-pytorch==0.9.1`` and only its model file,
``byol_pytorch/byol_pytorch.py``, is executed, under the module name ``peer_byol``: our
package is never shadowed and ``accelerate`` is never imported.

That file imports torch, torchvision and einops (not beartype nor kornia, although the
distribution lists beartype). einops is installed into ``.bench/peer/_deps`` as well when
it is missing, and that folder is appended (never prepended) to ``sys.path``.

What 0.9.1's ``BYOL`` does differently from ours, for reading the tables:

* ``use_simplicial_embeddings`` defaults to True: a ``Linear(d, 256) -> BatchNorm1d ->
  softmax over groups of 8`` (Lavoie et al. 2022) in front of the projector. "vanilla"
  below turns it off, which is the paper's BYOL.
* Both views go through the backbone as one concatenated batch of 2B (BatchNorm
  statistics shared by the two views); the paper (and ours) forwards each view alone.
* Its default augmentation is SimCLR-like and drawn once per batch, not per image:
  ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.3, grayscale 0.2, flip 0.5, 3x3 blur
  sigma U[1, 2] with p 0.2, then RandomResizedCrop to the image size, ImageNet
  normalisation; the same pipeline for both views, on float input in [0, 1].
* The constructor runs one forward pass on random data (it moves the BatchNorm
  statistics of the user's net) to create its heads lazily.
* Its EMA replaces every ``param.data`` with ``old * beta + (1 - beta) * new``: three
  temporaries per tensor, one tensor at a time.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch.nn as nn

from benchmarks.common import REPO

__all__ = ["PEER_DIR", "PEER_VERSION", "PeerUnavailable", "load_peer", "load_peer_or_skip", "make_peer", "peer_version"]

PEER_DIR = REPO / ".bench" / "peer"
PEER_VERSION = "0.9.1"
MODULE_NAME = "peer_byol"
VARIANTS = ("vanilla", "defaults")


class PeerUnavailable(RuntimeError):
    """The peer is not installed and could not be installed (e.g. no network)."""


def _pip(args: list, what: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--no-input",
        "--retries",
        "0",
        "--timeout",
        "15",
        *args,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PeerUnavailable(f"could not install {what}: {error}") from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise PeerUnavailable(f"could not install {what} with `{' '.join(cmd)}` (no network?): {' | '.join(tail)}")


def peer_version(target: Path = PEER_DIR) -> str | None:
    """The installed peer's version from its dist-info folder, or None when absent."""
    infos = sorted(target.glob("byol_pytorch-*.dist-info"))
    return infos[-1].name[len("byol_pytorch-") : -len(".dist-info")] if infos else None


def install_peer(target: Path = PEER_DIR, version: str = PEER_VERSION) -> Path:
    """Install ``byol-pytorch==version`` into `target` unless it is already there.

    Returns:
        The path of the peer's model file, ``target/byol_pytorch/byol_pytorch.py``.

    Raises:
        PeerUnavailable: pip failed (typically no network) or the file is missing afterwards.
    """
    source = target / "byol_pytorch" / "byol_pytorch.py"
    if not source.is_file() or peer_version(target) != version:
        target.mkdir(parents=True, exist_ok=True)
        _pip(["--upgrade", "--target", str(target), f"byol-pytorch=={version}"], f"byol-pytorch=={version}")
    if not source.is_file():
        raise PeerUnavailable(f"{source} is missing after installing byol-pytorch=={version}")
    try:
        import einops  # noqa: F401  (the peer's only import we might lack)
    except ImportError:
        deps = target / "_deps"
        if not (deps / "einops").is_dir():
            _pip(["--target", str(deps), "einops"], "einops (a dependency of the peer)")
        if str(deps) not in sys.path:
            sys.path.append(str(deps))  # peer deps: appended, never prepended, so nothing of ours is shadowed
    return source


def load_peer(target: Path = PEER_DIR, install: bool = True) -> ModuleType:
    """The peer's ``byol_pytorch/byol_pytorch.py`` as the module ``peer_byol``.

    Args:
        target: the isolated install folder.
        install: run pip when the peer is missing; False raises instead.

    Raises:
        PeerUnavailable: not installed (and `install` is False or pip failed).
    """
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    source = target / "byol_pytorch" / "byol_pytorch.py"
    if install:
        source = install_peer(target)
    elif not source.is_file():
        raise PeerUnavailable(f"the peer is not installed in {target}")
    spec = importlib.util.spec_from_file_location(MODULE_NAME, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[MODULE_NAME]
        raise
    return module


def load_peer_or_skip(what: str = "") -> tuple[ModuleType | None, str]:
    """The peer module and the note a results table prints about it, or None and why not.

    Args:
        what: words after the version in the note, e.g. ``"(vanilla)"``.

    Returns:
        ``(module, "Peer: ... loaded from ...")``, or ``(None, "Peer rows skipped: ...")``
        (also printed to stderr) when it cannot be installed or loaded.
    """
    try:
        peer = load_peer()
    except PeerUnavailable as error:
        note = f"Peer rows skipped: {error}"
        print(note, file=sys.stderr)
        return None, note
    words = f" {what}" if what else ""
    return peer, f"Peer: lucidrains/byol-pytorch {peer_version()}{words} loaded from `.bench/peer`."


def make_peer(peer: ModuleType, net: nn.Module, image_size: int, variant: str = "vanilla", **kwargs) -> nn.Module:
    """The peer's BYOL around `net`.

    Args:
        peer: the module returned by :func:`load_peer`.
        net: the backbone (already on its device).
        image_size: the side of the views.
        variant: ``"vanilla"`` (``use_simplicial_embeddings=False``, the paper's BYOL) or
            ``"defaults"`` (the peer's own defaults, simplicial embeddings on).
        **kwargs: passed on to the peer's constructor.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "vanilla":
        kwargs.setdefault("use_simplicial_embeddings", False)
    return peer.BYOL(net, image_size=image_size, **kwargs)

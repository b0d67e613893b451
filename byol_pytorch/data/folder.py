"""Image folders for pretraining and evaluation: scan, fast decode, broken-file skipping.

Every image leaves here as a ``uint8`` tensor ``(C, S, S)``: the shorter side resized to
``S`` and the centre cropped to a square. Augmentation happens later, batched on the
device (``augment.py``), so the workers only decode and resize.

A broken file (unreadable, truncated, empty, or not an image at all) never stops a run:
the dataset hands out the next readable file instead and reports how many it passed
over. Worker processes do not share memory, so that count travels with each sample and
``collate_images`` sums it per batch; the training loop adds the batches up and warns.
"""

from __future__ import annotations

import contextlib
import io
import numbers
import operator
import os
import stat
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .._modules import PathLike, user_path, whole_number
from .file_index import (
    IMAGE_EXTENSIONS,
    RUN_FOLDER_FILES,
    FileIndex,
    NoImagesError,
    TarsBesideImagesWarning,
    check_folder,
    index_images,
    is_run_folder,
    warn_run_folders,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "PIXEL_LIMIT_ENV",
    "BrokenImageError",
    "LargeImageWarning",
    "apply_pixel_limit",
    "NoReadableImagesError",
    "FileIndex",
    "index_images",
    "load_image",
    "decode_image",
    "read_or_next",
    "ImageFolder",
    "LabelledImageFolder",
    "loose_images",
    "load_size_for",
    "match_channels",
]

LOAD_RATIO = 256 / 224
"""Images are loaded at 8/7 of the crop side, as ImageNet's 256 px -> 224 px crops."""


# What a damaged or mislabelled file makes Pillow raise: UnidentifiedImageError and
# "image file is truncated" are OSErrors; some plugins raise SyntaxError, EOFError or
# struct.error on garbage; DecompressionBombError guards against absurd sizes.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WIDE_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}  # one channel, more than 8 bits
PIXEL_LIMIT_ENV = "BYOL_PYTORCH_MAX_IMAGE_PIXELS"
"""The most pixels an image may have (0: no limit); Pillow's decompression-bomb guard refuses more.

Unset, Pillow's own limit holds: 178,956,970 pixels (twice ``PIL.Image.MAX_IMAGE_PIXELS``).
"""
# Pillow's docs for Image.resize: "With reducing_gap greater or equal to 3.0, the result
# is indistinguishable from fair resampling in most cases."
_REDUCING_GAP = 3.0
_EXIF_ORIENTATION = 0x0112


class NoReadableImagesError(RuntimeError):
    """Not one file of a dataset can be read (e.g. the folder was removed during a run)."""


class BrokenImageError(Exception):
    """A file that cannot be decoded as an image; the datasets catch it and substitute.

    Attributes:
        path: the file.
        reason: what Pillow reported.
        too_large: the image is whole but has more pixels than Pillow's decompression-bomb
            limit allows (``PIXEL_LIMIT_ENV`` raises it).
    """

    def __init__(self, path: Path, reason: str, too_large: bool = False) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason
        self.too_large = too_large


class LargeImageWarning(UserWarning):
    """An image over Pillow's decompression-bomb limit was passed over (once per process)."""


_large_warned = False


_applied_limit: str | None = None  # the PIXEL_LIMIT_ENV text this process applied
_pillow_limit = Image.MAX_IMAGE_PIXELS  # Pillow's own, put back when the variable is unset again


def apply_pixel_limit() -> None:
    """``PIXEL_LIMIT_ENV``, when set, becomes Pillow's limit in this process (a module global; 0: none).

    Every dataset calls it when it is built (so a bad value stops there, with the variable named, before
    any loader worker starts); decoding applies a good value again in a process that did not build one.

    Raises:
        ValueError: the value is not a whole number >= 0.
    """
    global _applied_limit
    text = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not text and _applied_limit is not None:  # unset again (a notebook, a test): Pillow's own limit
        Image.MAX_IMAGE_PIXELS, _applied_limit = _pillow_limit, None
    if not text or text == _applied_limit:
        return
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{PIXEL_LIMIT_ENV}={text!r}: give a whole number of pixels, or 0 for no limit")
    # Pillow refuses more than twice its global: half of N, exact (a float for an odd N), refuses N + 1.
    Image.MAX_IMAGE_PIXELS = (value // 2 if value % 2 == 0 else value / 2) or None  # type: ignore[assignment]
    _applied_limit = text


def _warn_large(error: BrokenImageError) -> None:
    """The first image over the pixel limit in this process gets a warning naming it and the fix."""
    global _large_warned
    if _large_warned:
        return
    _large_warned = True
    warnings.warn(
        f"{error.path} is passed over like an unreadable file: {error.reason}. If your images really are this "
        f"large, set {PIXEL_LIMIT_ENV} to a higher pixel count (0: no limit; each decode then needs about 3 bytes "
        "per pixel of memory in every loader worker), or downscale them",
        LargeImageWarning,
        stacklevel=3,
    )


def _holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` is a ``byol-pytorch`` run folder (``file_index.is_run_folder``; a few stats, no listing)."""
    return is_run_folder(name for name in RUN_FOLDER_FILES if (folder / name).is_file())


def _is_hidden(name: str) -> bool:
    """Hidden by the OS's rule (``.name``), macOS's archive leftovers (``__MACOSX``) or a file system's own
    folder (``lost+found``): never a class."""
    return name.startswith(".") or name in ("__MACOSX", "lost+found")


def check_load_size(load_size: int, channels: int) -> None:
    """Every dataset's check of its size and channels, at construction (not at the first read, in a worker).

    Raises:
        TypeError: ``load_size`` or ``channels`` is not an int (a float, a str, a bool).
        ValueError: ``load_size`` below 1, or ``channels`` neither 1 nor 3.
    """
    for name, value in (("load_size", load_size), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a whole number (an int), got {value!r} ({type(value).__name__})")
    if load_size < 1:
        raise ValueError(f"load_size must be a positive number of pixels, got {load_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)  # follows links; a broken one raises
    except (OSError, ValueError):
        return False


def _to_eight_bit(im: Image.Image, bits: int | None = None) -> Image.Image:
    """One wide grayscale channel scaled to "L", rounded; negative and non-finite values read as 0.

    16-bit modes ("I;16*") scale 0..65535, and so does integer "I", which Pillow also uses for
    16-bit files (PGM, and PNG in older Pillow versions). Only a file that declares 32 bits
    (``bits``: a TIFF's BitsPerSample) has no range to go by: there, and for float "F", the
    image's maximum picks the smallest that holds it: floats up to 2 are 0..1 (clipped: a
    resampled 0..1 image overshoots a little), values within 0..255 are kept as they are,
    within 0..65535 they scale like 16 bits. Values above 65535 scale by their own maximum.
    """
    values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    peak = float(values.max()) if values.size else 0.0
    if im.mode == "F" and peak <= 2.0:
        full = 1.0
    elif im.mode == "F" or (im.mode == "I" and bits == 32):
        full = next((r for r in (255.0, 65535.0) if peak <= r), peak)
    else:
        full = max(65535.0, peak)
    return Image.fromarray(np.rint(np.minimum(values, full) * (255.0 / full)).astype(np.uint8))


def _declared_bits(im: Image.Image) -> int | None:
    """The bits per sample a TIFF declares (None for other formats, or when it does not say)."""
    tags = getattr(im, "tag_v2", None)
    value = tags.get(258) if tags is not None else None
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)


def _convert(im: Image.Image, mode: str, bits: int | None = None) -> Image.Image:
    """Convert any Pillow mode to "L" or "RGB"; transparency is composited over white.

    White, not dropping alpha: the colour under a transparent pixel is arbitrary (often
    black), while white is how such images (icons, product shots) are normally seen.
    """
    if im.mode in _WIDE_MODES:
        im = _to_eight_bit(im, bits)
    elif _has_alpha(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im if im.mode == mode else im.convert(mode)


def load_image(path: PathLike, load_size: int, channels: int = 3) -> torch.Tensor:
    """Decode one image, resize its shorter side to ``load_size`` and centre-crop a square.

    Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``Image.draft``) while
    the shorter side stays at least ``load_size``, so a 4000x3000 photo costs a fraction
    of a full decode. The EXIF orientation is applied. Grayscale, palette, CMYK and
    16-bit images are converted (16-bit grayscale values scaled by 255/65535, not clipped;
    Pillow decodes a 16-bit colour PNG to 8 bits itself, keeping each sample's high byte);
    transparency is composited over white. The resize is antialiased bilinear.

    Args:
        path: the image file.
        load_size: side ``S`` of the square output.
        channels: 1 (grayscale "L") or 3 ("RGB").

    Returns:
        ``uint8`` tensor ``(channels, load_size, load_size)``.

    Raises:
        ValueError: ``load_size`` or ``channels`` is invalid.
        BrokenImageError: the file is empty, truncated, corrupt or not an image.
    """
    check_load_size(load_size, channels)
    path = Path(path)
    if not _is_regular(str(path)):  # a FIFO would block open() forever; a device never ends
        raise BrokenImageError(path, "not a regular file (missing, a FIFO, socket, device or broken link)")
    return _decode(path, path, load_size, channels)


def decode_image(data: bytes, load_size: int, channels: int = 3, name: str = "<bytes>") -> torch.Tensor:
    """``load_image`` for an image held in memory (a tar member, a dataset's bytes column).

    Args:
        data: the encoded image (JPEG, PNG, ...).
        load_size: side ``S`` of the square output.
        channels: 1 (grayscale "L") or 3 ("RGB").
        name: what a ``BrokenImageError`` calls the image (e.g. ``shard.tar:key``).

    Returns:
        ``uint8`` tensor ``(channels, load_size, load_size)``, exactly what ``load_image``
        returns for a file holding ``data``.

    Raises:
        ValueError: ``load_size`` or ``channels`` is invalid.
        BrokenImageError: the bytes are empty, truncated, corrupt or not an image.

    Examples:
        >>> import io
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (40, 30), "red").save(buffer, format="PNG")
        >>> decode_image(buffer.getvalue(), 8).shape
        torch.Size([3, 8, 8])
    """
    check_load_size(load_size, channels)
    return _decode(io.BytesIO(data), Path(name), load_size, channels)


def _decode(source: Path | io.BytesIO, path: Path, load_size: int, channels: int) -> torch.Tensor:
    """The decode, orientation, conversion, resize and crop of ``load_image`` / ``decode_image``."""
    mode = "L" if channels == 1 else "RGB"
    with contextlib.suppress(ValueError):  # a bad value stops every dataset's construction, not a read
        apply_pixel_limit()
    try:
        with Image.open(source) as im:
            # Only JPEG acts on draft; the scale keeps both sides >= load_size.
            im.draft(mode, (load_size, load_size))
            im.load()  # decode now: a truncated file raises here
            bits = _declared_bits(im)  # before a transpose, which leaves the file's tags behind
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            im = _convert(im, mode, bits)
            width, height = im.size
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            im = im.resize(
                (load_size, load_size),
                Image.Resampling.BILINEAR,
                box=(left, top, left + side, top + side),
                reducing_gap=_REDUCING_GAP,
            )
            pixels = np.array(im, dtype=np.uint8)  # (S, S) or (S, S, 3), a writable copy
    except Image.DecompressionBombError as error:
        broken = BrokenImageError(path, str(error).rstrip("."), too_large=True)
        _warn_large(broken)  # whatever reads it: training, embed, eval, shards make
        raise broken from error
    except _DECODE_ERRORS as error:
        raise BrokenImageError(path, f"{type(error).__name__}: {error}") from error
    if pixels.ndim == 2:
        return torch.from_numpy(pixels).unsqueeze(0)  # (1, S, S)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, S, S)


def read_or_next(
    index: int, n: int, read: Callable[[int], torch.Tensor], broken: set[int], what: str
) -> tuple[torch.Tensor, int, int]:
    """Item ``index`` of ``n``, or the next readable one when it is broken: the substitution rule.

    Items ``index``, ``index + 1``, ... (wrapping around) are read with ``read`` until one
    does not raise ``BrokenImageError``; each broken one is added to ``broken`` (kept per
    process, so it is passed over without another read).

    Returns:
        ``(image, index actually read, skipped)``: ``skipped`` is 1 when item ``index`` itself
        is broken, else 0. A broken item is counted at its own position only, not again where
        it is passed over on the way to another's substitute, so a pass over every index
        counts each broken item once.

    Raises:
        IndexError: ``index`` outside ``[-n, n)``.
        NoReadableImagesError: no item at all can be read (``"none of the {n} " + what``).
    """
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} items")
    last_error = None
    for skipped in range(n):
        j = (index + skipped) % n
        if j in broken:
            continue
        try:
            return read(j), j, int(skipped > 0)
        except BrokenImageError as error:
            broken.add(j)
            last_error = error
    raise NoReadableImagesError(f"none of the {n} {what}" + (f"; the last error: {last_error}" if last_error else ""))


class _ImageFiles(Dataset):
    """The files of a ``FileIndex`` loaded with ``load_image``; broken ones are substituted.

    ``paths`` is the index itself (``paths[i]`` is a ``Path``), never a list: its two
    numpy arrays are shared by DataLoader workers instead of copied into each.
    """

    def __init__(self, root: PathLike, paths: FileIndex, load_size: int, channels: int) -> None:
        check_load_size(load_size, channels)
        apply_pixel_limit()
        self.root = Path(root)
        self.paths = paths
        self.load_size = load_size
        self.channels = channels
        # Indices found broken in this process (each worker keeps its own): they are
        # passed over without being decoded again, and still counted at their own index.
        self._broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def passed_over(self) -> int:
        """Entries the scan did not keep because they are not regular files (``FileIndex.passed_over``)."""
        return self.paths.passed_over

    def sample_id(self, index: int) -> str:
        """The file's path relative to the root."""
        return self.paths.relative(index)

    def read(self, index: int) -> torch.Tensor:
        """File ``index``'s image, or ``BrokenImageError`` (no substitution)."""
        return load_image(self.paths[index], self.load_size, self.channels)

    def _load(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Returns (image, index actually loaded, 1 if file ``index`` is broken else 0)."""
        return read_or_next(
            index,
            len(self.paths),
            lambda j: load_image(self.paths[j], self.load_size, self.channels),
            self._broken,
            f"image files under {str(self.root)!r} could be read",
        )


class ImageFolder(_ImageFiles):
    """Every image under a folder, without labels, for self-supervised pretraining.

    Args:
        root: folder searched recursively with ``index_images``.
        load_size: side ``S`` of the square images handed out.
        channels: 1 or 3.
        index: the folder's index when it is already known (from ``load_or_scan``, or
            sent by another rank); None scans ``root``.

    Raises:
        ValueError: see ``index_images``; or an invalid ``load_size``/``channels``, or an
            ``index`` of another folder than ``root``.
        TypeError: ``load_size`` or ``channels`` not an int, or ``index`` not a ``FileIndex``.

    ``dataset[i]`` returns ``(image, skipped)``: a ``uint8`` tensor ``(C, S, S)``, and 1 when
    file ``i`` is broken, else 0 (a broken file ``i`` is replaced by file ``i+1``, ``i+2``,
    ... wrapping around, the first readable one; a pass over every ``i`` counts each broken
    file once). ``NoReadableImagesError`` (a ``RuntimeError``) when no file at all can be read.

    Attributes:
        paths: the ``FileIndex`` of the files; ``paths[i]`` is file ``i``'s ``Path``.
        passed_over: entries the scan did not keep because they are not regular files
            (FIFOs, sockets, devices, broken links); see ``FileIndex.passed_over``.
    """

    def __init__(self, root: PathLike, load_size: int, channels: int = 3, index: FileIndex | None = None) -> None:
        root = user_path(root)
        if index is None:
            index = index_images(root)
        elif not isinstance(index, FileIndex):
            raise TypeError(
                f"index must be a FileIndex (from index_images or load_or_scan), got {type(index).__name__}"
            )
        elif not _same_folder(index.root, root):  # the index's own root is what is read
            raise ValueError(
                f"index is of the folder {str(index.root)!r}, not of root {os.fspath(root)!r}: pass "
                "index_images(root) (or load_or_scan's index of it)"
            )
        super().__init__(root, index, load_size, channels)

    collate = "images"  # items are (image, skipped): make_loader batches them with collate_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _, skipped = self._load(index)
        return image, skipped


def _same_folder(one: PathLike, other: PathLike) -> bool:
    try:
        return os.path.samefile(one, other)  # through links
    except (OSError, ValueError):
        return os.path.abspath(one) == os.path.abspath(other)


def loose_images(root: PathLike) -> list[str]:
    """The names of the images directly in a labelled folder, beside its class sub-folders: no class's."""
    with os.scandir(user_path(root)) as entries:
        return sorted(
            entry.name
            for entry in entries
            if not _is_hidden(entry.name)
            and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            and entry.is_file()
        )


def _warn_loose_images(root: Path) -> None:
    """Images beside the class sub-folders belong to no class: one warning says they are left out."""
    loose = loose_images(root)
    if loose:
        shown = ", ".join(map(repr, loose[:3])) + (", ..." if len(loose) > 3 else "")
        warnings.warn(
            f"{len(loose)} image(s) directly in {str(root)!r} belong to no class and are left out ({shown}); "
            "a labelled folder holds ROOT/CLASS_NAME/image.jpg",
            stacklevel=3,
        )


def _warn_shared_class_folders(root: Path, names: Sequence[str]) -> None:
    """Class sub-folders that hold the same images through links (one folder linked twice, a link to the root or
    into another class): those images count once per class, under each label."""

    def within(inner: str, outer: str) -> bool:
        return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)

    top, real = os.path.realpath(root), [(os.path.realpath(root / name), name) for name in names]
    overlaps: list[str] = []
    enclosing: list[tuple[str, str]] = []  # the folders (real path, name) that hold the one looked at, innermost last
    for path, name in sorted(real):  # a holder before its insides
        while enclosing and not within(path, enclosing[-1][0]):
            enclosing.pop()
        if enclosing:  # the innermost one that holds it (sorted: n log n for 21k classes, not every pair)
            overlaps.append(f"{enclosing[-1][1]!r} and {name!r}")
        enclosing.append((path, name))
    overlaps += [f"{name!r} and the root" for path, name in real if within(top, path)]
    if overlaps:
        named = "; ".join(overlaps[:3]) + ("; ..." if len(overlaps) > 3 else "")
        warnings.warn(
            f"class sub-folders of {str(root)!r} hold the same images through links ({named}): those images count "
            "in each of those classes, under each label; link each class to a folder of its own",
            stacklevel=3,
        )


class LabelledImageFolder(_ImageFiles):
    """Images in one sub-folder per class (``ROOT/CLASS_NAME/.../image.jpg``), for evaluation.

    Class indices follow the sorted sub-folder names; hidden sub-folders and files lying
    directly in ``root`` are ignored. A broken file is replaced like in ``ImageFolder``,
    and the label is the substitute's own.

    Args:
        root: the folder holding the class sub-folders.
        load_size: side ``S`` of the square images handed out.
        channels: 1 or 3.
        classes: the class names to number by (a held-out split's labels must mean its
            training split's classes, ``classes=train.classes``); None: the sub-folders here.
            Every sub-folder must be one of them; a class without a sub-folder, or with an
            empty one, has no images.

    Raises:
        ValueError: ``root`` is missing, has no class sub-folders, or a class sub-folder
            has no images, or is not among ``classes``; or an invalid ``load_size``/``channels``.

    Attributes:
        classes: class names; ``classes[label]`` names a label.
        targets: the label of every file, in ``paths`` order.
        passed_over: entries of the class sub-folders that are not regular files (FIFOs,
            sockets, devices, broken links), as in ``ImageFolder``.

    ``dataset[i]`` returns ``(image, label)``: a ``uint8`` tensor ``(C, S, S)`` and an int.
    """

    def __init__(self, root: PathLike, load_size: int, channels: int = 3, classes: Sequence[str] | None = None) -> None:
        root_path = user_path(root)
        check_folder(root_path)
        found = sorted(entry.name for entry in root_path.iterdir() if entry.is_dir() and not _is_hidden(entry.name))
        runs = [name for name in found if _holds_a_run(root_path / name)]  # its curves are no class
        if runs:
            warn_run_folders(root_path, runs)
            found = [name for name in found if name not in runs]
        if not found:
            raise ValueError(f"{str(root_path)!r} has no class sub-folders; expected ROOT/CLASS_NAME/image.jpg")
        _warn_loose_images(root_path)
        _warn_shared_class_folders(root_path, found)
        names = list(found) if classes is None else list(classes)
        unknown = [name for name in found if name not in names]
        if unknown:
            raise ValueError(
                f"{str(root_path)!r} has classes the training split lacks ({', '.join(map(repr, unknown[:5]))}); "
                "a held-out split's class sub-folders must be among the training split's"
            )
        parts: list[tuple[str, FileIndex]] = []
        for name in found:
            try:
                with warnings.catch_warnings():  # a class folder's archives are no shards a user meant to pass
                    warnings.simplefilter("ignore", TarsBesideImagesWarning)
                    parts.append((name, index_images(root_path / name)))
            except ValueError as error:
                if classes is not None and isinstance(error, NoImagesError):
                    continue  # a held-out split's empty class folder: the class has no images, as without one
                raise ValueError(f"class {name!r} is empty: {error}; put its images in it, or remove it") from None
        if not parts:
            raise ValueError(
                f"{str(root_path)!r} has class sub-folders but no images in any of them; put each class's images "
                "in its sub-folder (ROOT/CLASS_NAME/image.jpg)"
            )
        found = [name for name, _ in parts]
        super().__init__(root_path, FileIndex.concat(root_path, parts), load_size, channels)
        self.classes = names
        # int32 labels in one array (not a list of ints: workers would copy it, see FileIndex)
        numbers = np.array([names.index(name) for name in found], dtype=np.int32)
        self._labels = np.repeat(numbers, [len(part) for _, part in parts])

    @property
    def targets(self) -> list[int]:
        """The label of every file, in ``paths`` order (a new list)."""
        return self._labels.tolist()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, used, _ = self._load(index)
        return image, int(self._labels[used])


def load_size_for(image_size: int | tuple[int, int]) -> int:
    """The side images are loaded at for views of ``image_size``: ``image_size * 256 / 224``, rounded.

    Images load as squares: for views of (height, width) the longer side counts.

    Examples:
        >>> load_size_for(224), load_size_for(32), load_size_for(8), load_size_for((32, 48))
        (256, 37, 9, 55)
    """
    given = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size,)
    try:
        if not 1 <= len(given) <= 2 or any(isinstance(s, bool) for s in given):
            raise TypeError
        sides = [operator.index(s) for s in given]  # an int, or a numpy integer
    except TypeError:
        raise TypeError(f"image_size must be a side (int) or (height, width) of ints, got {image_size!r}") from None
    if min(sides) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    side = max(sides)
    return max(side, round(side * LOAD_RATIO))


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L")


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) images with ``channels`` channels.

    RGB to one channel is the luma Pillow's ``convert("L")`` gives (ITU-R 601: 0.299 R + 0.587 G +
    0.114 B; uint8 stays uint8, rounded), and to two that luma twice; to more channels, the first
    (gray) is replicated, as a view (``expand``: clone it before an in-place edit), the input a net
    of more channels than the data's trains on.

    Raises:
        ValueError: any other conversion to fewer channels (RGBA to RGB), which has no one meaning;
            images not (B, C, H, W); channels below 1.
        TypeError: images not a tensor, channels not a whole number.

    Examples:
        >>> match_channels(torch.zeros(2, 1, 4, 4), 3).shape
        torch.Size([2, 3, 4, 4])
        >>> match_channels(torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1), 1).item()
        76
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"match_channels takes a torch tensor, got {type(images).__name__} (numpy: torch.from_numpy)")
    if images.ndim != 4:
        raise ValueError(
            f"match_channels expects images (B, C, H, W), got {tuple(images.shape)}: add a batch dimension (x[None])"
        )
    channels = whole_number("channels", channels, 1, " (the net's input channels)")
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 3 and channels < 3:  # images load with 3 channels for a net of 2 (--in-chans 2)
        weights = torch.tensor(_LUMA, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        gray = (images.float() * weights).sum(dim=1, keepdim=True)
        gray = gray.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else gray.to(images.dtype)
        return gray.expand(-1, channels, -1, -1)
    if images.shape[1] > channels:  # a probe: RGBA became its red channel three times over
        raise ValueError(
            f"match_channels makes more channels of the first, or fewer of RGB, not {channels} of "
            f"{images.shape[1]}: convert the images first (RGBA to RGB: composite the alpha, or drop it with x[:, :3])"
        )
    return images[:, :1].expand(-1, channels, -1, -1)

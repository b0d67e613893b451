"""The two augmented views of BYOL, every random parameter drawn per sample, batched on the device.

Defaults are Table 6 of Grill et al. 2020, "Bootstrap your own latent" (arXiv 2006.07733). Each op
is a pure function of the batch and per-sample parameter tensors, following the semantics of
`torchvision.transforms.v2` on float images in [0, 1] (tested against it image by image), with no
Python loop over the batch and no host-device sync, so `BYOLAugment` compiles without graph breaks.

Design notes:
    * Crop, resize and flip are two batched matmuls, ``rows @ x @ cols^T``, by per-sample
      interpolation matrices. The kernel is the paper's bicubic, widened by the shrink factor when
      a crop is shrunk (antialiasing, like PIL and torchvision's default ``antialias=True``); as a
      matrix it costs what bilinear would. The result is clipped to [0, 1] like PIL's.
    * Colour jitter keeps torchvision's per-sample random order exactly. Brightness, contrast and
      saturation are all ``clamp(a x + b mean(gray) + c gray, 0, 1)``, so one batched "blend" step
      runs whichever of them a sample needs. Hue (the costly RGB -> HSV -> RGB) runs once per
      batch: each sample's ops before hue are right-aligned into 3 blend steps and those after it
      left-aligned into 3 more: 6 cheap blends and 1 hue round trip instead of 4.
    * Gaussian blur is separable: two matmuls by per-sample matrices with reflect padding folded in.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INTERPOLATIONS",
    "PAPER_SIDE",
    "PRESETS",
    "AugmentParams",
    "BYOLAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "gaussian_blur",
    "resized_crop",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
    "view_settings",
]

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, the weights torchvision uses
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_DEFAULTS = dict(  # Grill et al. 2020, Table 6 (identical for both views)
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip_p=0.5,
    jitter_p=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    grayscale_p=0.2,
    blur_sigma=(0.1, 2.0),
    blur_kernel_frac=0.1,
    interpolation="bicubic",
    mean=None,
    std=None,
    normalize=True,
)
_VIEW_DEFAULTS = {1: dict(blur_p=1.0, solarize_p=0.0), 2: dict(blur_p=0.1, solarize_p=0.2)}  # Table 6
PAPER_SIDE = 224
"""The side Table 6's views were made for: at and above it ``preset="auto"`` is the paper's."""
PRESETS = ("auto", "paper")
MIN_BLUR_SIGMA = 0.5
"""A blur whose largest sigma is below this many pixels keeps >= 79% of each pixel: it is skipped."""


def view_settings(image_size: int | tuple[int, int], view: int = 1, preset: str = "auto") -> dict[str, Any]:
    """The default settings of a view of this size: Table 6, fitted to images smaller than 224 px.

    ``preset="paper"``: Table 6 at any size. ``preset="auto"`` (the default of ``BYOLAugment``):
    Table 6 at 224 px and above; below, measured on the robustness matrix
    (benchmarks/results/robustness.md, "Views that fit the image size"):

    * the blur's sigma range scales with the side, ``(0.1, 2.0) x side / 224``, the paper's blur
      relative to the image; when its largest sigma falls under ``MIN_BLUR_SIGMA`` (half a pixel,
      below 56 px) the blur is off, as every 32 px reference recipe has it;
    * crops are resized bilinearly instead of bicubically (the bicubic's overshoot on small
      upscaled crops cost 3.6 kNN points on RegNetX at 32 px).

    Args:
        image_size: the views' side, or (h, w) (the shorter side decides).
        view: 1 or 2 (Table 6's asymmetric blur and solarize).
        preset: ``"auto"`` or ``"paper"``.

    Returns:
        Every setting ``BYOLAugment`` takes, by name.

    Raises:
        ValueError: an unknown view or preset.

    Examples:
        >>> view_settings(32)["blur_p"], view_settings(32)["interpolation"], view_settings(224)["blur_sigma"]
        (0.0, 'bilinear', (0.1, 2.0))
        >>> view_settings(32, preset="paper")["blur_p"]
        1.0
    """
    if _as_int(view) not in _VIEW_DEFAULTS:  # not True or 1.0, which equal 1
        raise ValueError(f"view must be the int 1 or 2 (the paper's two views), got {view!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    settings: dict[str, Any] = {**_DEFAULTS, **_VIEW_DEFAULTS[view]}
    side = min(image_size) if isinstance(image_size, (tuple, list)) else int(image_size)
    if preset == "paper" or side >= PAPER_SIDE:
        return settings
    low, high = settings["blur_sigma"]
    scale = side / PAPER_SIDE
    settings.update(blur_sigma=(low * scale, high * scale), interpolation="bilinear")
    if high * scale < MIN_BLUR_SIGMA:
        settings["blur_p"] = 0.0
    return settings


def _col(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1): a per-sample value over an image


def _select(x: Tensor, y: Tensor, on: Tensor) -> Tensor:
    """`y` for samples where `on` (B,) is set, exactly `x` elsewhere (lerp by 0 or 1; faster than where on CPU)."""
    return torch.lerp(x, y, _col(on.to(x.dtype)))


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma (B, 1, H, W) of a (B, 3, H, W) batch with torchvision's weights; other channel counts: the mean."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    r, g, b = x.unbind(1)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def _blend(x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """``clamp(alpha x + beta mean(gray x) + gamma gray x, 0, 1)`` with per-sample (B,) coefficients."""
    gray = rgb_to_grayscale(x)  # (B, 1, H, W)
    mean = gray.mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    offset = gray.mul_(_col(gamma)).add_(_col(beta) * mean)  # (B, 1, H, W), in place on the fresh luma
    return torch.addcmul(offset, _col(alpha), x).clamp_(0, 1)  # alpha 1, beta = gamma = 0: exactly x


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``clamp(factor * x, 0, 1)`` of a batch in [0, 1]; `factor` is (B,)."""
    return _blend(x, factor, 0 * factor, 0 * factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample blend with the image's mean luma, clamped to [0, 1]; `factor` is (B,)."""
    return _blend(x, factor, 1 - factor, 0 * factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample blend with the luma image, clamped to [0, 1]; a no-op on one channel."""
    return x if x.shape[1] == 1 else _blend(x, factor, 0 * factor, 1 - factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of a (B, 3, H, W) batch in [0, 1] by `shift` (B,) turns; a no-op on one channel.

    Branch-free closed form of torchvision's RGB -> HSV -> RGB: channel n is the max minus
    ``chroma * clamp(d_n - 1, 0, 1)``, d_n the circular distance (in sixths of a turn) from the new
    hue to the channel's primary (R 0, G 2, B 4). Matches torchvision to ~1e-6 on [0, 1] input.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    high = torch.maximum(r, g).clamp_min_(b)  # (B, H, W); aminmax over dim 1 is slow on CPU
    chroma = high - torch.minimum(r, g).clamp_max_(b)
    # 0/1 masks of the channel holding the max (the first on ties, as torchvision), as floats: where()
    # and bool-float arithmetic are slow on CPU.
    is_r = (high == r).to(x.dtype)
    is_g = (high == g).to(x.dtype).mul_(1 - is_r)
    is_b = 1 - is_r - is_g
    hue6 = (g - b).mul_(is_r).addcmul_(b - r, is_g).addcmul_(r - g, is_b)
    hue6.div_(chroma.clamp_min(torch.finfo(x.dtype).tiny))  # grey pixels: 0 / tiny
    hue6.add_(is_g, alpha=2).add_(is_b, alpha=4).add_(6 * shift.view(-1, 1, 1))  # sixths of a turn
    hue6.sub_(torch.floor(hue6 / 6), alpha=6)  # wrapped into [0, 6]
    primary = torch.arange(0, 6, 2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    dist = (hue6.unsqueeze(1) - primary).abs_()  # (B, 3, H, W), in [0, 6]
    weight = dist.sub_(3).abs_().neg_().add_(2).clamp_(0, 1)  # clamp(min(d, 6 - d) - 1, 0, 1), in place
    return torch.addcmul(high.unsqueeze(1), chroma.unsqueeze(1), weight, value=-1)


def color_jitter(
    x: Tensor,
    order: Tensor,
    brightness: Tensor | None,
    contrast: Tensor | None,
    saturation: Tensor | None,
    hue: Tensor | None,
    active: Tensor | None = None,
) -> Tensor:
    """torchvision's ColorJitter with per-sample factors and a per-sample random order.

    Args:
        x: (B, C, H, W) float batch in [0, 1], C = 1 or 3 (other C: brightness and contrast only).
        order: (B, 4) int64 permutation per sample of 0 brightness, 1 contrast, 2 saturation, 3 hue.
        brightness, contrast, saturation: (B,) factors; hue: (B,) shift in turns. None skips an op.
        active: (B,) bool, samples to jitter (default all); the others are returned unchanged.

    Returns:
        (B, C, H, W), as if each sample went through the four torchvision ops in its own order.
    """
    batch, channels = x.shape[:2]
    on = torch.ones(batch, dtype=torch.bool, device=x.device) if active is None else active
    factors = (brightness, contrast, saturation if channels == 3 else None)
    with_hue = hue is not None and channels == 3
    is_hue = order == 3
    # The three blend ops in each sample's order, hue taken out, and how many of them come before hue.
    keys = is_hue.long() * 4 + torch.arange(4, device=x.device)  # (B, 4)
    linear = order.gather(1, keys.argsort(1)[:, :3])  # (B, 3)
    before = is_hue.long().argmax(1, keepdim=True) if with_hue else torch.full_like(order[:, :1], 3)
    # Blend slots 0-2 run the ops before hue (right-aligned), slots 3-5 the ops after it (left-aligned).
    slot = torch.arange(3, device=x.device)
    pos = torch.cat([before - 3 + slot, before + slot], 1)  # (B, 6) index into `linear`
    valid = on[:, None] & (pos >= 0) & (pos < 3)
    op = linear.gather(1, pos.clamp(0, 2))  # (B, 6)
    alpha = torch.ones(batch, 6, device=x.device, dtype=torch.float32)
    for k, factor in enumerate(factors):
        if factor is None:
            valid = valid & (op != k)
        else:
            alpha = torch.where(valid & (op == k), factor[:, None].to(alpha.dtype), alpha)
    beta = torch.where(valid & (op == 1), 1 - alpha, 0.0)  # contrast: blend with the mean luma
    gamma = torch.where(valid & (op == 2), 1 - alpha, 0.0)  # saturation: blend with the luma
    for s in range(6 if with_hue else 3):
        if s == 3:
            assert hue is not None  # with_hue
            x = _select(x, adjust_hue(x, hue), on)
        x = _blend(x, alpha[:, s], beta[:, s], gamma[:, s])
    return x


def _gaussian_matrix(sigma: Tensor, kernel_size: int, n: int) -> Tensor:
    """(B, n, n) matrices blurring a side of n pixels with each sample's 1-D Gaussian, reflect-padded."""
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.softmax(-0.5 * (t / sigma[:, None]) ** 2, dim=1)  # (B, k), sums to 1
    table = F.pad(kernel, (0, 1))  # (B, k + 1), the last entry is the zero off the band
    i, m = torch.arange(n, device=sigma.device), torch.arange(n + 2 * r, device=sigma.device)
    offset = m[None, :] - i[:, None]  # (n, n + 2r): padded pixel m relative to output pixel i
    index = torch.where((offset >= 0) & (offset < kernel_size), offset, kernel_size)
    bands = table.gather(1, index.view(1, -1).expand(len(sigma), -1)).view(-1, n, n + 2 * r)
    source = n - 1 - (n - 1 - (m - r).abs()).abs()  # (n + 2r,) the pixel each padded one mirrors
    return bands @ (source[:, None] == i[None, :]).to(torch.float32)  # (B, n, n)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int | tuple[int, int]) -> Tensor:
    """Separable Gaussian blur with per-sample `sigma` (B,), reflect padding, odd `kernel_size` (kh, kw)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    batch, channels, height, width = x.shape
    if kh % 2 == 0 or kw % 2 == 0 or kh // 2 >= height or kw // 2 >= width:
        raise ValueError(f"kernel_size {(kh, kw)} must be odd and at most 2 * side - 1 for a {height}x{width} image")
    rows = _gaussian_matrix(sigma, kh, height)  # (B, H, H)
    cols = rows if (kh, height) == (kw, width) else _gaussian_matrix(sigma, kw, width)  # (B, W, W)
    y = x.reshape(batch, channels * height, width) @ cols.transpose(1, 2)  # (B, C*H, W)
    return rows.unsqueeze(1) @ y.view(batch, channels, height, width)


def solarize(x: Tensor, active: Tensor | None = None) -> Tensor:
    """The paper's ``x < 0.5 ? x : 1 - x`` as ``min(x, 1 - x)``, for samples where `active` (B,) is set."""
    one = 1.0 if active is None else _col(torch.where(active, 1.0, math.inf))  # min(x, inf - x) = x
    return (one - x).clamp_max_(x)  # (B, C, H, W), exactly torchvision's where(x >= 0.5, 1 - x, x)


def _cubic(u: Tensor) -> Tensor:
    """Keys cubic kernel with a = -0.5 (PIL's and PyTorch's antialiased bicubic)."""
    v = u.abs()
    near = (1.5 * v - 2.5) * v * v + 1  # |u| < 1
    far = ((2.5 - 0.5 * v) * v - 4) * v + 2  # 1 <= |u| < 2
    return torch.where(v < 1, near, torch.where(v < 2, far, 0.0))


def _triangle(u: Tensor) -> Tensor:
    """The linear (tent) kernel of antialiased bilinear resampling (PIL's and torchvision's)."""
    return (1 - u.abs()).clamp_(min=0)


_KERNELS = {"bicubic": _cubic, "bilinear": _triangle}
INTERPOLATIONS = tuple(_KERNELS)


def _resize_matrix(
    start: Tensor, length: Tensor, n_in: int, n_out: int, flip: Tensor | None, interpolation: str = "bicubic"
) -> Tensor:
    """(B, n_out, n_in) weights resampling pixels [start, start + length) of each sample to n_out."""
    scale = length / n_out  # (B,) input pixels per output pixel
    stretch = scale.clamp(min=1.0)[:, None, None]  # antialias: widen the kernel when shrinking
    pos = torch.arange(n_out, device=start.device, dtype=torch.float32).expand(len(start), n_out)
    if flip is not None:
        pos = torch.where(flip[:, None], n_out - 1 - pos, pos)  # mirror the output columns
    center = (start[:, None] + scale[:, None] * (pos + 0.5))[..., None]  # (B, n_out, 1)
    taps = min(n_in, math.ceil(4 * max(n_in / n_out, 1.0)) + 1)  # widest support + 1, fixed shape
    first = torch.floor(center - 2 * stretch + 0.5).clamp(0, n_in - taps)
    j = first + torch.arange(taps, device=start.device)  # (B, n_out, taps) source pixels
    inside = (j >= start[:, None, None]) & (j < (start + length)[:, None, None])
    w = _KERNELS[interpolation]((j + 0.5 - center) / stretch) * inside.to(torch.float32)
    w = w / w.sum(-1, keepdim=True)
    return torch.zeros(len(start), n_out, n_in, device=start.device, dtype=w.dtype).scatter_(2, j.long(), w)


def resized_crop(
    x: Tensor, boxes: Tensor, size: tuple[int, int], flip: Tensor | None = None, interpolation: str = "bicubic"
) -> Tensor:
    """Crop each sample to its box, resize to `size` (antialiased), optionally mirror.

    Args:
        x: (B, C, H, W) float image in [0, 1] or uint8 (scaled by 1 / 255).
        boxes: (B, 4) top, left, height, width in input pixels.
        size: (h, w) of the output.
        flip: (B,) bool, samples to mirror left-right after resizing.
        interpolation: ``"bicubic"`` (the paper's) or ``"bilinear"`` (torchvision's default).

    Returns:
        (B, C, h, w) float32: torchvision's ``resized_crop(..., BICUBIC or BILINEAR, antialias=True)``
        (to 2e-5 in the tests; the kernel widens by the shrink factor, so ``antialias=False`` is not
        the match) clipped to [0, 1]: bicubic overshoots, PIL clips too, and the colour ops need [0, 1].
    """
    if interpolation not in _KERNELS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    batch, channels, height, width = x.shape
    top, left, box_h, box_w = boxes.to(torch.float32).unbind(1)
    rows = _resize_matrix(top, box_h, height, size[0], None, interpolation)  # (B, h, H)
    cols = _resize_matrix(left, box_w, width, size[1], flip, interpolation)  # (B, w, W)
    if x.dtype == torch.uint8:
        rows = rows / 255  # matmuls need float; the 1/255 scale rides on the (B, h, H) matrix
    y = x.to(torch.float32).reshape(batch, channels * height, width) @ cols.transpose(1, 2)  # (B, C*H, w)
    y = rows.unsqueeze(1) @ y.view(batch, channels, height, size[1])  # (B, C, h, w)
    return y.clamp_(0, 1)


def _rand(shape: tuple[int, ...], device: torch.device | None, generator: torch.Generator | None) -> Tensor:
    """``torch.rand``, given ``generator`` only when there is one: under ``torch.compile`` a batch of symbolic
    size fails with ``generator=None`` (an epoch's last, smaller batch recompiles with a symbolic size)."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=torch.float32)
    return torch.rand(shape, device=device, dtype=torch.float32, generator=generator)


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> Tensor:
    """torchvision's RandomResizedCrop boxes, vectorised: `tries` candidates per sample, the first that fits.

    Returns:
        (B, 4) int64 top, left, height, width; torchvision's central crop where no candidate fits.
    """
    u = _rand((batch, tries, 2), device, generator)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # (B, tries)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    h, w = torch.round(torch.sqrt(area / aspect)), torch.round(torch.sqrt(area * aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # (B, 1), the first fitting try
    found = fits.any(1)
    in_ratio = width / height  # torchvision's fallback: the central crop, clipped to the ratio range
    fb_h = round(width / ratio[0]) if in_ratio < ratio[0] else height
    fb_w = round(height * ratio[1]) if in_ratio > ratio[1] else width
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fb_h))
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fb_w))
    v = _rand((batch, 2), device, generator)
    top = torch.minimum(torch.floor(v[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(v[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fb_h) // 2))
    left = torch.where(found, left, float((width - fb_w) // 2))
    return torch.stack([top, left, h, w], 1).long()


@dataclass
class AugmentParams:
    """Per-sample parameters of one batch of views; every field has the batch as its first dimension."""

    boxes: Tensor  # (B, 4) int64 crop top, left, height, width in input pixels
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool, colour jitter applied
    order: Tensor  # (B, 4) int64 jitter order: 0 brightness, 1 contrast, 2 saturation, 3 hue
    brightness: Tensor  # (B,) factor, likewise contrast and saturation
    contrast: Tensor
    saturation: Tensor
    hue: Tensor  # (B,) shift in turns
    grayscale: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) blur sigma in output pixels
    solarize: Tensor  # (B,) bool


def _real(value: object) -> bool:
    """A finite real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _scalar(value: object) -> object:
    """A 0-d tensor or array as its Python number (a 0-d bool as a bool); anything else as it is."""
    return value.tolist() if getattr(value, "ndim", None) == 0 and hasattr(value, "tolist") else value


def _pair(name: str, value, low: float, high: float, center: float | None = None) -> tuple[float, float]:
    """A (low, high) range within [low, high], from a pair, a fixed value, or a strength s about ``center``."""
    wanted = f"a (low, high) pair of finite numbers with {low} <= low <= high <= {high}" + (
        "" if center is None else ", or a strength >= 0"
    )
    value = _scalar(value)
    if _real(value):  # a strength s -> [center - s, center + s]; else a fixed value
        if center is not None and value < 0:
            raise ValueError(f"{name}={value!r} must be {wanted}")
        value = (value, value) if center is None else (max(center - value, low), center + value)
    elif isinstance(value, (tuple, list)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1):
        value = tuple(value.tolist() if hasattr(value, "tolist") else value)
    if not (
        isinstance(value, tuple) and len(value) == 2 and all(map(_real, value)) and low <= value[0] <= value[1] <= high
    ):
        raise ValueError(f"{name}={value!r} must be {wanted}")
    return float(value[0]), float(value[1])


def _as_tuple(v) -> tuple[float, ...]:
    return (float(v),) if isinstance(v, numbers.Real) else tuple(float(e) for e in v)


def _mean_std(name: str, value: object) -> float | tuple[float, ...] | None:
    """A ``mean`` / ``std`` override as None, a float or a tuple of floats (from a number, a sequence or an
    array of finite numbers; ``std`` positive)."""
    if value is None:
        return None
    listed = value.tolist() if hasattr(value, "tolist") else value  # a NumPy array or scalar, a tensor
    values: list[Any] = list(listed) if isinstance(listed, (tuple, list)) else [listed]
    if not values or not all(map(_real, values)) or (name == "std" and min(values) <= 0):
        sign = "positive " if name == "std" else ""
        raise ValueError(f"{name} must be a {sign}finite number or a sequence of them (one per channel), got {value!r}")
    return tuple(float(v) for v in values) if isinstance(listed, (tuple, list)) else float(values[0])


def _as_int(value: object) -> int | None:
    """``value`` as an int when it is an integer (``int``, numpy or 0-d torch integers), not a bool."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; for a seed, pass "
            f"torch.Generator().manual_seed({generator!r})"
        )


def _image_size(image_size: object) -> tuple[int, int]:
    """(h, w) of an int or an (h, w) pair of ints (numpy and 0-d torch integers too), each positive.

    The one parser of an ``image_size`` argument: ``BYOLAugment``'s and ``BYOL``'s (which adds its
    upper bound).
    """
    side = _as_int(image_size)
    if side is not None:
        size = (side, side)
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(_as_int(s) is not None for s in image_size)
    ):
        size = (_as_int(image_size[0]) or 0, _as_int(image_size[1]) or 0)
    else:
        raise TypeError(f"image_size must be a positive int or a (height, width) pair of ints, got {image_size!r}")
    if min(size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


def _strength(pair: tuple[float, float], center: float, low: float) -> str:
    """A jitter range as its strength where it is one (``center`` -/+ s, cut at ``low``), else as the range."""
    s = pair[1] - center
    if s >= 0 and math.isclose(pair[0], max(center - s, low), abs_tol=1e-9):
        return f"{s:g}"
    return f"{pair[0]:g} to {pair[1]:g}"


class BYOLAugment(nn.Module):
    """One of BYOL's two views (Grill et al. 2020, Table 6), every parameter drawn per sample.

    Crop (area U[0.08, 1], log-uniform aspect [3/4, 4/3], bicubic antialiased resize) -> flip 0.5 ->
    colour jitter 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, random order per
    sample) -> grayscale 0.2 -> Gaussian blur 1.0 / 0.1 (kernel 10% of the side, sigma U[0.1, 2])
    -> solarize 0.0 / 0.2 -> normalise. On one channel, saturation, hue and grayscale are no-ops.
    Below 224 px the defaults fit the size (``view_settings``: blur scaled with the side, off
    below 56 px; bilinear resize); ``preset="paper"`` keeps Table 6 at any size.

    Args:
        image_size: output side, or (h, w).
        view: 1 or 2, picks the paper's blur and solarize probabilities.
        preset: ``"auto"`` (defaults fitted to the size) or ``"paper"`` (Table 6 at any size).
        generator: default torch.Generator for the draws (on the input's device).
        **overrides: any of crop_scale, crop_ratio, flip_p, jitter_p, brightness, contrast, saturation,
            hue, grayscale_p, blur_p, blur_sigma, blur_kernel_frac, interpolation, solarize_p, mean, std,
            normalize; they win over the preset. ``crop_scale`` is the crop's area as a (low, high)
            pair, as torchvision's ``scale`` (one number is refused: a minimum or a fixed area?).

    Attributes:
        settings: every resolved setting by name (what the view does; ``preview`` prints it and
            ``byol-pytorch train`` saves the recipe's in its checkpoints).

    Raises:
        ValueError: bad image_size, view, preset or override value. TypeError: unknown override name.

    Examples:
        >>> BYOLAugment(32).settings["blur_p"], BYOLAugment(32, preset="paper").settings["blur_p"]
        (0.0, 1.0)
    """

    size: tuple[int, int]
    blur_kernel: tuple[int, int]
    flip_p: float
    jitter_p: float
    grayscale_p: float
    blur_p: float
    solarize_p: float
    blur_kernel_frac: float

    def __init__(
        self,
        image_size: int | tuple[int, int],
        view: int = 1,
        *,
        preset: str = "auto",
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        size = _image_size(image_size)
        settings = view_settings((size[0], size[1]), view, preset)
        for name in overrides:
            if name not in settings:
                close = difflib.get_close_matches(name, settings, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"unknown override {name!r}.{hint} Valid names: {', '.join(sorted(settings))}")
        settings.update(overrides)
        _check_generator(generator)
        self.size, self.view, self.generator = (size[0], size[1]), view, generator
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "blur_kernel_frac"):
            settings[name] = _scalar(settings[name])
            if isinstance(settings[name], bool) or not isinstance(settings[name], numbers.Real):
                raise TypeError(f"{name} must be a number in [0, 1], got {settings[name]!r}")
            if not 0.0 <= settings[name] <= 1.0:  # probabilities, and the kernel's fraction of the side
                raise ValueError(f"{name} must lie in [0, 1], got {settings[name]!r}")
            setattr(self, name, float(settings[name]))
        if _real(_scalar(settings["crop_scale"])):  # torchvision's scale=(min, max): one number is ambiguous
            raise ValueError(
                f"crop_scale={settings['crop_scale']!r}: pass the crop's area as a (low, high) pair, "
                f"({settings['crop_scale']}, 1.0) for a minimum area (the CLI's --crop-scale-min), or "
                f"({settings['crop_scale']}, {settings['crop_scale']}) for a fixed one"
            )
        self.crop_scale = _pair("crop_scale", settings["crop_scale"], 1e-12, 1.0)
        self.crop_ratio = _pair("crop_ratio", settings["crop_ratio"], 1e-12, math.inf)
        self.blur_sigma = _pair("blur_sigma", settings["blur_sigma"], 1e-12, math.inf)
        self.brightness = _pair("brightness", settings["brightness"], 0.0, math.inf, center=1.0)
        self.contrast = _pair("contrast", settings["contrast"], 0.0, math.inf, center=1.0)
        self.saturation = _pair("saturation", settings["saturation"], 0.0, math.inf, center=1.0)
        self.hue = _pair("hue", settings["hue"], -0.5, 0.5, center=0.0)
        if not isinstance(settings["normalize"], bool):
            raise ValueError(f"normalize must be True or False, got {settings['normalize']!r}")
        self.normalize_output = settings["normalize"]
        if settings["interpolation"] not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {settings['interpolation']!r}"
            )
        self.interpolation, self.preset = str(settings["interpolation"]), preset
        self.mean, self.std = _mean_std("mean", settings["mean"]), _mean_std("std", settings["std"])
        self.blur_kernel = (self._kernel(size[0]), self._kernel(size[1]))  # 23 at 224

    def _kernel(self, side: int) -> int:
        """Odd Gaussian kernel size of ``blur_kernel_frac`` of the side (the paper: 10%, 23 px at 224)."""
        return 2 * math.floor(self.blur_kernel_frac * side / 2) + 1

    @property
    def settings(self) -> dict[str, Any]:
        """Every resolved setting, by name (the override names; tuples for ranges)."""
        return {
            "crop_scale": self.crop_scale,
            "crop_ratio": self.crop_ratio,
            "interpolation": self.interpolation,
            "flip_p": self.flip_p,
            "jitter_p": self.jitter_p,
            "brightness": self.brightness,
            "contrast": self.contrast,
            "saturation": self.saturation,
            "hue": self.hue,
            "grayscale_p": self.grayscale_p,
            "blur_p": self.blur_p if max(self.blur_kernel) > 1 else 0.0,
            "blur_sigma": self.blur_sigma,
            "blur_kernel_frac": self.blur_kernel_frac,
            "solarize_p": self.solarize_p,
            "mean": self.mean,
            "std": self.std,
            "normalize": self.normalize_output,
        }

    def describe(self) -> str:
        """One line of what the view does (the settings that vary between presets and sizes)."""
        sigma = f"sigma {self.blur_sigma[0]:.2g}-{self.blur_sigma[1]:.2g} px, kernel {self.blur_kernel[0]}"
        blur = f"blur {self.blur_p:g} ({sigma})" if self.settings["blur_p"] > 0 else "no blur"
        return (
            f"view {self.view} at {self.size[0]}x{self.size[1]} ({self.preset}): crop area {self.crop_scale[0]:g}-"
            f"{self.crop_scale[1]:g} {self.interpolation}, flip {self.flip_p:g}, jitter {self.jitter_p:g} "
            f"(brightness {_strength(self.brightness, 1.0, 0.0)}, contrast {_strength(self.contrast, 1.0, 0.0)}, "
            f"saturation {_strength(self.saturation, 1.0, 0.0)}, hue {_strength(self.hue, 0.0, -0.5)}), "
            f"grayscale {self.grayscale_p:g}, {blur}, solarize {self.solarize_p:g}"
        )

    def extra_repr(self) -> str:
        blur_p = self.settings["blur_p"]  # 0 where the kernel is one pixel: no blur
        return f"image_size={self.size}, view={self.view}, blur_p={blur_p}, solarize_p={self.solarize_p}"

    def resolve_mean_std(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) used for `channels`: given values, else ImageNet's for 3 channels, else 0.5 / 0.5.

        Raises:
            ValueError: a given mean or std has neither 1 nor `channels` entries.
        """
        default = (_IMAGENET_MEAN, _IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
        out = []
        for name, given, fallback in (("mean", self.mean, default[0]), ("std", self.std, default[1])):
            values = fallback if given is None else _as_tuple(given)
            if len(values) == 1:
                values = values * channels
            if len(values) != channels:
                raise ValueError(
                    f"{name} has {len(values)} values but the images have {channels} channels; "
                    f"pass {channels} values or one"
                )
            out.append(values)
        return out[0], out[1]

    def normalize(self, x: Tensor) -> Tensor:
        """Per-channel ``(x - mean) / std`` of a (B, C, H, W) batch in [0, 1] (uint8 is scaled by 1/255).

        Returns float32; `x` unchanged (as float32) when the module was built with ``normalize=False``.
        """
        x = x.to(torch.float32) / 255 if x.dtype == torch.uint8 else x.to(torch.float32)
        if not self.normalize_output:
            return x
        mean, std = self.resolve_mean_std(x.shape[1])
        # Per-channel constants made by fill kernels: torch.tensor(..., device="cuda") would sync.
        scale = torch.stack([torch.full((), 1 / s, device=x.device, dtype=x.dtype) for s in std]).view(1, -1, 1, 1)
        shift = torch.stack([torch.full((), -m / s, device=x.device, dtype=x.dtype) for m, s in zip(mean, std)])
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale)  # (x - mean) / std in one pass

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a (B, C, H, W) torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}{hint}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(
                f"expected a float or uint8 image batch, got {x.dtype}; convert with x.float() / 255 "
                "for 0-255 values or x.to(torch.uint8)"
            )
        if 0 in x.shape:
            raise ValueError(f"empty batch or image: shape {tuple(x.shape)}; every dimension must be non-zero")
        jitter, channels = self.jitter_p > 0, x.shape[1]
        active = [
            n
            for n, on in (
                ("saturation", jitter and self.saturation != (1.0, 1.0)),
                ("grayscale_p", self.grayscale_p > 0),
                ("hue", jitter and self.hue != (0.0, 0.0)),
            )
            if on
        ]
        if channels > 4 and x.shape[3] in (1, 3):  # a width of 1 or 3 pixels and many "channels": the channels
            raise ValueError(
                f"the views take (B, C, H, W) images, got shape {tuple(x.shape)}: {channels} channels, which "
                "looks like a batch with its channels last (B, H, W, C); put them first: x.permute(0, 3, 1, 2)"
            )
        if channels not in (1, 3) and active:
            raise ValueError(
                f"{', '.join(active)} need 1 or 3 channels, got {channels}; set saturation=0, "
                "hue=0, grayscale_p=0 or convert the images to 3 channels"
            )

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> AugmentParams:
        """Draw every random parameter for `batch` images of `height` x `width` on `device`."""
        gen = self.generator if generator is None else generator

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return low + (high - low) * _rand(shape or (batch,), device, gen)

        return AugmentParams(
            boxes=sample_crop_boxes(batch, height, width, self.crop_scale, self.crop_ratio, device, gen),
            flip=uniform(0, 1) < self.flip_p,
            jitter=uniform(0, 1) < self.jitter_p,
            order=uniform(0, 1, batch, 4).argsort(1),  # a uniformly random permutation per sample
            brightness=uniform(*self.brightness),
            contrast=uniform(*self.contrast),
            saturation=uniform(*self.saturation),
            hue=uniform(*self.hue),
            grayscale=uniform(0, 1) < self.grayscale_p,
            blur=uniform(0, 1) < self.blur_p,
            sigma=uniform(*self.blur_sigma),
            solarize=uniform(0, 1) < self.solarize_p,
        )

    def apply_params(self, x: Tensor, params: AugmentParams) -> Tensor:
        """The view of `x` (B, C, H, W) for fixed `params`; returns (B, C, h, w) float32."""
        self._check_input(x)
        channels = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):  # colour math in float32
            y = resized_crop(x, params.boxes, self.size, params.flip, self.interpolation)  # (B, C, h, w)
            if self.jitter_p > 0:
                on = [
                    None if r == (c, c) else getattr(params, n)
                    for n, r, c in (
                        ("brightness", self.brightness, 1.0),
                        ("contrast", self.contrast, 1.0),
                        ("saturation", self.saturation, 1.0),
                        ("hue", self.hue, 0.0),
                    )
                ]
                if any(f is not None for f in on):
                    y = color_jitter(y, params.order, on[0], on[1], on[2], on[3], active=params.jitter)
            if self.grayscale_p > 0 and channels == 3:
                y = _select(y, rgb_to_grayscale(y), params.grayscale)
            if self.blur_p > 0 and max(self.blur_kernel) > 1:
                y = _select(y, gaussian_blur(y, params.sigma, self.blur_kernel), params.blur)
            if self.solarize_p > 0:
                y = solarize(y, params.solarize)
            return self.normalize(y)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a (B, C, H, W) batch into (B, C, h, w) float32 views.

        Args:
            x: float images in [0, 1] (other ranges are clipped after the crop, not rejected) or uint8.
            generator: overrides the constructor's generator; must be on the batch's device.

        Raises:
            ValueError: not 4D, empty, a channel count the active colour ops cannot handle, or a
                generator on another device. TypeError: not a tensor, or an integer dtype other than uint8.
        """
        self._check_input(x)
        _check_generator(generator)
        gen = self.generator if generator is None else generator
        if gen is not None and gen.device.type != x.device.type:
            raise ValueError(
                f"the generator is on {gen.device} but the batch is on {x.device}; "
                f"pass torch.Generator(device={str(x.device)!r})"
            )
        return self.apply_params(x, self.sample_params(x.shape[0], x.shape[2], x.shape[3], x.device, gen))

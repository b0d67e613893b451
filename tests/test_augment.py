"""Tests for byol_pytorch/augment.py: each op against torchvision v2 image by image, the sampling
statistics, devices, dtypes, compile-friendliness and input validation."""

import copy
import itertools
import math
import pathlib
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from byol_pytorch.augment import (
    AugmentParams,
    BYOLAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    gaussian_blur,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
BICUBIC = T.InterpolationMode.BICUBIC
# float32 results summed in a different order than torchvision's: differences are ~1e-6.
TOL = dict(atol=2e-5, rtol=0)
N_STAT = 4096  # samples for the statistical tests
TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, c: int = 3, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    """8-bit levels as floats, so channel ties (max shared by two channels, grey pixels) occur."""
    return torch.randint(0, 256, (n, c, h, w), generator=gen(seed)).float() / 255


def uniform(n: int, low: float, high: float, seed: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen(seed))


def assert_within_3se(hits: torch.Tensor, p: float) -> None:
    rate, n = hits.float().mean().item(), hits.numel()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= 3 * se + 1e-12, f"rate {rate:.4f} vs setting {p} (3 SE = {3 * se:.4f}, n={n})"


# ---------------------------------------------------------------- each op against torchvision


@pytest.mark.parametrize("size", [(16, 16), (12, 30)])
def test_resized_crop_matches_torchvision_bicubic_antialias(size):
    # Boxes larger and smaller than the output, so both shrinking (antialiased) and enlarging are covered.
    x = images(12)
    boxes = sample_crop_boxes(12, 20, 24, generator=gen(1))
    boxes[:3] = torch.tensor([[0, 0, 20, 24], [5, 7, 1, 1], [3, 2, 17, 3]])
    flip = torch.arange(12) % 2 == 0
    out = resized_crop(x, boxes, size, flip)
    assert out.shape == (12, 3, *size) and out.dtype == torch.float32
    for i in range(12):
        ref = TF.resized_crop(x[i], *boxes[i].tolist(), list(size), BICUBIC, antialias=True)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        torch.testing.assert_close(out[i], ref.clamp(0, 1), **TOL)  # bicubic overshoot is clipped


@pytest.mark.parametrize("size", [(16, 16), (30, 12)])
def test_resized_crop_bilinear_matches_torchvision_bilinear_antialias(size):
    x = images(12)
    boxes = sample_crop_boxes(12, 20, 24, generator=gen(3))
    boxes[:3] = torch.tensor([[0, 0, 20, 24], [5, 7, 1, 1], [3, 2, 17, 3]])
    flip = torch.arange(12) % 3 == 0
    out = resized_crop(x, boxes, size, flip, interpolation="bilinear")
    for i in range(12):
        ref = TF.resized_crop(x[i], *boxes[i].tolist(), list(size), T.InterpolationMode.BILINEAR, antialias=True)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        torch.testing.assert_close(out[i], ref, **TOL)  # no overshoot: nothing to clip
    with pytest.raises(ValueError, match="interpolation must be one of bicubic, bilinear"):
        resized_crop(x, boxes, size, interpolation="nearest")


@pytest.mark.parametrize(
    "size, view, blur_p, sigma, interpolation",
    [
        (32, 1, 0.0, (0.1 * 32 / 224, 2.0 * 32 / 224), "bilinear"),  # sigma under half a pixel: no blur
        (32, 2, 0.0, (0.1 * 32 / 224, 2.0 * 32 / 224), "bilinear"),
        (64, 1, 1.0, (0.1 * 64 / 224, 2.0 * 64 / 224), "bilinear"),  # the paper's blur, relative to the side
        (64, 2, 0.1, (0.1 * 64 / 224, 2.0 * 64 / 224), "bilinear"),
        (224, 1, 1.0, (0.1, 2.0), "bicubic"),  # Table 6
        (224, 2, 0.1, (0.1, 2.0), "bicubic"),
        (512, 1, 1.0, (0.1, 2.0), "bicubic"),
    ],
)
def test_views_resolve_from_the_image_size(size, view, blur_p, sigma, interpolation):
    aug = BYOLAugment(size, view=view)
    settings = aug.settings
    assert settings["blur_p"] == blur_p and settings["interpolation"] == interpolation
    assert settings["blur_sigma"] == pytest.approx(sigma)
    assert settings["crop_scale"] == (0.08, 1.0) and settings["solarize_p"] == (0.0 if view == 1 else 0.2)
    assert settings["brightness"] == pytest.approx((0.6, 1.4)) and settings["jitter_p"] == 0.8
    paper = BYOLAugment(size, view=view, preset="paper").settings
    assert paper["blur_p"] == (1.0 if view == 1 else 0.1) and paper["blur_sigma"] == (0.1, 2.0)
    assert paper["interpolation"] == "bicubic"
    kept = BYOLAugment(size, view=view, blur_p=0.5, interpolation="bicubic").settings  # overrides win
    assert kept["blur_p"] == (0.5 if max(aug.blur_kernel) > 1 else 0.0) and kept["interpolation"] == "bicubic"


def test_view_presets_are_checked_and_described():
    with pytest.raises(ValueError, match="preset must be one of auto, paper"):
        BYOLAugment(32, preset="cifar")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        BYOLAugment(32, interpolation="lanczos")
    text = BYOLAugment(32, view=2).describe()
    assert "bilinear" in text and "no blur" in text and "solarize 0.2" in text
    assert "blur 1 (sigma 0.1-2 px, kernel 23)" in BYOLAugment(224).describe()


@pytest.mark.parametrize("view", [True, 1.0, "1", 3])
def test_a_view_that_is_not_the_int_1_or_2_is_refused(view):
    """Before: view=True and view=1.0 passed the check (True == 1.0 == 1) and were described as "view True"."""
    with pytest.raises(ValueError, match=r"view must be the int 1 or 2"):
        BYOLAugment(32, view=view)
    assert BYOLAugment(32, view=2).view == 2
    assert BYOLAugment(32, view=np.int64(2)).settings == BYOLAugment(32, view=2).settings  # numpy's ints are ints


def test_resized_crop_uint8_is_scaled_then_clamped():
    # torchvision's CPU uint8 resize rounds and clips between its two passes (like PIL), so the
    # reference is its float path on x / 255, clamped to [0, 1] as the uint8 output range implies.
    x = (images(8) * 255).round().to(torch.uint8)
    boxes = sample_crop_boxes(8, 20, 24, generator=gen(2))
    out = resized_crop(x, boxes, (16, 16))
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    for i in range(8):
        ref = TF.resized_crop(x[i].float() / 255, *boxes[i].tolist(), [16, 16], BICUBIC, antialias=True)
        torch.testing.assert_close(out[i], ref.clamp(0, 1), **TOL)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "ours, index, low, high",
    [
        (adjust_brightness, 0, 0.6, 1.4),
        (adjust_contrast, 1, 0.0, 2.0),
        (adjust_saturation, 2, 0.0, 2.0),
        (adjust_hue, 3, -0.5, 0.5),
    ],
)
def test_colour_op_matches_torchvision(ours, index, low, high, channels):
    x = images(16, c=channels, seed=3)
    factor = uniform(16, low, high, seed=4)
    out = ours(x, factor)
    for i in range(16):
        torch.testing.assert_close(out[i], TV_OPS[index](x[i], factor[i].item()), **TOL)


def test_grayscale_blur_and_solarize_match_torchvision():
    x = images(10, seed=5)
    sigma = uniform(10, 0.1, 2.0, seed=6)
    gray, blurred, solar = rgb_to_grayscale(x), gaussian_blur(x, sigma, (7, 5)), solarize(x)
    for i in range(10):
        torch.testing.assert_close(gray[i], TF.rgb_to_grayscale(x[i]), **TOL)
        ref = TF.gaussian_blur(x[i], [5, 7], [sigma[i].item()] * 2)  # torchvision: (kernel_x, kernel_y)
        torch.testing.assert_close(blurred[i], ref, **TOL)
        torch.testing.assert_close(solar[i], TF.solarize(x[i], 0.5), atol=0, rtol=0)
    on = torch.arange(10) % 2 == 0
    assert torch.equal(solarize(x, on)[on], solar[on]) and torch.equal(solarize(x, on)[~on], x[~on])


@pytest.mark.parametrize("channels, with_hue", [(3, True), (3, False), (1, True)])
def test_color_jitter_follows_each_samples_order(channels, with_hue):
    orders = torch.tensor(list(itertools.permutations(range(4))) * 2)  # all 24 orders, twice
    n = len(orders)
    x = images(n, c=channels, h=9, w=11, seed=7)
    factors = [
        uniform(n, 0.6, 1.4, 8),
        uniform(n, 0.6, 1.4, 9),
        uniform(n, 0.8, 1.2, 10),
        uniform(n, -0.1, 0.1, 11) if with_hue else None,
    ]
    active = torch.rand(n, generator=gen(12)) < 0.8
    out = color_jitter(x, orders, *factors, active=active)
    for i in range(n):
        ref = x[i]
        for op in orders[i].tolist() if active[i] else []:
            if factors[op] is not None:
                ref = TV_OPS[op](ref, factors[op][i].item())
        torch.testing.assert_close(out[i], ref, **TOL)


def test_module_matches_torchvision_composition_with_its_params():
    aug = BYOLAugment((16, 20), view=2, preset="paper", blur_p=0.5, solarize_p=0.5, blur_kernel_frac=0.3)
    x = images(32, h=24, w=28, seed=13)
    p = aug.sample_params(32, 24, 28, generator=gen(14))
    out = aug.apply_params(x, p)
    mean, std = aug.resolve_mean_std(3)
    kh, kw = aug.blur_kernel
    assert (kh, kw) == (5, 7)
    for i in range(32):
        y = TF.resized_crop(x[i], *p.boxes[i].tolist(), [16, 20], BICUBIC, antialias=True).clamp(0, 1)
        y = TF.horizontal_flip(y) if p.flip[i] else y
        factors = (p.brightness, p.contrast, p.saturation, p.hue)
        for op in p.order[i].tolist() if p.jitter[i] else []:
            y = TV_OPS[op](y, factors[op][i].item())
        y = TF.rgb_to_grayscale(y, 3) if p.grayscale[i] else y
        y = TF.gaussian_blur(y, [kw, kh], [p.sigma[i].item()] * 2) if p.blur[i] else y
        keep = (y - 0.5).abs() > 1e-4  # solarize's threshold is a jump: skip pixels at it
        y = TF.solarize(y, 0.5) if p.solarize[i] else y
        ref = TF.normalize(y, list(mean), list(std))
        torch.testing.assert_close(out[i][keep], ref[keep], atol=1e-4, rtol=0)


def test_blur_off_leaves_sample_exactly_unchanged():
    aug = BYOLAugment(16, preset="paper", blur_p=0.5, blur_kernel_frac=0.4, jitter_p=0, grayscale_p=0, normalize=False)
    x = images(16, seed=15)
    p = aug.sample_params(16, 20, 24, generator=gen(16))
    crop = resized_crop(x, p.boxes, (16, 16), p.flip, aug.interpolation)
    out = aug.apply_params(x, p)
    assert p.blur.any() and not p.blur.all()
    assert torch.equal(out[~p.blur], crop[~p.blur])
    assert not torch.allclose(out[p.blur], crop[p.blur])


def test_normalize_matches_torchvision_and_can_be_off():
    x = images(4, seed=17)
    aug = BYOLAugment(8)
    ref = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(aug.normalize(x), ref, **TOL)
    torch.testing.assert_close(aug.normalize((x * 255).round().to(torch.uint8)), aug.normalize(x), **TOL)
    assert torch.equal(BYOLAugment(8, normalize=False).normalize(x), x)
    assert BYOLAugment(8, mean=0.1, std=(2.0,)).resolve_mean_std(3) == ((0.1,) * 3, (2.0,) * 3)


# ---------------------------------------------------------------- statistics over 4096 samples


@pytest.mark.parametrize("view", [1, 2])
def test_sampled_probabilities_and_ranges(view):
    aug = BYOLAugment(8, view=view, preset="paper")
    p = aug.sample_params(N_STAT, 8, 8, generator=gen(20 + view))
    blur_p, solarize_p = (1.0, 0.0) if view == 1 else (0.1, 0.2)
    for hits, setting in [
        (p.flip, 0.5),
        (p.jitter, 0.8),
        (p.grayscale, 0.2),
        (p.blur, blur_p),
        (p.solarize, solarize_p),
    ]:
        assert_within_3se(hits, setting)
    for values, (low, high) in [
        (p.brightness, (0.6, 1.4)),
        (p.contrast, (0.6, 1.4)),
        (p.saturation, (0.8, 1.2)),
        (p.hue, (-0.1, 0.1)),
        (p.sigma, (0.1, 2.0)),
    ]:
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(N_STAT, 4))
    for position in range(4):  # hue is equally likely at each position
        assert_within_3se(p.order[:, position] == 3, 0.25)


@pytest.mark.parametrize(
    "override, changed, prob",
    [
        (dict(flip_p=0.5), "flip", 0.5),
        (dict(jitter_p=0.8, contrast=0, saturation=0, hue=0), "any", 0.8),
        (dict(grayscale_p=0.2), "gray", 0.2),
        (dict(blur_p=0.1, blur_sigma=(1.0, 2.0), blur_kernel_frac=0.5), "any", 0.1),
        (dict(solarize_p=0.2), "any", 0.2),
    ],
)
def test_applied_frequencies_match_probabilities(override, changed, prob):
    # Whole-image crops of one asymmetric image, every other op off: each view shows whether the op ran.
    off = dict(flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    aug = BYOLAugment(8, crop_scale=(1, 1), crop_ratio=(1, 1), normalize=False, **{**off, **override})
    ramp = torch.linspace(0, 0.3, 8)
    base = torch.stack([0.1 + ramp, 0.2 + ramp, 0.3 + ramp])[:, None].expand(3, 8, 8)  # (3, 8, 8), max 0.6
    out = aug(base.expand(N_STAT, 3, 8, 8).contiguous(), generator=gen(30))
    if changed == "flip":
        hits = (out - base.flip(-1)).abs().amax((1, 2, 3)) < 1e-6
    elif changed == "gray":
        hits = (out[:, 0] - out[:, 2]).abs().amax((1, 2)) < 1e-6
    else:
        hits = (out - base).abs().amax((1, 2, 3)) > 1e-4
    assert_within_3se(hits, prob)


def test_crop_boxes_in_range_and_distributed_like_torchvision():
    boxes = sample_crop_boxes(N_STAT, 224, 224, generator=gen(40)).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
    area, log_ratio = h * w / 224**2, torch.log(w / h)
    slack = 0.02  # w and h are rounded to whole pixels (>= 55 px here)
    assert area.min() >= 0.08 * (1 - slack) and area.max() <= 1
    assert log_ratio.abs().max() <= math.log(4 / 3) + slack
    make = T.RandomResizedCrop(224).make_params  # torchvision's own sampler, one box at a time
    torch.manual_seed(41)
    ref = torch.tensor(
        [[b["height"], b["width"]] for b in (make([torch.empty(3, 224, 224)]) for _ in range(N_STAT))],
        dtype=torch.float64,
    )
    ref_area, ref_log_ratio = ref.prod(1) / 224**2, torch.log(ref[:, 1] / ref[:, 0])
    for ours, theirs in [(area, ref_area), (log_ratio, ref_log_ratio)]:
        se = math.sqrt((ours.var() + theirs.var()).item() / N_STAT)
        assert abs((ours.mean() - theirs.mean()).item()) <= 3 * se


def test_crop_fallback_is_torchvisions_central_crop():
    boxes = sample_crop_boxes(64, 10, 1000, generator=gen(42))  # no candidate can fit a 10 px high image
    ref = T.RandomResizedCrop(8).make_params([torch.empty(3, 10, 1000)])
    assert (boxes == torch.tensor([ref["top"], ref["left"], ref["height"], ref["width"]])).all()


def test_identical_images_give_distinct_views():
    x = images(1, seed=50).expand(64, 3, 20, 24)
    for view in (1, 2):
        out = BYOLAugment(16, view=view)(x, generator=gen(51)).flatten(1)
        dist = torch.cdist(out, out) + torch.eye(64) * 1e9
        assert dist.min() > 1e-2


# ---------------------------------------------------------------- devices, dtypes, reproducibility


def test_reproducible_with_seed_and_generator():
    aug, x = BYOLAugment(16, view=2), images(8, seed=60)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    assert torch.equal(aug(x), a)
    assert torch.equal(aug(x, generator=gen(1)), aug(x, generator=gen(1)))
    assert torch.equal(BYOLAugment(16, view=2, generator=gen(1))(x), aug(x, generator=gen(1)))
    assert not torch.equal(aug(x, generator=gen(1)), aug(x, generator=gen(2)))


def test_autocast_uint8_and_any_float_input():
    aug, x = BYOLAugment(16), images(8, seed=61)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(x, generator=gen(3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, aug(x, generator=gen(3)), **TOL)
    x8 = (x * 255).round().to(torch.uint8)
    p = aug.sample_params(8, 20, 24, generator=gen(4))
    from_uint8, from_float = aug.apply_params(x8, p), aug.apply_params(x, p)
    assert from_uint8.dtype == torch.float32 and from_uint8.shape == (8, 3, 16, 16)
    torch.testing.assert_close(from_uint8, from_float, atol=1e-4, rtol=0)
    for x_any in (torch.randn(4, 3, 12, 12) * 3, torch.rand(4, 3, 12, 12, dtype=torch.float64).half()):
        out = aug(x_any)
        assert out.shape == (4, 3, 16, 16) and out.dtype == torch.float32 and out.isfinite().all()


def test_one_channel_and_four_channel_inputs():
    aug = BYOLAugment((8, 12))
    assert aug.resolve_mean_std(1) == ((0.5,), (0.5,))
    out = aug(images(16, c=1))
    assert out.shape == (16, 1, 8, 12) and out.isfinite().all()
    four = BYOLAugment(8, saturation=0, hue=0, grayscale_p=0)
    assert four(images(4, c=4)).shape == (4, 4, 8, 8)


def test_a_channels_last_batch_is_named_with_the_permute():
    """A data-API probe: a (B, H, W, 3) batch was told to turn saturation, hue and grayscale off, and with them
    off made 40-channel views without a word."""
    last = images(4, c=3, h=40, w=40).permute(0, 2, 3, 1)
    for aug in (BYOLAugment(32), BYOLAugment(32, saturation=0, hue=0, grayscale_p=0)):
        with pytest.raises(ValueError, match=r"channels last \(B, H, W, C\); put them first: x.permute\(0, 3, 1, 2\)"):
            aug(last)
    assert BYOLAugment(32)(last.permute(0, 3, 1, 2)).shape == (4, 3, 32, 32)
    four = BYOLAugment(8, saturation=0, hue=0, grayscale_p=0)  # 4 channels 3 pixels wide: images, as before
    assert four(images(2, c=4, h=8, w=3)).shape == (2, 4, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_draws_on_device():
    aug, x = BYOLAugment(16, view=2), images(32, seed=70)
    p = aug.sample_params(32, 20, 24, generator=gen(71))
    cpu = aug.apply_params(x, p)
    gpu = aug.apply_params(x.cuda(), AugmentParams(**{k: v.cuda() for k, v in vars(p).items()}))
    assert gpu.is_cuda and ((gpu.cpu() - cpu).abs() > 1e-4).float().mean() < 1e-3
    g = torch.Generator("cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync in the forward raises
    try:
        a, b = aug(x.cuda(), generator=g.manual_seed(5)), aug(x.cuda(), generator=g.manual_seed(5))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="generator"):
        aug(x.cuda(), generator=gen(5))
    with torch.autocast("cuda", dtype=torch.float16):
        out = aug((x * 255).to(torch.uint8).cuda())
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_deepcopy_pickle_and_compile_without_graph_breaks():
    aug, x = BYOLAugment(16, view=2), images(4, seed=80)
    for clone in (copy.deepcopy(aug), pickle.loads(pickle.dumps(aug))):
        assert torch.equal(clone(x, generator=gen(6)), aug(x, generator=gen(6)))
    explanation = torch._dynamo.explain(BYOLAugment(16))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.rand(3, 8, 8), ValueError, "unsqueeze"),
        (torch.rand(0, 3, 8, 8), ValueError, "empty"),
        (torch.rand(2, 2, 8, 8), ValueError, "saturation=0, hue=0, grayscale_p=0"),
        (torch.rand(2, 4, 8, 8), ValueError, "3 channels"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), TypeError, "uint8"),
        ([[0.0]], TypeError, "Tensor"),
    ],
)
def test_bad_input_raises_with_fix(x, error, match):
    with pytest.raises(error, match=match):
        BYOLAugment(8)(x)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0,), {}, ValueError, "image_size"),
        (((8, -1),), {}, ValueError, "image_size"),
        ((8, 3), {}, ValueError, "view"),
        ((8,), dict(flip_prob=0.5), TypeError, "flip_p"),
        ((8,), dict(solarize_p=1.5), ValueError, "solarize_p"),
        ((8,), dict(hue=0.7), ValueError, "hue"),
        ((8,), dict(crop_scale=(0.5, 0.1)), ValueError, "crop_scale"),
        ((8,), dict(std=(0.0,)), ValueError, "std"),
        (("big",), {}, TypeError, "image_size must be a positive int"),
        ((8,), dict(flip_p=None), TypeError, "flip_p must be a number in"),
        ((8,), dict(blur_p="x"), TypeError, "blur_p must be a number in"),
    ],
)
def test_bad_settings_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        BYOLAugment(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(brightness=math.inf), ValueError, r"brightness=inf must be .* finite numbers"),
        (dict(contrast=(0.5, math.nan)), ValueError, r"contrast=\(0\.5, nan\) must be"),
        (dict(brightness=-0.1), ValueError, r"brightness=-0\.1 must be .*or a strength >= 0"),
        (dict(hue=-0.1), ValueError, r"hue=-0\.1 must be"),
        (dict(brightness=True), ValueError, r"brightness=True must be"),
        (dict(std=math.nan), ValueError, "std must be a positive finite number"),
        (dict(std=math.inf), ValueError, "std must be a positive finite number"),
        (dict(mean=(math.nan,) * 3), ValueError, "mean must be a finite number or a sequence"),
        (dict(mean="abc"), ValueError, "mean must be a finite number or a sequence of them .* got 'abc'"),
        (
            dict(generator=5),
            TypeError,
            r"generator must be a torch\.Generator .*torch\.Generator\(\)\.manual_seed\(5\)",
        ),
    ],
)
def test_settings_that_would_give_nan_or_zero_views_are_refused(kwargs, error, match):
    """Before: brightness=inf, std=nan or mean=nan gave NaN views, std=inf all-zero views; a negative strength was
    shown as a pair never passed, '(nan, 0.9)'; generator=5 failed at the first call with an AttributeError."""
    with pytest.raises(error, match=match):
        BYOLAugment(8, **kwargs)


def test_numpy_floats_and_arrays_are_settings_as_python_numbers_are():
    np = pytest.importorskip("numpy")
    augment = BYOLAugment(8, brightness=np.float32(0.4), crop_scale=np.array([0.2, 1.0]))
    assert augment.settings["brightness"] == pytest.approx((0.6, 1.4))
    assert augment.settings["crop_scale"] == (0.2, 1.0)


def test_zero_dimensional_tensors_and_arrays_are_their_number():
    """Before: brightness=torch.tensor(0.4) was refused ('must be a (low, high) pair') while a 1-d tensor pair was
    taken; a 0-d bool tensor stays refused as True is."""
    np = pytest.importorskip("numpy")
    augment = BYOLAugment(8, brightness=torch.tensor(0.4), hue=np.array(0.1), crop_scale=torch.tensor([0.2, 1.0]))
    assert augment.settings["brightness"] == pytest.approx((0.6, 1.4))
    assert augment.settings["hue"] == pytest.approx((-0.1, 0.1))
    assert augment.settings["crop_scale"] == pytest.approx((0.2, 1.0))
    with pytest.raises(ValueError, match=r"contrast=True must be"):
        BYOLAugment(8, contrast=torch.tensor(True))
    probabilities = BYOLAugment(8, flip_p=torch.tensor(0.25), blur_p=np.array(0.5))  # review: refused before
    assert (probabilities.flip_p, probabilities.blur_p) == (0.25, 0.5)
    with pytest.raises(TypeError, match=r"flip_p must be a number in \[0, 1\], got True"):
        BYOLAugment(8, flip_p=torch.tensor(True))


def test_describe_and_repr_say_what_the_view_does():
    """Before: describe() printed (low, high) jitter ranges as 'brightness 0.1 ... hue 0.05' for (0.2, 1.1) and
    (-0.3, 0.05); repr() said blur_p=1.0 for a view whose one-pixel kernel blurs nothing (settings: 0.0)."""
    line = BYOLAugment(32, brightness=(0.2, 1.1), hue=(-0.3, 0.05), contrast=0.8).describe()
    assert "brightness 0.2 to 1.1, contrast 0.8, saturation 0.2, hue -0.3 to 0.05" in line
    assert "(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)" in BYOLAugment(224).describe()
    assert "brightness 1.5," in BYOLAugment(32, brightness=1.5).describe()  # cut at 0: still a strength
    tiny = BYOLAugment(8, preset="paper")
    assert tiny.settings["blur_p"] == 0.0 and "blur_p=0.0" in repr(tiny) and "no blur" in tiny.describe()


def test_numpy_integer_sizes_are_sizes():
    np = pytest.importorskip("numpy")
    assert BYOLAugment(np.int64(8)).size == (8, 8)
    assert BYOLAugment((np.int32(8), 12)).size == (8, 12)


def test_mean_std_length_must_match_channels():
    with pytest.raises(ValueError, match="3 channels"):
        BYOLAugment(8, mean=(0.5, 0.5))(images(2))


# ---------------------------------------------------------------- benchmark script


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_views_are_the_same_under_another_default_dtype(default):
    """A probe: under torch.set_default_dtype (what Lightning's and Fabric's "64-true" / "bf16-true" do around
    the forward) the default views failed at the resize ("scatter(): Expected self.dtype to be equal to
    src.dtype"). They work in float32 whatever the default, so they are the views float32 makes."""
    aug, x = BYOLAugment(16), images(8, seed=62)
    x8 = (x * 255).round().to(torch.uint8)
    want = [aug(x, generator=gen(5)), aug(x8, generator=gen(6)), BYOLAugment(16, view=2)(x, generator=gen(7))]
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = [aug(x, generator=gen(5)), aug(x8, generator=gen(6)), BYOLAugment(16, view=2)(x, generator=gen(7))]
    finally:
        torch.set_default_dtype(before)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_one_number_for_the_crop_area_is_refused_with_both_meanings():
    with pytest.raises(ValueError, match=r"crop_scale=0.2: .*\(0.2, 1.0\) for a minimum.*\(0.2, 0.2\) for a fixed"):
        BYOLAugment(16, crop_scale=0.2)  # was a fixed area of 0.2 without a word
    assert BYOLAugment(16, crop_scale=(0.2, 0.2)).crop_scale == (0.2, 0.2)
    assert BYOLAugment(16, crop_scale=[0.2, 1]).crop_scale == (0.2, 1.0)

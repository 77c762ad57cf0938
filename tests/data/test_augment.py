"""Batched augmentation: each step checked with hand-set parameters, then the sampled pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from raymix.config import AugmentConfig
from raymix.data import TwoViewAugment, ViewParams, apply_view, normalize, sample_view_params
from raymix.data.augment import blur_kernel_size, hsv_to_rgb, rgb_to_hsv

B, H = 4, 16


def _images(seed: int = 0, batch: int = B, size: int = H) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _identity(batch: int = B) -> ViewParams:
    """Full-image box, no flip, every other step masked off."""
    half, one = torch.full((batch,), 0.5), torch.ones(batch)
    off = torch.zeros(batch, dtype=torch.bool)
    return ViewParams(
        cx=half,
        cy=half,
        w=one,
        h=one,
        flip=off,
        jitter=off,
        brightness=one,
        contrast=one,
        saturation=one,
        hue=torch.zeros(batch),
        grayscale=off,
        blur=off,
        sigma=one,
        solarize=off,
    )


def _with(params: ViewParams, **changes: torch.Tensor | float | bool) -> ViewParams:
    """Replace fields; scalars are broadcast to the batch."""
    batch = params.cx.shape[0]
    full: dict[str, torch.Tensor] = {}
    for key, value in changes.items():
        if isinstance(value, torch.Tensor):
            full[key] = value
        elif isinstance(value, bool):
            full[key] = torch.full((batch,), value, dtype=torch.bool)
        else:
            full[key] = torch.full((batch,), float(value))
    return dataclasses.replace(params, **full)


def test_identity_params_return_the_input() -> None:
    x = _images()
    out = apply_view(x, _identity(), H)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_flip_mirrors_exactly() -> None:
    x = _images()
    out = apply_view(x, _with(_identity(), flip=True), H)
    torch.testing.assert_close(out, x.flip(-1), atol=1e-6, rtol=0)


def test_left_half_crop_is_the_upsampled_half() -> None:
    x = _images()
    out = apply_view(x, _with(_identity(), cx=0.25, w=0.5), H)
    expected = F.interpolate(x[..., : H // 2], size=(H, H), mode="bilinear", align_corners=False)
    # Only the seam column may read across the crop edge; everything else matches closely.
    torch.testing.assert_close(out[..., :-1], expected[..., :-1], atol=1e-5, rtol=0)
    assert (out - expected).abs().mean() < 0.02


def test_vertical_crop_and_resize() -> None:
    x = _images(size=32)
    out = apply_view(x, _with(_identity(), cy=0.75, h=0.5, w=0.5, cx=0.5), 16)
    # A 16 x 16 window at rows 16..31, columns 8..23 resampled to 16 x 16 (no scaling): exact copy.
    torch.testing.assert_close(out, x[:, :, 16:, 8:24], atol=1e-6, rtol=0)


def test_grayscale_gives_equal_channels_with_luma() -> None:
    x = _images()
    out = apply_view(x, _with(_identity(), grayscale=True), H)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(out[:, 0], luma, atol=1e-6, rtol=0)


def test_solarize_formula() -> None:
    x = _images()
    out = apply_view(x, _with(_identity(), solarize=True), H)
    expected = torch.where(x >= 0.5, 1 - x, x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert out.max() <= 0.5


def test_blur_keeps_constants_and_means() -> None:
    constant = torch.full((B, 3, H, H), 0.3)
    params = _with(_identity(), blur=True, sigma=torch.tensor([0.1, 0.5, 1.0, 2.0]))
    torch.testing.assert_close(apply_view(constant, params, H), constant, atol=1e-6, rtol=0)

    x = _images()
    out = apply_view(x, params, H)
    torch.testing.assert_close(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.01, rtol=0)
    # Larger sigma smooths more: the pixel variance decreases along the batch.
    variance = out.var(dim=(1, 2, 3))
    assert (variance[1:] < variance[:-1]).all()
    assert blur_kernel_size(H) == 3 and blur_kernel_size(224) == 23 and blur_kernel_size(64) % 2 == 1


def test_blur_matches_a_reference_convolution() -> None:
    x = _images(batch=1)
    sigma = 1.3
    out = apply_view(x, _with(_identity(batch=1), blur=True, sigma=sigma), H)
    k = blur_kernel_size(H)
    offsets = torch.arange(k, dtype=torch.float32) - k // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(3, 1, k, k)
    padded = F.pad(x, (k // 2,) * 4, mode="reflect")
    expected = F.conv2d(padded, kernel2d, groups=3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_neutral_jitter_is_identity() -> None:
    x = _images()
    out = apply_view(x, _with(_identity(), jitter=True), H)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_jitter_factors() -> None:
    x = _images() * 0.5  # stays inside [0, 1] after doubling the brightness
    out = apply_view(x, _with(_identity(), jitter=True, brightness=2.0), H)
    torch.testing.assert_close(out, 2 * x, atol=1e-5, rtol=0)

    out = apply_view(x, _with(_identity(), jitter=True, saturation=0.0), H)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)

    out = apply_view(x, _with(_identity(), jitter=True, contrast=0.0), H)
    flat = out.flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-5)  # one grey level per image


def test_hue_shift() -> None:
    pure_red = torch.zeros(1, 3, 2, 2)
    pure_red[:, 0] = 1.0
    third = _with(_identity(batch=1), jitter=True, hue=1 / 3)
    green = apply_view(pure_red, third, 2)
    torch.testing.assert_close(green, pure_red.roll(1, dims=1), atol=1e-5, rtol=0)

    x = _images()
    half = _with(_identity(), jitter=True, hue=0.5)
    twice = apply_view(apply_view(x, half, H), half, H)
    torch.testing.assert_close(twice, x, atol=1e-5, rtol=0)


def test_hsv_round_trip() -> None:
    x = _images(batch=8)
    x[0] = 0.0  # black: saturation 0, hue undefined
    x[1] = 0.7  # gray
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    hsv = rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv[:, 0].max() < 1 and hsv[:, 1:].max() <= 1


def test_masked_off_samples_are_unchanged() -> None:
    x = _images()
    on = torch.tensor([True, False, True, False])
    params = _with(
        _identity(),
        jitter=on,
        brightness=1.3,
        contrast=0.7,
        saturation=1.5,
        hue=0.2,
        grayscale=on,
        blur=on,
        sigma=1.5,
        solarize=on,
    )
    out = apply_view(x, params, H)
    assert torch.equal(out[~on], apply_view(x, _identity(), H)[~on])
    torch.testing.assert_close(out[~on], x[~on], atol=1e-6, rtol=0)
    assert (out[on] - x[on]).abs().max() > 0.1


def test_sampled_params_follow_the_config() -> None:
    cfg = AugmentConfig()
    generator = torch.Generator().manual_seed(0)
    n = 4000
    p0 = sample_view_params(n, cfg, 0, generator, "cpu")
    p1 = sample_view_params(n, cfg, 1, generator, "cpu")
    area = p0.w * p0.h
    assert area.min() >= cfg.crop_scale[0] - 1e-6 and area.max() <= 1 + 1e-6
    ratio = p0.w / p0.h
    assert ratio.min() >= cfg.crop_ratio[0] - 1e-5 and ratio.max() <= cfg.crop_ratio[1] + 1e-5
    # Boxes lie inside the image.
    assert ((p0.cx - p0.w / 2) >= -1e-6).all() and ((p0.cx + p0.w / 2) <= 1 + 1e-6).all()
    assert ((p0.cy - p0.h / 2) >= -1e-6).all() and ((p0.cy + p0.h / 2) <= 1 + 1e-6).all()
    assert p0.flip.float().mean() == pytest.approx(cfg.flip_prob, abs=0.05)
    assert p0.jitter.float().mean() == pytest.approx(cfg.jitter_prob, abs=0.05)
    assert p0.grayscale.float().mean() == pytest.approx(cfg.grayscale_prob, abs=0.05)
    assert p0.blur.all() and p1.blur.float().mean() == pytest.approx(0.1, abs=0.03)
    assert not p0.solarize.any() and p1.solarize.float().mean() == pytest.approx(0.2, abs=0.03)
    assert p0.brightness.min() >= 0.6 and p0.brightness.max() <= 1.4
    assert p0.hue.abs().max() <= cfg.hue
    assert p0.sigma.min() >= 0.1 and p0.sigma.max() <= 2.0
    with pytest.raises(ValueError):
        sample_view_params(2, cfg, 2, generator, "cpu")


def test_crop_fallback_when_nothing_fits() -> None:
    # Ratios far from 1 with the whole area never fit: the fallback is the widest allowed box.
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 3.0))
    p = sample_view_params(8, cfg, 0, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(p.w, torch.ones(8))
    torch.testing.assert_close(p.h, torch.full((8,), 0.5))


def test_two_views_shape_normalisation_and_determinism() -> None:
    images = (torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    augment = TwoViewAugment(AugmentConfig(), 12, mean, std)
    a1, a2 = augment(images, torch.Generator().manual_seed(7))
    b1, b2 = augment(images, torch.Generator().manual_seed(7))
    c1, _ = augment(images, torch.Generator().manual_seed(8))
    assert a1.shape == a2.shape == (6, 3, 12, 12) and a1.dtype == torch.float32
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1) and not torch.equal(a1, a2)
    # Undoing the normalisation gives values in [0, 1].
    raw = a1 * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="uint8"):
        augment(images.float(), torch.Generator())


def test_normalize() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(images, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 2.0]))
    assert normalize(images[0], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).shape == (3, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_generator_and_tensors() -> None:
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8).cuda()
    augment = TwoViewAugment(AugmentConfig(), 16, (0.5,) * 3, (0.25,) * 3)
    v1, v2 = augment(images, torch.Generator(device="cuda").manual_seed(0))
    assert v1.is_cuda and v2.shape == (4, 3, 16, 16)

"""Batched two-view augmentation on the training device.

Everything works on whole ``(B, 3, H, W)`` batches wherever they live (CPU or GPU): no per-image
Python loops and no PIL. Randomness is an argument: :func:`sample_view_params` draws every random
number from a ``torch.Generator``, and :func:`apply_view` applies those parameters
deterministically, so tests can check exact outputs and a run is reproducible from its seed.

The recipe is MoCo v3's (SimCLR/BYOL family): random resized crop + flip, colour jitter,
grayscale, gaussian blur and solarisation, with per-view blur/solarize probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raymix.config import AugmentConfig

# Attempts per sample of the vectorised RandomResizedCrop before the whole-image fallback (as torchvision).
CROP_ATTEMPTS = 10

# ITU-R 601 luma weights for R, G, B (the ones torchvision's rgb_to_grayscale uses).
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewParams:
    """Per-sample random parameters of one augmented view; every field is a (B,) tensor.

    Crop boxes are in fractions of the image: centre ``(cx, cy)`` and size ``(w, h)``.
    """

    cx: torch.Tensor
    cy: torch.Tensor
    w: torch.Tensor
    h: torch.Tensor
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: apply colour jitter
    brightness: torch.Tensor  # multiplicative factor
    contrast: torch.Tensor  # blend factor towards the per-image grayscale mean
    saturation: torch.Tensor  # blend factor towards the grayscale image
    hue: torch.Tensor  # hue shift in turns, in [-0.5, 0.5]
    grayscale: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # gaussian blur sigma in output pixels
    solarize: torch.Tensor  # bool


# ---------------------------------------------------------------- sampling


#: Uniform numbers one sample of one view draws: an area and a log ratio per crop attempt, the
#: crop's position (2), and flip, jitter, brightness, contrast, saturation, hue, grayscale,
#: blur, sigma and solarize (10).
DRAWS_PER_SAMPLE = 2 * CROP_ATTEMPTS + 2 + 10


def _scaled(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniforms in [0, 1) mapped to [low, high)."""
    return low + (high - low) * u


def crop_boxes(
    uniforms: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes ``(cx, cy, w, h)`` as fractions of a square image, each (B,),
    from ``uniforms`` (B, 2 * CROP_ATTEMPTS + 2) drawn in [0, 1).

    As torchvision: the area fraction is U(scale), the log aspect ratio U(log ratio); a box that does
    not fit is redrawn, here as CROP_ATTEMPTS draws in parallel taking the first that fits, and the
    whole image (with its ratio clamped into ``ratio``) when none does. The position is uniform.
    """
    attempts = CROP_ATTEMPTS
    area = _scaled(uniforms[:, :attempts], scale[0], scale[1])  # (B, A)
    log_ratio = _scaled(uniforms[:, attempts : 2 * attempts], math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w_try = torch.sqrt(area * aspect)  # (B, A)
    h_try = torch.sqrt(area / aspect)
    fits = (w_try <= 1.0) & (h_try <= 1.0)  # (B, A)
    # argmax on the int mask returns the first attempt that fits (0 when none fits; handled below).
    first = fits.int().argmax(dim=1, keepdim=True)  # (B, 1)
    w = w_try.gather(1, first).squeeze(1)  # (B,)
    h = h_try.gather(1, first).squeeze(1)
    # Fallback box of a square image: full size, narrowed to the nearest allowed aspect ratio.
    fallback_w = min(1.0, ratio[1])
    fallback_h = min(1.0, 1.0 / ratio[0])
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w, torch.full_like(w, fallback_w))
    h = torch.where(any_fit, h, torch.full_like(h, fallback_h))
    position = uniforms[:, 2 * attempts : 2 * attempts + 2]
    cx = w / 2 + position[:, 0] * (1 - w)
    cy = h / 2 + position[:, 1] * (1 - h)
    return cx, cy, w, h


def sample_view_params(
    batch: int, cfg: AugmentConfig, view: int, generator: torch.Generator, device: torch.device | str
) -> ViewParams:
    """Draw the parameters of augmented view ``view`` (0 or 1) for a batch of ``batch`` images.

    ``generator`` must live on ``device`` (a CUDA generator for CUDA tensors). Every number comes
    from one (B, DRAWS_PER_SAMPLE) draw: one kernel, and a generator state fully determines the
    result.
    """
    if view not in (0, 1):
        raise ValueError(f"view must be 0 or 1, got {view}")
    dev = torch.device(device)
    u = torch.rand((batch, DRAWS_PER_SAMPLE), generator=generator, device=dev)
    cx, cy, w, h = crop_boxes(u[:, : 2 * CROP_ATTEMPTS + 2], cfg.crop_scale, cfg.crop_ratio)
    (flip, jitter, brightness, contrast, saturation, hue, grayscale, blur, sigma, solarize) = u[
        :, 2 * CROP_ATTEMPTS + 2 :
    ].unbind(dim=1)
    # Factor ranges follow torchvision's ColorJitter: [max(0, 1 - x), 1 + x] and hue in [-hue, hue].
    flip = flip < cfg.flip_prob
    jitter = jitter < cfg.jitter_prob
    brightness = _scaled(brightness, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)
    contrast = _scaled(contrast, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
    saturation = _scaled(saturation, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)
    hue = _scaled(hue, -cfg.hue, cfg.hue)
    grayscale = grayscale < cfg.grayscale_prob
    blur = blur < cfg.blur_prob[view]
    sigma = _scaled(sigma, cfg.blur_sigma[0], cfg.blur_sigma[1])
    solarize = solarize < cfg.solarize_prob[view]
    return ViewParams(
        cx=cx,
        cy=cy,
        w=w,
        h=h,
        flip=flip,
        jitter=jitter,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        grayscale=grayscale,
        blur=blur,
        sigma=sigma,
        solarize=solarize,
    )


# ---------------------------------------------------------------- geometry


def resized_crop(images: torch.Tensor, params: ViewParams, out_size: int) -> torch.Tensor:
    """Crop each box, flip where set and resize to ``out_size``: one bilinear grid_sample.

    With align_corners=False, normalised coordinates -1 and 1 are the outer image edges, so the
    output-to-input map of a box is ``x_in = (2 cx - 1) + w x_out`` (times -1 for a flip). Border
    padding makes samples within half a pixel of the edge behave like F.interpolate's clamping.
    """
    batch = images.shape[0]
    sign = 1.0 - 2.0 * params.flip.to(images.dtype)  # (B,) -1 where flipped
    theta = images.new_zeros(batch, 2, 3)  # (B, 2, 3) affine output -> input maps
    theta[:, 0, 0] = params.w.to(images.dtype) * sign
    theta[:, 0, 2] = 2 * params.cx.to(images.dtype) - 1
    theta[:, 1, 1] = params.h.to(images.dtype)
    theta[:, 1, 2] = 2 * params.cy.to(images.dtype) - 1
    grid = F.affine_grid(theta, [batch, images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- colour


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor viewed as (B, 1, 1, 1) in the dtype of ``like`` for broadcasting."""
    return values.to(like.dtype).view(-1, 1, 1, 1)


def _where(mask: torch.Tensor, changed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Take ``changed`` where the per-sample mask is set, else ``original`` bit for bit."""
    return torch.where(mask.view(-1, 1, 1, 1), changed, original)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of (B, 3, H, W) images as (B, 1, H, W)."""
    r, g, b = images.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] to HSV with hue in turns [0, 1)."""
    r, g, b = images.unbind(dim=1)  # (B, H, W) each
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    # Safe denominators: where they are 0 the results are overwritten with 0 below.
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    safe_max = torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    saturation = torch.where(maxc > 0, delta / safe_max, torch.zeros_like(maxc))
    hue_r = (g - b) / safe_delta
    hue_g = 2.0 + (b - r) / safe_delta
    hue_b = 4.0 + (r - g) / safe_delta
    hue = torch.where(maxc == r, hue_r, torch.where(maxc == g, hue_g, hue_b))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack([hue, saturation, maxc], dim=1)  # (B, 3, H, W)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV (hue in turns) to RGB.

    Closed form per channel: f(n) = V - V S clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6.
    """
    hue, sat, val = hsv.unbind(dim=1)  # (B, H, W) each
    # n = 5, 3, 1 for R, G, B (from arange: no tensor copied from the host)
    n = (5.0 - 2.0 * torch.arange(3, dtype=hsv.dtype, device=hsv.device)).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return val.unsqueeze(1) - (val * sat).unsqueeze(1) * ramp


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * grayscale(images)).clamp(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0] + shift.to(images.dtype).view(-1, 1, 1), 1.0)  # (B, H, W)
    return hsv_to_rgb(torch.cat([hue.unsqueeze(1), hsv[:, 1:]], dim=1))


def color_jitter(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Brightness, contrast, saturation, hue in this fixed order, only on samples with ``params.jitter``.

    Each step clamps to [0, 1] like torchvision's float path.
    """
    out = adjust_brightness(images, params.brightness)
    out = adjust_contrast(out, params.contrast)
    out = adjust_saturation(out, params.saturation)
    out = adjust_hue(out, params.hue)
    return _where(params.jitter, out, images)


# ---------------------------------------------------------------- blur and solarize


def blur_kernel_size(image_size: int) -> int:
    """Odd kernel side of about 10% of the image (as SimCLR: 23 px at 224), at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable gaussian blur with a per-sample sigma: two grouped convolutions, reflect padding."""
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - half  # (K,)
    s = sigma.to(images.dtype).view(-1, 1)  # (B, 1)
    kernel = torch.exp(-(offsets**2) / (2 * s**2))  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    # One depthwise filter per (sample, channel): the batch is folded into the channel axis.
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, K)
    x = images.reshape(1, batch * channels, height, width)  # (1, B*C, H, W)
    x = F.pad(x, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)  # rows
    x = F.conv2d(x, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)  # columns
    return x.reshape(batch, channels, height, width)


def solarize(images: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` (x -> 1 - x) on samples where ``mask`` is set."""
    return torch.where(mask.view(-1, 1, 1, 1) & (images >= threshold), 1.0 - images, images)


# ---------------------------------------------------------------- the view


def flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (B, C, H, W) images left-right where the per-sample ``mask`` is set."""
    return _where(mask, images.flip(-1), images)


def apply_view(
    images: torch.Tensor, params: ViewParams, out_size: int, cropped: bool = False
) -> torch.Tensor:
    """Apply one view's parameters to (B, 3, H, W) float images in [0, 1] -> (B, 3, out, out) in [0, 1].

    Order: resized crop + flip, colour jitter, grayscale, gaussian blur, solarize. A sample whose mask
    is off for a step passes through that step unchanged. ``cropped``: the images are this view's
    crops already (image folders crop while decoding), so only the flip is applied.
    """
    x = flip(images, params.flip) if cropped else resized_crop(images, params, out_size)
    x = color_jitter(x, params)
    x = _where(params.grayscale, grayscale(x).expand_as(x), x)
    x = _where(params.blur, gaussian_blur(x, params.sigma, blur_kernel_size(out_size)), x)
    x = solarize(x, params.solarize)
    return x.clamp(0.0, 1.0)


def _stats_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=like.device).view(-1, 1, 1)  # (3, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``: the evaluation path."""
    x = images.to(torch.float32) / 255.0
    return (x - _stats_tensor(mean, x)) / _stats_tensor(std, x)


class TwoViewAugment:
    """uint8 batches -> independently augmented, normalised float32 views.

    The normalisation constants live on the training device, made once per device (no
    copy from the host at each step).
    """

    def __init__(
        self, cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (3, 1, 1) float32 on ``device``."""
        if device not in self._stats:
            probe = torch.empty(0, device=device)
            self._stats[device] = (_stats_tensor(self.mean, probe), _stats_tensor(self.std, probe))
        return self._stats[device]

    def view(
        self, images: torch.Tensor, view: int, generator: torch.Generator, cropped: bool = False
    ) -> torch.Tensor:
        """One normalised view of float images in [0, 1] (B, 3, H, W) -> (B, 3, S, S) float32.

        ``cropped``: ``images`` are this view's crops at size S already (flip and colour remain).
        """
        params = sample_view_params(images.shape[0], self.cfg, view, generator, images.device)
        x = apply_view(images, params, self.image_size, cropped=cropped)
        mean, std = self.stats(x.device)
        return (x - mean) / std

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, views: int = 2
    ) -> tuple[torch.Tensor, ...]:
        """uint8 (B, 3, H, W) on the training device -> ``views`` (1 or 2) float32 views (B, 3, S, S).

        Images already cropped per view, (B, V, 3, S, S) with V >= ``views`` (image folders), skip
        the crop. View 0 draws the same parameters whether or not view 1 follows.
        """
        cropped = images.dim() == 5
        if images.dtype != torch.uint8 or images.dim() not in (4, 5) or images.shape[-3] != 3:
            raise ValueError(
                "expected uint8 images (B, 3, H, W) or (B, V, 3, S, S), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if views not in (1, 2) or (cropped and images.shape[1] < views):
            raise ValueError(f"views must be 1 or 2 (and at most the crops given), got {views}")
        x = images.to(torch.float32) / 255.0
        if cropped:
            return tuple(self.view(x[:, view], view, generator, cropped=True) for view in range(views))
        return tuple(self.view(x, view, generator) for view in range(views))

"""Batched slice augmentation on torch that respects anatomy: random scale, small rotation,
optional left-right flip, intensity jitter.

One random geometric transform per slice is applied to the image *and* to any extra maps passed
with it (C-CAM's coarse mask, a location prior), so they stay aligned: label maps (integer or
bool tensors) are resampled with nearest neighbour, float maps bilinearly. Intensity jitter
touches the image only. Everything runs on the tensors' device; random numbers come from
``generator`` (or torch's global RNG, which `ccam.training.EpochLoop` re-seeds every epoch), so
a seed gives the same augmentations on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ccam.data.cohort import has_left_right_pair


def _uniform(n: int, lo: float, hi: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def random_affines(n: int, scale: Sequence[float] = (1.0, 1.0), rotate_deg: float = 0.0, flip: bool = False,
                   generator: Optional[torch.Generator] = None, translate: float = 0.0) -> torch.Tensor:
    """(n, 2, 3) affine matrices for ``F.affine_grid`` (output -> input normalised coordinates).

    A zoom factor z from ``scale`` enlarges the anatomy by z (the sampling grid shrinks by 1/z),
    the rotation is uniform in +-``rotate_deg``, the shift uniform in +-``translate`` of the slice
    width per axis, and with ``flip`` half the slices are mirrored left-right.
    """
    zoom = _uniform(n, float(scale[0]), float(scale[1]), generator)
    angle = _uniform(n, -1.0, 1.0, generator) * math.radians(float(rotate_deg))
    mirror = torch.ones(n)
    if flip:
        mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
    if translate > 0:  # normalised coordinates span 2 per axis
        theta[:, :, 2] = 2 * translate * (2 * torch.rand(n, 2, generator=generator) - 1)
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (B, C, H, W) or (B, H, W) maps with affines (B, 2, 3); outside the slice = 0.

    Integer/bool tensors are sampled with nearest neighbour and keep their dtype (labels stay
    labels); float tensors use ``mode``.
    """
    squeeze = x.dim() == 3
    t = x[:, None] if squeeze else x
    is_label = not torch.is_floating_point(t)
    src = t.float() if is_label else t
    grid = F.affine_grid(theta.to(device=src.device, dtype=src.dtype), list(src.shape), align_corners=False)
    out = F.grid_sample(src, grid, mode="nearest" if is_label else mode, padding_mode="zeros", align_corners=False)
    if is_label:
        out = out.round().to(x.dtype)
    return out[:, 0] if squeeze else out


def jitter_intensity(images: torch.Tensor, strength: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-slice contrast (x(1 +- s)), brightness (+- s) and gamma (2^(+-s)) on images (B, 1, H, W) in [0, 1]."""
    if strength <= 0:
        return images
    b = images.shape[0]
    shape = (b,) + (1,) * (images.dim() - 1)
    contrast = _uniform(b, 1 - strength, 1 + strength, generator).view(shape).to(images)
    bright = _uniform(b, -strength, strength, generator).view(shape).to(images)
    gamma = torch.pow(2.0, _uniform(b, -strength, strength, generator)).view(shape).to(images)
    # gamma on the clamped image keeps the [0, 1] range the normaliser of `prepare` produced
    return (images.clamp(0, 1).pow(gamma) * contrast + bright).clamp(0, 1)


@dataclass
class SliceAugment:
    """``aug(images, *maps) -> (images, *maps)`` with one random transform per slice.

    images (B, 1, S, S) float; maps (B, S, S) or (B, C, S, S), each warped like its image.
    ``flip`` must be False when the classes have a left/right twin (it swaps left and right organs).
    """

    scale: Sequence[float] = (0.9, 1.1)
    rotate_deg: float = 10.0
    flip: bool = False
    intensity: float = 0.1
    translate: float = 0.0

    @property
    def geometric(self) -> bool:
        return tuple(self.scale) != (1.0, 1.0) or self.rotate_deg > 0 or self.flip or self.translate > 0

    def __call__(self, images: torch.Tensor, *maps: torch.Tensor, generator: Optional[torch.Generator] = None):
        out_maps = list(maps)
        if self.geometric:
            theta = random_affines(images.shape[0], self.scale, self.rotate_deg, self.flip, generator, self.translate)
            images = warp(images, theta)
            out_maps = [warp(m, theta) for m in maps]
        images = jitter_intensity(images, self.intensity, generator)
        return (images, *out_maps) if maps else images

    @classmethod
    def from_pcam(cls, pcam_cfg, flip: bool) -> "SliceAugment":
        return cls(tuple(pcam_cfg.aug_scale), pcam_cfg.aug_rotate_deg, flip, pcam_cfg.aug_intensity, pcam_cfg.aug_translate)


def use_flip(setting: str, classes: list[str]) -> bool:
    """``auto`` flips only when no class has a left/right twin (a flip swaps left and right organs)."""
    if setting == "auto":
        return not has_left_right_pair(classes)
    return setting == "on"

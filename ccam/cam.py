"""Class activation maps for every CAM-producing model (P-CAM, C-CAM).

A model exposes ``cam_features(images, **extra) -> (B, D, h, w)`` and ``classifier`` (a 1x1
convolution without bias, D -> K). CAM_k = ReLU(sum_d w_{k,d} F_d) for all K classes comes from
one forward pass per scale, with no gradients; scales are summed after bilinear upsampling to
S x S, zeroed for classes the slice is not tagged with, and normalised per class by the maximum.
Everything stays on torch (and on the model's device) end to end.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _cam_at(model, images: torch.Tensor, size: tuple[int, int], **extra: torch.Tensor) -> torch.Tensor:
    feats = model.cam_features(images, **extra)
    cams = F.relu(F.conv2d(feats, model.classifier.weight))
    return F.interpolate(cams, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def multiscale_cams(model, images: torch.Tensor, tags: torch.Tensor | None, scales: Sequence[float] = (1.0,),
                    flip: bool = False, **extra: torch.Tensor) -> torch.Tensor:
    """CAMs (B, K, S, S) in [0, 1] for images (B, 1, S, S) and slice tags (B, K) (None = keep all).

    ``extra`` tensors of shape (B, ..., S, S) (e.g. C-CAM's coarse masks) are passed to
    ``cam_features`` and resized with the image at each scale (nearest, so labels stay labels).
    ``flip`` adds horizontal-flip averaging; never use it when classes have a left/right twin.
    """
    size = tuple(images.shape[-2:])
    total = None
    for s in scales:
        if s == 1.0:
            x, ex = images, extra
        else:
            hw = (max(1, int(round(size[0] * s))), max(1, int(round(size[1] * s))))
            x = F.interpolate(images, size=hw, mode="bilinear", align_corners=False)
            ex = {k: F.interpolate(v.float(), size=hw, mode="nearest") for k, v in extra.items()}
        cam = _cam_at(model, x, size, **ex)
        if flip:
            cam = cam + _cam_at(model, x.flip(-1), size, **{k: v.flip(-1) for k, v in ex.items()}).flip(-1)
        total = cam if total is None else total + cam
    if tags is not None:
        total = total * tags[:, :, None, None].to(total.dtype)
    peak = total.amax(dim=(2, 3), keepdim=True)
    return total / peak.clamp_min(1e-5)


def coarse_labels(cams: torch.Tensor, tau: float) -> torch.Tensor:
    """argmax over [tau, CAM_1..CAM_K]: (B, K, S, S) -> label map (B, S, S) in 0..K."""
    bg = torch.full_like(cams[:, :1], tau)
    return torch.cat([bg, cams], dim=1).argmax(1)

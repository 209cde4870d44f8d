"""Affinity refinement (AffinityNet, Ahn & Kwak 2018): seeds, affinity labels, random walk.

1. **Seeds.** From CAMs (K, S, S) a background score (1 - max_k CAM_k)^alpha at a low and a high
   alpha, each refined by a dense CRF on the slice (`pydensecrf2`); the low alpha gives confident
   foreground, the high alpha confident background; where the two label maps disagree is the
   unknown band (:data:`IGNORE`).
2. **Affinity labels.** On the stride-8 grid of AffinityNet, every pair (p, p + o) with o in a
   half disk of radius r is a background pair, a foreground pair (same class) or a cross-class
   pair; pairs touching the ignore band or leaving the grid are excluded.
3. **Random walk.** T = D^-1 A^beta over the full disk (self included, a_ii = 1), applied 2^t
   times to the CAMs with a background channel. T is stored as (B, (2R+1)^2, h, w) local weights
   (R = r - 1) and applied as shifted multiply-adds: never an (h*w) x (h*w) matrix, let alone
   an H*W x H*W one.

Everything on the hot path is torch (CPU or CUDA); only the CRF is numpy, one slice at a time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ccam.errors import UserError

IGNORE = 255  # seed label of the unknown band (and of pairs' out-of-grid partners)


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------
def background_score(cams: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, K, S, S) CAMs in [0, 1] -> (B, 1, S, S) background score (1 - max_k CAM_k)^alpha."""
    top = cams.amax(1, keepdim=True) if cams.shape[1] else torch.zeros_like(cams[:, :1])
    return (1.0 - top.clamp(0, 1)) ** alpha


def require_densecrf():
    """The `pydensecrf2` module, imported only when refinement runs (an optional dependency)."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise UserError("affinity refinement needs the dense CRF package 'pydensecrf2', which is not installed",
                        fix="pip install pydensecrf2 (or pip install 'ccam[crf]'), or set refine.enabled=false")
    return dcrf


def crf_inference(image: np.ndarray, probs: np.ndarray, iters: int = 10, gaussian_sxy: float = 3.0,
                  bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0) -> np.ndarray:
    """Dense CRF (Kraehenbuehl & Koltun) of the AffinityNet recipe on one grey slice.

    image (S, S) float in [0, 1]; probs (C, S, S) scores, not necessarily normalised (as in the
    original recipe, the unary is -log(score)). Returns the (C, S, S) float32 posterior.
    The compatibilities (3 for the smoothness kernel, 10 for the appearance kernel) are the
    recipe's; intensities are on a 0..255 scale, so ``bilateral_srgb`` means what it did there.
    """
    dcrf = require_densecrf()
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    unary = -np.log(np.clip(probs, 1e-5, 1.0)).reshape(c, -1).astype(np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    grey = np.clip(np.asarray(image, dtype=np.float32) * 255.0, 0, 255).astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))  # the C++ code wants 3 channels
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=3)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=10)
    return np.asarray(crf.inference(iters), dtype=np.float32).reshape(c, h, w)


def confident_seeds(image: np.ndarray, cams: np.ndarray, alpha_low: float, alpha_high: float, *,
                    crf_iters: int = 10, gaussian_sxy: float = 3.0, bilateral_sxy: float = 80.0,
                    bilateral_srgb: float = 13.0) -> np.ndarray:
    """Seed labels (S, S) uint8 for one slice: 0 background, k class k, :data:`IGNORE` unknown.

    image (S, S) float in [0, 1]; cams (K, S, S) in [0, 1] (untagged classes are 0).
    The low alpha makes the background score strong (only confident foreground survives), the
    high alpha weak (only confident background survives); both go through the dense CRF and
    pixels where the two label maps disagree form the ignore band.
    """
    cams = np.asarray(cams, dtype=np.float32)
    if not cams.any():  # an untagged slice is background everywhere, no CRF needed
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    t = torch.from_numpy(cams)[None]
    labels = []
    for alpha in (alpha_low, alpha_high):
        scores = torch.cat([background_score(t, alpha), t], 1)[0].numpy()
        post = crf_inference(image, scores, crf_iters, gaussian_sxy, bilateral_sxy, bilateral_srgb)
        labels.append(post.argmax(0))
    low, high = labels
    seeds = np.where(low == high, low, IGNORE)
    return seeds.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# pair geometry on the stride-8 grid
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def half_disk_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Offsets (dy, dx) with 0 < dy^2 + dx^2 < radius^2, one of each +-o pair (34 for radius 5)."""
    r = radius - 1
    out = [(0, dx) for dx in range(1, r + 1) if dx * dx < radius * radius]
    out += [(dy, dx) for dy in range(1, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx < radius * radius]
    return tuple(out)


def shift(x: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """out[..., y, x] = x[..., y + dy, x + dx], ``fill`` where that leaves the grid. (..., h, w)."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = (slice(0, max(0, h - dy)), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, max(0, h + dy)))
    xs, xd = (slice(0, max(0, w - dx)), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, max(0, w + dx)))
    out[..., ys, xs] = x[..., yd, xd]
    return out


def pair_valid(h: int, w: int, offsets, device=None) -> torch.Tensor:
    """(P, h, w) bool: the partner p + o of pixel p lies on the h x w grid."""
    ones = torch.ones(1, h, w, device=device)
    return torch.cat([shift(ones, dy, dx) for dy, dx in offsets]).bool()


def pair_affinities(feats: torch.Tensor, offsets) -> torch.Tensor:
    """a(p, p + o) = exp(-mean_d |f_d(p) - f_d(p + o)|): feats (B, D, h, w) -> (B, P, h, w).

    Pairs whose partner leaves the grid get a meaningless value; mask them with :func:`pair_valid`.
    """
    out = []
    for dy, dx in offsets:  # one offset at a time: memory stays at one (B, D, h, w) difference
        out.append(torch.exp(-(feats - shift(feats, dy, dx)).abs().mean(1)))
    return torch.stack(out, 1)


def seeds_to_grid(seeds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, S, S) seed labels -> (B, h, w): the label at the centre of each grid cell."""
    s_h, s_w = seeds.shape[-2:]
    ys = ((torch.arange(size[0], device=seeds.device) + 0.5) * s_h / size[0]).long().clamp(max=s_h - 1)
    xs = ((torch.arange(size[1], device=seeds.device) + 0.5) * s_w / size[1]).long().clamp(max=s_w - 1)
    return seeds[:, ys][:, :, xs]


def affinity_labels(grid_seeds: torch.Tensor, offsets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels from seeds on the grid (B, h, w) (0 bg, k class, IGNORE unknown).

    Returns three (B, P, h, w) float masks over pairs (p, p + o): background pairs (both 0),
    foreground pairs (both the same class k > 0) and cross-class pairs (different labels).
    A pair is in none of them when either end is IGNORE or the partner leaves the grid.
    """
    lab = grid_seeds.long()
    bg, fg, neg = [], [], []
    for dy, dx in offsets:
        other = shift(lab, dy, dx, fill=IGNORE)
        known = (lab != IGNORE) & (other != IGNORE)
        same = known & (lab == other)
        bg.append(same & (lab == 0))
        fg.append(same & (lab > 0))
        neg.append(known & (lab != other))
    return tuple(torch.stack(m, 1).float() for m in (bg, fg, neg))


def affinity_loss(aff: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """1/4 background-pair + 1/4 foreground-pair + 1/2 cross-class-pair cross-entropy.

    aff (B, P, h, w) predicted affinities in (0, 1]; bg/fg/neg masks from :func:`affinity_labels`.
    Each term is a mean over its own pairs, so a rare kind of pair still counts.
    """
    eps = 1e-5
    bg_loss = -(bg * torch.log(aff + eps)).sum() / bg.sum().clamp_min(1)
    fg_loss = -(fg * torch.log(aff + eps)).sum() / fg.sum().clamp_min(1)
    neg_loss = -(neg * torch.log(1.0 + eps - aff)).sum() / neg.sum().clamp_min(1)
    loss = bg_loss / 4 + fg_loss / 4 + neg_loss / 2
    return loss, {"bg_loss": bg_loss.detach().item(), "fg_loss": fg_loss.detach().item(), "neg_loss": neg_loss.detach().item()}


# --------------------------------------------------------------------------------------------
# random walk
# --------------------------------------------------------------------------------------------
def disk_slots(radius: int) -> list[tuple[int, int, int]]:
    """(slot, dy, dx) of the full disk (self included) in the (2R+1)^2 window, R = radius - 1."""
    r = radius - 1
    k = 2 * r + 1
    return [((dy + r) * k + (dx + r), dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
            if dy * dy + dx * dx < radius * radius]


def transition(aff_half: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """T = D^-1 A^beta as local weights (B, (2R+1)^2, h, w), R = radius - 1.

    aff_half (B, P, h, w): a(p, p + o) for the half-disk offsets of ``radius``; the other half
    comes from symmetry, a(p, p - o) = a(p - o, p), and a(p, p) = 1. Window slot
    (dy + R) * (2R + 1) + (dx + R) holds the weight of neighbour p + (dy, dx); pairs outside the
    disk or the grid weigh 0 and the weights of each cell sum to 1 (the D^-1).
    """
    offsets = half_disk_offsets(radius)
    b, p, h, w = aff_half.shape
    if p != len(offsets):
        raise ValueError(f"expected {len(offsets)} affinity offsets for radius {radius}, got {p}")
    r = radius - 1
    k = 2 * r + 1
    valid = pair_valid(h, w, offsets, aff_half.device)
    a = aff_half.clamp(0, 1) * valid
    window = aff_half.new_zeros(b, k * k, h, w)
    window[:, r * k + r] = 1.0
    for i, (dy, dx) in enumerate(offsets):
        window[:, (dy + r) * k + (dx + r)] = a[:, i]
        window[:, (-dy + r) * k + (-dx + r)] = shift(a[:, i], -dy, -dx)
    window = window.pow(beta)
    return window / window.sum(1, keepdim=True)


def random_walk(scores: torch.Tensor, trans: torch.Tensor, radius: int, steps: int) -> torch.Tensor:
    """Apply x <- T x ``steps`` times: scores (B, C, h, w), trans (B, (2R+1)^2, h, w) -> (B, C, h, w).

    Each step makes every grid cell the affinity-weighted mean of its disk: one shifted
    multiply-add per disk offset, O(steps * C * h * w * disk) work and no (h*w) x (h*w) matrix.
    """
    h, w = scores.shape[-2:]
    r = radius - 1
    slots = disk_slots(radius)
    weights = [trans[:, s:s + 1] for s, _, _ in slots]  # (B, 1, h, w) each, shared by every channel
    x = scores
    for _ in range(steps):
        padded = F.pad(x, (r, r, r, r))
        acc = torch.zeros_like(x)
        for wgt, (_, dy, dx) in zip(weights, slots):
            acc.addcmul_(padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w], wgt)
        x = acc
    return x


def walk_scores(cams: torch.Tensor, aff_half: torch.Tensor, *, radius: int, beta: float, t: int,
                background: torch.Tensor | float) -> torch.Tensor:
    """Propagate CAMs by the random walk on the stride-8 grid.

    cams (B, K, S, S) in [0, 1]; aff_half (B, P, h, w) from AffinityNet; ``background`` a
    constant score or a (B, 1, S, S) map. Returns the walked scores (B, C, S, S), C = K + 1
    (background first), upsampled bilinearly to S x S; argmax gives the refined labels.
    """
    size = cams.shape[-2:]
    grid = aff_half.shape[-2:]
    if torch.is_tensor(background):
        bg = background.to(cams.dtype)
    else:
        bg = torch.full_like(cams[:, :1], float(background))
    scores = torch.cat([bg, cams], 1)
    small = F.adaptive_avg_pool2d(scores, grid)  # the CAMs on the walk's grid
    walked = random_walk(small, transition(aff_half, radius, beta), radius, 2 ** t)
    return F.interpolate(walked, size=size, mode="bilinear", align_corners=False)

"""Segmentation metrics on label volumes, from MONAI: Dice, HD95 and ASSD in millimetres.

All functions take label maps (I, J, K) with 0 = background and 1..K = classes, on the same grid.
A class absent from both prediction and ground truth gives NaN (left out of means, not zero).
Also the one reader of a case's ground-truth mask (`read_ground_truth`, evaluation only) and the
left/right swap rates of a pooled confusion matrix (`confusion`, `swap_rates`).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance

from ccam.errors import UserError
from ccam.io.volume import Volume, read_volume


def _onehot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(I, J, K) -> (1, C, I, J, K) uint8 one-hot, C = num_classes + 1."""
    t = torch.as_tensor(np.asarray(labels).astype(np.int64)).clamp_(0, num_classes)
    return F.one_hot(t, num_classes + 1).movedim(-1, 0)[None].to(torch.uint8)


def dice_per_class(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) Dice per foreground class; NaN where the class is in neither volume."""
    d = compute_dice(_onehot(pred, num_classes), _onehot(gt, num_classes), include_background=False, ignore_empty=False)[0].numpy()
    both_empty = np.array([not ((pred == k).any() or (gt == k).any()) for k in range(1, num_classes + 1)])
    d = d.astype(np.float64)
    d[both_empty] = np.nan
    return d


def surface_distances(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(HD95 (K,), ASSD (K,)) in the units of ``spacing`` (mm); NaN where either volume lacks the class.

    One MONAI edge-distance computation per class serves both metrics (HD95 = max of the two
    directed 95th percentiles, as `compute_hausdorff_distance`; ASSD = mean over both surfaces,
    as `compute_average_surface_distance(symmetric=True)`), on the class's bounding box only.
    """
    sp = [float(s) for s in spacing]
    hd = np.full(num_classes, np.nan)
    asd = np.full(num_classes, np.nan)
    for k in range(1, num_classes + 1):
        p, g = np.asarray(pred) == k, np.asarray(gt) == k
        if not (p.any() and g.any()):
            continue
        idx = np.argwhere(p | g)
        lo, hi = np.maximum(idx.min(0) - 1, 0), idx.max(0) + 2
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, (d_pg, d_gp), _ = get_edge_surface_distance(torch.from_numpy(p[box]), torch.from_numpy(g[box]),
                                                           spacing=sp, symmetric=True)
        d_pg, d_gp = d_pg.double(), d_gp.double()
        hd[k - 1] = max(torch.quantile(d_pg, 0.95).item(), torch.quantile(d_gp, 0.95).item())
        asd[k - 1] = ((d_pg.sum() + d_gp.sum()) / (d_pg.numel() + d_gp.numel())).item()
    return hd, asd


class DiceAccumulator:
    """Pooled Dice over many cases: sums of intersections and sizes per class, (K,)."""

    def __init__(self, num_classes: int):
        self.k = num_classes
        self.inter = np.zeros(num_classes)
        self.total = np.zeros(num_classes)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        for c in range(1, self.k + 1):
            p, g = pred == c, gt == c
            self.inter[c - 1] += np.logical_and(p, g).sum()
            self.total[c - 1] += p.sum() + g.sum()

    def dice(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.total > 0, 2 * self.inter / self.total, np.nan)


def read_ground_truth(case, num_classes: Optional[int] = None) -> Volume:
    """A case's ground-truth mask (evaluation only): a Volume whose ``array`` is (I, J, K) int64.

    ``case`` is a `ccam.data.cohort.PreparedCase` with a ``mask_path``. The mask must lie on the
    image's grid (UserError naming the case otherwise); with ``num_classes`` its labels must be in
    0..K. No training step may call this.
    """
    vol = read_volume(case.mask_path, case=case.id)
    if tuple(vol.array.shape) != tuple(case.geometry.shape):
        raise UserError(f"ground-truth mask has shape {tuple(vol.array.shape)}, the image {tuple(case.geometry.shape)}",
                        case=case.id, path=case.mask_path, fix="export the mask on the image's grid and fix the manifest")
    vol.array = np.asarray(vol.array).astype(np.int64)
    if num_classes is not None and vol.array.size and (vol.array.min() < 0 or vol.array.max() > num_classes):
        raise UserError(f"mask has labels outside 0..{num_classes}", case=case.id, path=case.mask_path,
                        fix="labels must be 0 = background and k = classes[k-1]")
    return vol


def confusion(pred: np.ndarray, gt: np.ndarray, c: int) -> np.ndarray:
    """(C, C) voxel counts of two label maps of one shape, rows = ground truth label, columns = predicted label."""
    return np.bincount((np.asarray(gt, dtype=np.int64) * c + np.asarray(pred, dtype=np.int64)).ravel(),
                       minlength=c * c).reshape(c, c)


def swap_rates(cm: np.ndarray, pairs: list[tuple[int, int]], classes: list[str]) -> dict[str, Optional[float]]:
    """Left/right swaps of a (C, C) confusion matrix: "a->b" = share of ground-truth voxels of ``a``
    labelled ``b``, both ways for every (left label, right label) pair (see
    `ccam.data.cohort.left_right_pairs`); None where the ground truth has no voxel of ``a``."""
    out: dict[str, Optional[float]] = {}
    for left, right in pairs:
        for a, b in ((left, right), (right, left)):
            total = cm[a].sum()
            out[f"{classes[a - 1]}->{classes[b - 1]}"] = float(cm[a, b] / total) if total else None
    return out


def dice_from_confusion(cm: np.ndarray) -> np.ndarray:
    """(..., K) Dice per foreground class from (..., C, C) confusion; NaN where the class is in neither (as `dice_per_class`)."""
    cm = np.asarray(cm)
    inter = np.diagonal(cm, axis1=-2, axis2=-1)[..., 1:].astype(np.float64)
    size = cm.sum(-2)[..., 1:] + cm.sum(-1)[..., 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, 2 * inter / size, np.nan)


def tau_confusions(cams: np.ndarray, gt: np.ndarray, plane: tuple[int, int], taus: Sequence[float], chunk: int = 16) -> np.ndarray:
    """(T, C, C) confusion against ground truth of argmax([tau, CAMs]) for every tau of ``taus`` at once: the tau sweep.

    ``cams`` (N, K, S, S) are upsampled bilinearly to the source in-plane size ``plane`` (as
    `ccam.io.geometry.scores_to_source` does) and compared with ``gt`` (N, R, C), the ground truth
    in the same canonical slice order, a chunk of slices at a time. argmax([tau, CAMs]) is class
    k+1 exactly where the largest CAM is class k's and exceeds tau (ties go to background, as in
    the argmax; tau compared in float32 as the pipeline's score maps are), so one sort of those
    peak values per (truth, class) gives the counts for every tau.
    """
    from ccam.io.geometry import resize_slices

    n, k = cams.shape[0], cams.shape[1]
    c = k + 1
    tau_arr = np.asarray(taus, dtype=np.float32)
    fg = np.zeros((len(tau_arr), c, k), dtype=np.int64)  # truth j, predicted k+1
    truth_total = np.zeros(c, dtype=np.int64)

    def above(values: np.ndarray) -> np.ndarray:  # (T,) how many values exceed each tau
        return values.size - np.searchsorted(np.sort(values), tau_arr, side="right")

    for a in range(0, n, chunk):
        up = resize_slices(torch.as_tensor(np.asarray(cams[a:a + chunk], dtype=np.float32)), plane)
        peak, cls = (t.numpy() for t in up.max(1))  # (b, R, C) largest CAM and its class
        g = np.asarray(gt[a:a + chunk])
        for j in range(c):
            truth = g == j
            truth_total[j] += int(truth.sum())
            for kk in range(k):
                fg[:, j, kk] += above(peak[truth & (cls == kk)])
    cm = np.zeros((len(tau_arr), c, c), dtype=np.int64)
    cm[:, :, 1:] = fg
    cm[:, :, 0] = truth_total[None] - fg.sum(-1)
    return cm

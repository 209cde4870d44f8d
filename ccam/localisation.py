"""Localisation diagnostics of class activation maps, measured against ground truth (evaluation only).

A low Dice mixes two failures: a CAM that lights up the wrong place, and one that finds the organ
but covers too little or too much of it (tau, CAM extent). These numbers look at the first one
alone, per class, on the S x S canonical slices where the class is **tagged and its ground-truth
region is non-empty** ("measured slices"):

- **pointing game**: share of measured slices whose CAM peak (argmax of the class's map) lies
  inside the organ grown by ``tolerance`` pixels (default 1: resampling to S x S moves a border by
  up to a pixel);
- **CAM mass inside**: sum of the class's CAM inside the organ / its sum over the slice, pooled
  over the measured slices (``cam_mass_inside``) and as the mean of the per-slice shares
  (``cam_mass_inside_mean``; a slice whose CAM is all zero counts as 0);
- **occlusion** (P-CAM only): the class's sigmoid probability before and after the organ (grown by
  2 px) is painted with the mean intensity of a ring around it (grown by 6 px, minus the painted
  area). A classifier that recognises the organ loses confidence; one that reads the context (or
  the other side of the body) does not. At most ``occlusion_slices`` slices per class, chosen
  evenly over the cases and slice heights, keep it fast on a CPU;
- **contact sheets**: per source and class a grid of tagged training slices (image in grey,
  ground-truth contour in white, the CAM as a translucent heat map, its peak as a cross), for a
  person to look at: ``W/reports/localisation/<source>_<class>.png``.

Ground truth is read for these numbers only, never by a training step, and every report labels
them as computed against it.

Shapes everywhere: CAM stack (N, K, S, S) float in [0, 1] (untagged classes 0); ground-truth labels
(N, S, S) in 0..K on the canonical S x S grid (`ccam.io.geometry.labels_from_source`); tags (N, K)
0/1; slices (N, S, S) float32 (the prepared, normalised images).

`localisation_report` does a whole work directory; `Localisation` is the same case by case, for
a caller that reads the ground truth anyway (stage `evaluate`) and should read it once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ccam.progress import tqdm

from ccam import artifacts
from ccam.data.cohort import Cohort, PreparedCase
from ccam.errors import UserError
from ccam.io.atomic import atomic_path
from ccam.io.geometry import labels_from_source

log = logging.getLogger("ccam")

TOLERANCE_PX = 1  # pointing game: a peak on the organ's border pixel at S x S still counts
OCCLUSION_ORGAN_PX = 2  # painted area = organ grown by 2 px, so its blurred rim cannot give it away
OCCLUSION_RING_PX = 6  # fill value = mean of the ring out to 6 px: the local background, not the slice's
OCCLUSION_MAX_SLICES = 200  # per class: two forward passes each, a few seconds on a CPU
SHEET_SLICES = 12  # panels per contact sheet (3 rows of 4)
# (source name, stage whose CAM stacks (N, K, S, S) it measures); "coarse" is P-CAM's
DEFAULT_SOURCES = (("coarse", "sample"), ("pseudo", "pseudo-masks"))
GT_NOTE = ("localisation diagnostics computed against the manifest's ground-truth masks (evaluation only; "
           "nothing here is used by the pipeline)")


# -- array functions ----------------------------------------------------------------------------

def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Binary masks (..., S, S) grown in-plane by ``pixels`` (chessboard distance: 1 px adds the 8 neighbours).

    Each 2D slice is grown on its own; the result has the input's shape, dtype bool.
    """
    m = np.asarray(masks, dtype=bool)
    if pixels <= 0 or m.size == 0:
        return m.copy()
    shape = m.shape
    t = torch.from_numpy(np.ascontiguousarray(m.reshape(-1, 1, *shape[-2:]))).float()
    grown = F.max_pool2d(t, kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return (grown > 0).numpy().reshape(shape)


def measured(gt: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """(N, K) bool: slice n is measured for class k when tagged with it and its ground truth holds label k+1.

    ``gt`` (N, S, S) labels in 0..K, ``tags`` (N, K).
    """
    tags = np.asarray(tags)
    k = tags.shape[1]
    flat = np.asarray(gt).reshape(gt.shape[0], -1)
    present = np.stack([(flat == c + 1).any(1) for c in range(k)], axis=1) if k else np.zeros((gt.shape[0], 0), bool)
    return present & (tags > 0)


@dataclass
class Tally:
    """Per-class sums (K,) over measured slices: pointing game and CAM mass. Add cases with ``+=``."""

    slices: np.ndarray  # measured slices
    hits: np.ndarray  # of those, CAM peak inside the organ (with the tolerance)
    mass_inside: np.ndarray  # sum of CAM values inside the organ
    mass_total: np.ndarray  # sum of CAM values over the slice
    share_sum: np.ndarray  # sum over measured slices of inside / total (0 for an all-zero CAM)

    @classmethod
    def zeros(cls, num_classes: int) -> "Tally":
        return cls(*(np.zeros(num_classes, dtype=np.float64) for _ in range(5)))

    def __iadd__(self, other: "Tally") -> "Tally":
        for name in ("slices", "hits", "mass_inside", "mass_total", "share_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def pointing_hit_rate(self) -> np.ndarray:
        """(K,) hits / measured slices; NaN for a class never measured."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.slices > 0, self.hits / self.slices, np.nan)

    def cam_mass_inside(self) -> np.ndarray:
        """(K,) pooled CAM mass inside the organ / total CAM mass; NaN when the class never had CAM mass."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.mass_total > 0, self.mass_inside / self.mass_total, np.nan)

    def cam_mass_inside_mean(self) -> np.ndarray:
        """(K,) mean over measured slices of the per-slice share; NaN for a class never measured."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.slices > 0, self.share_sum / self.slices, np.nan)


def tally(cams: np.ndarray, gt: np.ndarray, tags: np.ndarray, tolerance: int = TOLERANCE_PX) -> Tally:
    """Pointing game and CAM mass of one stack: cams (N, K, S, S), gt (N, S, S) in 0..K, tags (N, K).

    The peak is the first argmax of the class's map; a map that is zero everywhere has no peak and
    counts as a miss. The mass is measured inside the organ itself (no tolerance).
    """
    cams = np.asarray(cams, dtype=np.float32)
    n, k = cams.shape[:2]
    if tuple(gt.shape) != (n,) + tuple(cams.shape[2:]) or tuple(np.shape(tags)) != (n, k):
        raise ValueError(f"shapes do not fit: cams {cams.shape}, gt {gt.shape}, tags {np.shape(tags)}")
    out = Tally.zeros(k)
    sel = measured(gt, tags)
    for c in range(k):
        idx = np.nonzero(sel[:, c])[0]
        if idx.size == 0:
            continue
        maps = cams[idx, c].reshape(idx.size, -1)  # (m, S*S)
        organ = (gt[idx] == c + 1).reshape(idx.size, -1)
        near = dilate(gt[idx] == c + 1, tolerance).reshape(idx.size, -1)
        peak = maps.argmax(1)
        rows = np.arange(idx.size)
        hit = near[rows, peak] & (maps[rows, peak] > 0)
        inside = (maps * organ).sum(1, dtype=np.float64)
        total = maps.sum(1, dtype=np.float64)
        out.slices[c] += idx.size
        out.hits[c] += hit.sum()
        out.mass_inside[c] += inside.sum()
        out.mass_total[c] += total.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            out.share_sum[c] += np.where(total > 0, inside / total, 0.0).sum()
    return out


def pointing_hit_rate(cams: np.ndarray, gt: np.ndarray, tags: np.ndarray, tolerance: int = TOLERANCE_PX) -> np.ndarray:
    """(K,) share of measured slices whose CAM peak lies in the organ grown by ``tolerance`` px (NaN: none measured).

    cams (N, K, S, S), gt (N, S, S) in 0..K, tags (N, K).
    """
    return tally(cams, gt, tags, tolerance).pointing_hit_rate()


def cam_mass_inside(cams: np.ndarray, gt: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """(K,) CAM mass inside the organ / total CAM mass, pooled over measured slices (NaN: no mass).

    cams (N, K, S, S), gt (N, S, S) in 0..K, tags (N, K).
    """
    return tally(cams, gt, tags).cam_mass_inside()


def occlude(slices: np.ndarray, organs: np.ndarray, organ_px: int = OCCLUSION_ORGAN_PX,
            ring_px: int = OCCLUSION_RING_PX) -> np.ndarray:
    """Slices (B, S, S) with each organ (B, S, S bool) grown by ``organ_px`` painted with the mean of its ring.

    The ring is the organ grown by ``ring_px`` minus the painted area; where it is empty (the organ
    fills the slice) the mean of the unpainted pixels is used, and failing that the slice's mean.
    """
    x = np.array(slices, dtype=np.float32, copy=True)
    painted = dilate(organs, organ_px)
    ring = dilate(organs, ring_px) & ~painted
    for b in range(x.shape[0]):
        around = ring[b] if ring[b].any() else ~painted[b]
        fill = float(x[b][around].mean()) if around.any() else float(x[b].mean())
        x[b][painted[b]] = fill
    return x


@torch.inference_mode()
def class_probabilities(model: torch.nn.Module, slices: np.ndarray, batch_size: int = 32,
                        device: torch.device | str = "cpu") -> np.ndarray:
    """Sigmoid probabilities (B, K) of a slice classifier (logits (B, K) from (B, 1, S, S)) for slices (B, S, S)."""
    out = []
    for a in range(0, len(slices), batch_size):
        x = torch.as_tensor(np.asarray(slices[a:a + batch_size], dtype=np.float32))[:, None].to(device)
        out.append(torch.sigmoid(model(x).float()).cpu().numpy())
    k = int(model.classifier.weight.shape[0]) if hasattr(model, "classifier") else 0
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.float32)


@dataclass
class OcclusionTally:
    """Per-class sums (K,) of the occlusion test: slices tested, probability before and after painting."""

    slices: np.ndarray
    before: np.ndarray
    after: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> "OcclusionTally":
        return cls(*(np.zeros(num_classes, dtype=np.float64) for _ in range(3)))

    def __iadd__(self, other: "OcclusionTally") -> "OcclusionTally":
        self.slices, self.before, self.after = self.slices + other.slices, self.before + other.before, self.after + other.after
        return self

    def means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prob_before (K,), prob_after (K,), drop = before - after (K,)); NaN for a class never tested."""
        with np.errstate(invalid="ignore", divide="ignore"):
            b = np.where(self.slices > 0, self.before / self.slices, np.nan)
            a = np.where(self.slices > 0, self.after / self.slices, np.nan)
        return b, a, b - a


def occlusion_test(model: torch.nn.Module, slices: np.ndarray, gt: np.ndarray, tags: np.ndarray,
                   candidates: Optional[np.ndarray] = None, *, organ_px: int = OCCLUSION_ORGAN_PX,
                   ring_px: int = OCCLUSION_RING_PX, batch_size: int = 32, device: torch.device | str = "cpu") -> OcclusionTally:
    """Occlusion test of one stack: slices (N, S, S), gt (N, S, S) in 0..K, tags (N, K).

    ``candidates`` (N, K) bool limits which (slice, class) pairs are tested (default: all); only
    measured pairs (tagged, organ non-empty) are. Each slice's original probability is computed
    once; each (slice, class) pair gets its own painted copy.
    """
    k = np.shape(tags)[1]
    out = OcclusionTally.zeros(k)
    sel = measured(gt, tags)
    if candidates is not None:
        sel &= np.asarray(candidates, dtype=bool)
    used = np.nonzero(sel.any(1))[0]
    if used.size == 0:
        return out
    images = np.asarray(slices[used[0]:used[-1] + 1], dtype=np.float32)[used - used[0]]  # (U, S, S), memmap-friendly
    before = class_probabilities(model, images, batch_size, device)  # (U, K)
    row = {int(n): i for i, n in enumerate(used)}
    for c in range(k):
        idx = np.nonzero(sel[:, c])[0]
        if idx.size == 0:
            continue
        rows = np.array([row[int(n)] for n in idx])
        painted = occlude(images[rows], gt[idx] == c + 1, organ_px, ring_px)
        after = class_probabilities(model, painted, batch_size, device)[:, c]
        out.slices[c] += idx.size
        out.before[c] += before[rows, c].sum(dtype=np.float64)
        out.after[c] += after.sum(dtype=np.float64)
    return out


def spread_picks(flags: Sequence[np.ndarray], limit: int) -> list[np.ndarray]:
    """At most ``limit`` items of a sequence of per-case flags (N_i,) bool, chosen evenly over their concatenation.

    Returns per case the chosen indices (sorted). Cases are concatenated in order, so the choice is
    deterministic and spread over cases and, within them, over slice heights. All flagged items
    are kept when there are no more than ``limit``.
    """
    pos = [np.nonzero(np.asarray(f, dtype=bool))[0] for f in flags]
    total = sum(p.size for p in pos)
    if limit <= 0 or total == 0:
        return [np.zeros(0, dtype=np.int64) for _ in pos]
    chosen = np.arange(total) if total <= limit else np.unique(np.round(np.linspace(0, total - 1, limit)).astype(np.int64))
    out, start = [], 0
    for p in pos:
        mine = chosen[(chosen >= start) & (chosen < start + p.size)] - start
        out.append(p[mine].astype(np.int64))
        start += p.size
    return out


def save_contact_sheet(path: str | Path, images: np.ndarray, organs: np.ndarray, cams: np.ndarray, titles: Sequence[str],
                       suptitle: str = "", columns: int = 4) -> None:
    """One PNG: per panel the image (S, S) in grey, the organ (S, S bool) as a white contour, the CAM (S, S)
    in [0, 1] as a translucent heat map (zero left clear) and its peak as a cyan cross.

    images, organs, cams: (M, S, S); ``titles``: M strings (e.g. "case007 / slice 21").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(images)
    cols = max(1, min(columns, m))
    rows = max(1, math.ceil(m / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.35 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= m:
            continue
        img, organ, cam = np.asarray(images[i], np.float32), np.asarray(organs[i], bool), np.asarray(cams[i], np.float32)
        lo, hi = np.percentile(img, (1, 99)) if img.size else (0.0, 1.0)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, interpolation="nearest")
        ax.imshow(np.ma.masked_where(cam <= 0.02, cam), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45, interpolation="bilinear")
        if organ.any() and not organ.all():
            ax.contour(organ.astype(np.float32), levels=[0.5], colors="white", linewidths=0.9)
        if cam.max() > 0:
            r, c = np.unravel_index(int(cam.argmax()), cam.shape)
            ax.plot([c], [r], marker="+", color="cyan", markersize=9, markeredgewidth=1.6)
        ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


# -- a whole work directory -----------------------------------------------------------------------

def _r(v) -> Optional[float]:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def _nanmean(values: Iterable[float]) -> float:
    arr = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


@dataclass
class _Sheet:
    images: list = field(default_factory=list)
    organs: list = field(default_factory=list)
    cams: list = field(default_factory=list)
    titles: list = field(default_factory=list)


class Localisation:
    """The diagnostics of a work directory, accumulated case by case.

    ``sources``: (name, stage) of CAM stacks (N, K, S, S) (`ccam.artifacts.cam_stack`); a case without
    a stack in a source is left out of that source. ``splits``: the cases measured (default the
    training cases, whose pseudo-masks train the segmenter). ``occlusion_source``: the source made
    by P-CAM, whose per-class entries get the occlusion test of ``W/pcam``'s best checkpoint
    (None or ``occlusion_slices=0``: no occlusion test). ``sheet_slices=0``: no contact sheets.

    Use: ``loc = Localisation(...)``; for every case with ``loc.wants(case)``:
    ``loc.add_case(case, gt)`` with its ground truth (I, J, K) on the source grid; then
    ``section = loc.finish(sheet_dir)``.
    """

    def __init__(self, workdir: str | Path, cfg, cohort: Cohort, *, sources: Sequence[tuple[str, str]] = DEFAULT_SOURCES,
                 splits: Sequence[str] = ("train",), tolerance: int = TOLERANCE_PX, occlusion_source: Optional[str] = "coarse",
                 occlusion_slices: int = OCCLUSION_MAX_SLICES, sheet_slices: int = SHEET_SLICES,
                 device: torch.device | str | None = None, batch_size: int = 32):
        self.workdir, self.cfg, self.cohort = Path(workdir), cfg, cohort
        self.k, self.classes = cohort.num_classes, list(cohort.classes)
        self.sources = [(n, str(artifacts.cam_stack_path(self.workdir, st, "-").parent.relative_to(self.workdir)))
                        for n, st in sources]  # (name, folder in W) for the report
        self._stages = dict(sources)
        self.splits, self.tolerance = tuple(splits), int(tolerance)
        self.batch_size = batch_size
        self.cases = [c for c in cohort.cases if c.mask_path and c.split in self.splits]
        self.tallies = {n: Tally.zeros(self.k) for n, _ in self.sources}
        self.case_ids: dict[str, list[str]] = {n: [] for n, _ in self.sources}
        tags = {c.id: c.tags() for c in self.cases}
        # contact-sheet slices: chosen from the tags alone, so the ground truth is read once per case
        self.sheet_pick = {c: dict(zip([x.id for x in self.cases], spread_picks([tags[x.id][:, c] > 0 for x in self.cases], sheet_slices)))
                           for c in range(self.k)}
        self.sheets = {(n, c): _Sheet() for n, _ in self.sources for c in range(self.k)} if sheet_slices > 0 else {}
        self.model = None
        self.occlusion_source = occlusion_source if occlusion_source in dict(self.sources) and occlusion_slices > 0 else None
        self.occlusion_slices = int(occlusion_slices)
        self.occ = OcclusionTally.zeros(self.k)
        self.occ_pick: dict[int, dict[str, np.ndarray]] = {}
        self.model_path: Optional[str] = None
        if self.occlusion_source is not None:
            try:
                self.model_path = str(artifacts.checkpoint(self.workdir, "train-pcam").relative_to(self.workdir))
            except UserError:
                log.warning("localisation: no P-CAM checkpoint in %s; no occlusion test", artifacts.stage_dir(self.workdir, "train-pcam"))
                self.occlusion_source = None
        if self.occlusion_source is not None:
            if device is None:
                from ccam.training import select_device

                device = select_device(cfg)
            self.device = torch.device(device)
            try:
                self.model = artifacts.load_pcam(self.workdir, cfg, self.k, self.device)
            except UserError as e:  # a diagnostic must not sink the evaluation it is part of
                log.warning("localisation: no occlusion test (%s)", e)
                self.occlusion_source = None
            # the cap is chosen from the tags too: evenly over cases and heights; slices whose organ
            # vanishes at S x S are then skipped, so a class may test a few fewer
            self.occ_pick = {c: dict(zip([x.id for x in self.cases],
                                         spread_picks([tags[x.id][:, c] > 0 for x in self.cases], occlusion_slices)))
                             for c in range(self.k)}
        self._tags = tags

    def wants(self, case: PreparedCase) -> bool:
        """True for a case the diagnostics measure (has ground truth, in ``splits``)."""
        return case.id in self._tags

    def add_case(self, case: PreparedCase, gt: np.ndarray, chunk: int = 32) -> None:
        """Measure one case; ``gt`` (I, J, K) ground-truth labels on the case's source grid."""
        if not self.wants(case):
            return
        geom = case.geometry
        small = labels_from_source(geom, np.asarray(gt), self.k + 1)  # (N, S, S) uint8, as evaluate's masks
        tags = self._tags[case.id]
        slices = None
        for name, _ in self.sources:
            if not artifacts.cam_stack_path(self.workdir, self._stages[name], case.id).exists():
                continue
            stack = artifacts.cam_stack(self.workdir, self._stages[name], case, self.k)
            self.case_ids[name].append(case.id)
            for a in range(0, case.n_slices, chunk):  # bounded memory: a big CT stack is hundreds of MB as float32
                self.tallies[name] += tally(np.asarray(stack[a:a + chunk], dtype=np.float32), small[a:a + chunk],
                                            tags[a:a + chunk], self.tolerance)
            if self.sheets:
                slices = case.slices() if slices is None else slices
                for c in range(self.k):
                    sheet = self.sheets[(name, c)]
                    for n in self.sheet_pick[c].get(case.id, ()):
                        sheet.images.append(np.array(slices[n], dtype=np.float32))
                        sheet.organs.append(small[n] == c + 1)
                        sheet.cams.append(np.asarray(stack[n, c], dtype=np.float32))
                        sheet.titles.append(f"{case.id} / slice {int(n)}")
        if self.model is not None and case.id in self.case_ids[self.occlusion_source]:
            cand = np.zeros((case.n_slices, self.k), dtype=bool)
            for c in range(self.k):
                cand[self.occ_pick[c].get(case.id, np.zeros(0, np.int64)), c] = True
            if cand.any():
                slices = case.slices() if slices is None else slices
                self.occ += occlusion_test(self.model, slices, small, tags, cand, batch_size=self.batch_size, device=self.device)

    def finish(self, sheet_dir: Optional[str | Path] = None) -> dict:
        """The JSON-ready section (NaN -> None); writes the contact sheets into ``sheet_dir`` (default W/reports/localisation)."""
        sheet_dir = Path(sheet_dir) if sheet_dir is not None else self.workdir / "reports" / "localisation"
        before, after, drop = self.occ.means()
        sources: dict = {}
        sheets: dict = {}
        for name, folder in self.sources:
            if not self.case_ids[name]:
                continue
            t = self.tallies[name]
            hit, mass, mass_mean = t.pointing_hit_rate(), t.cam_mass_inside(), t.cam_mass_inside_mean()
            occ_here = name == self.occlusion_source
            per_class = {}
            for c, cls in enumerate(self.classes):
                per_class[cls] = {
                    "slices": int(t.slices[c]), "pointing_hit_rate": _r(hit[c]), "cam_mass_inside": _r(mass[c]),
                    "cam_mass_inside_mean": _r(mass_mean[c]),
                    "occlusion": {"slices": int(self.occ.slices[c]), "prob_before": _r(before[c]), "prob_after": _r(after[c]),
                                  "drop": _r(drop[c])} if occ_here else None,
                }
            mean = {"pointing_hit_rate": _r(_nanmean(hit)), "cam_mass_inside": _r(_nanmean(mass)),
                    "cam_mass_inside_mean": _r(_nanmean(mass_mean)),
                    "occlusion": {"prob_before": _r(_nanmean(before)), "prob_after": _r(_nanmean(after)), "drop": _r(_nanmean(drop))}
                    if occ_here else None}
            sources[name] = {"cams": folder, "n_cases": len(self.case_ids[name]), "classes": per_class, "mean": mean}
            for c, cls in enumerate(self.classes):
                sheet = self.sheets.get((name, c))
                if sheet is None or not sheet.images:
                    continue
                path = sheet_dir / f"{name}_{cls}.png"
                save_contact_sheet(path, np.stack(sheet.images), np.stack(sheet.organs), np.stack(sheet.cams), sheet.titles,
                                   f"{name} CAMs ({folder}): {cls}. White: ground-truth contour (evaluation only); + CAM peak")
                try:
                    sheets.setdefault(name, {})[cls] = str(path.relative_to(self.workdir))
                except ValueError:
                    sheets.setdefault(name, {})[cls] = str(path)
        return {
            "note": GT_NOTE, "splits": list(self.splits), "n_cases": len(self.cases),
            "slice_size": self.cohort.slice_size,
            "settings": {"tolerance_px": self.tolerance,
                         "occlusion": {"source": self.occlusion_source, "model": self.model_path, "organ_dilation_px": OCCLUSION_ORGAN_PX,
                                       "ring_px": OCCLUSION_RING_PX, "max_slices_per_class": self.occlusion_slices}
                         if self.occlusion_source else None},
            "sources": sources, "contact_sheets": sheets,
        }


def ground_truth_loader(num_classes: int) -> Callable[[PreparedCase], np.ndarray]:
    """case -> ground-truth labels (I, J, K) int64 on its source grid (`ccam.metrics.read_ground_truth`)."""
    from ccam.metrics import read_ground_truth

    return lambda case: read_ground_truth(case, num_classes).array


def localisation_report(workdir: str | Path, cfg, cohort: Optional[Cohort] = None,
                        gt_loader: Optional[Callable[[PreparedCase], np.ndarray]] = None, *,
                        sheet_dir: Optional[str | Path] = None, progress: bool = True, **options) -> dict:
    """The localisation section of a whole work directory (see `Localisation` for ``options``).

    ``gt_loader(case)`` gives the ground truth (I, J, K) on the case's source grid (default: the
    manifest's mask via `ccam.metrics.read_ground_truth`). Sources whose folder does not exist are
    left out. Writes the contact sheets (default ``W/reports/localisation``); returns the section.
    """
    workdir = Path(workdir)
    cohort = cohort if cohort is not None else Cohort(workdir)
    sources = options.pop("sources", DEFAULT_SOURCES)
    sources = [(n, st) for n, st in sources if artifacts.cam_stack_path(workdir, st, "-").parent.is_dir()]
    loc = Localisation(workdir, cfg, cohort, sources=sources, **options)
    loader = gt_loader or ground_truth_loader(cohort.num_classes)
    for case in tqdm(loc.cases, desc="localisation", unit="case", dynamic_ncols=True, disable=not progress):
        loc.add_case(case, loader(case))
    return loc.finish(sheet_dir)


def markdown_table(section: dict, classes: Sequence[str]) -> list[str]:
    """Markdown lines of the "Localisation (against ground truth)" table: one row per (source, class) and a mean row."""

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    def prob(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| CAMs | class | slices | pointing hit (%) | CAM mass inside (%) | mass inside, slice mean (%) "
             "| occlusion slices | P before | P after | drop |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, src in section.get("sources", {}).items():
        for cls in list(classes) + ["mean"]:
            e = src["mean"] if cls == "mean" else src["classes"][cls]
            o = e.get("occlusion")
            occ = [str(o["slices"]) if "slices" in o else "", prob(o["prob_before"]), prob(o["prob_after"]), prob(o["drop"])] \
                if o else ["-", "-", "-", "-"]
            slices = str(e["slices"]) if "slices" in e else ""
            lines.append(f"| {name} ({src['cams']}) | {cls} | {slices} | {pct(e['pointing_hit_rate'])} | {pct(e['cam_mass_inside'])} | "
                         f"{pct(e['cam_mass_inside_mean'])} | " + " | ".join(occ) + " |")
    if not section.get("sources"):
        lines.append("| (no CAMs to measure) | | | | | | | | | |")
    return lines

"""Triage without ground truth: per-case measurements of a stage's masks and the flags they raise.

Everything here reads only the masks, the slice tags and the images (for the body midline), so
it works on any cohort. Flags, by code:

``untagged_mask``   the class is drawn on slices whose tag says it is absent
``missing_on_tagged`` slices tagged with the class carry no mask of it (a gap inside the mask's
                    slice range, or more than one slice: a single missed end slice is a boundary effect)
``split``           more than one sizeable connected component (>= 10 % of the largest and >= 1 mL)
``wrong_side``      a left/right twin whose centroid lies on the other side of the body midline
``volume_outlier``  the class volume is far from the cohort's median (robust z-score, |z| > 3.5)
``low_confidence``  CAM margin (pseudo-masks) or segmenter probability entropy (predictions with
                    probabilities) says the mask is uncertain

The quality score is 100 minus a weight per flag (floored at 0); worst cases sort first.
Patient side: in RAS world coordinates (nibabel) +x points to the patient's right.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from ccam import artifacts
from ccam.data.cohort import PreparedCase, left_right_pairs

log = logging.getLogger("ccam")

WEIGHTS = {"wrong_side": 40, "split": 20, "untagged_mask": 15, "missing_on_tagged": 15, "volume_outlier": 15,
           "low_confidence": 10}
SHORT = {"wrong_side": "wrong side", "split": "split", "untagged_mask": "mask on untagged slices",
         "missing_on_tagged": "tagged slices without mask", "volume_outlier": "volume outlier",
         "low_confidence": "low confidence"}
SIZEABLE_FRACTION = 0.10  # of the largest component
SIZEABLE_ML = 1.0
ROBUST_Z = 3.5  # Iglewicz and Hoaglin's outlier cut-off for the modified z-score
MIN_CASES_FOR_VOLUME = 4
LOW_MARGIN = 0.10  # mean [tau, CAM] top-1 minus top-2 inside the mask (CAMs peak at 1)
HIGH_ENTROPY = 0.30  # mean normalised entropy of the class probabilities inside the mask


def body_centre_x(image: np.ndarray, affine: np.ndarray) -> float:
    """World x (RAS, mm) of the centroid of the body: voxels brighter than 15 % of the 1..99 % range."""
    arr = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(arr, [1, 99])
    body = arr > lo + 0.15 * (hi - lo)
    if not body.any():
        body = np.ones_like(arr, dtype=bool)
    return float(world_centroid(body, affine)[0])


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS centroid (3,) in mm of the voxels of a boolean mask (I, J, K)."""
    idx = [np.asarray(a, dtype=np.float64) for a in ndimage.center_of_mass(mask.astype(np.uint8))]
    return np.asarray(affine, dtype=np.float64)[:3, :3] @ np.array(idx) + np.asarray(affine, dtype=np.float64)[:3, 3]


def measure_case(case: PreparedCase, image: np.ndarray, mask: np.ndarray, affine: np.ndarray, classes: list[str],
                 confidence: Optional[dict] = None) -> dict:
    """Per-class measurements and the case's own flags (the cohort-level volume flag is added later).

    ``mask`` (I, J, K) labels 0..K on the source grid of ``image``; tags (N, K) are indexed along
    the prepared slice axis, which is the file axis ``geometry.perm[0]`` in file order.
    """
    geom = case.geometry
    tags = case.tags().astype(bool)
    slice_axis = geom.perm[0]
    other = tuple(a for a in range(3) if a != slice_axis)
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    flags: list[dict] = []
    per_class = []
    body_x = None
    twins = {lab: (left, right) for left, right in left_right_pairs(classes) for lab in (left, right)}
    structure = ndimage.generate_binary_structure(3, 3)
    for k, name in enumerate(classes, start=1):
        m = mask == k
        n_vox = int(m.sum())
        present = m.any(axis=other)
        tagged = tags[:, k - 1] if tags.shape[0] == present.shape[0] else np.zeros_like(present)
        untagged = np.flatnonzero(present & ~tagged)
        missing = np.flatnonzero(tagged & ~present)
        row = {"label": k, "name": name, "volume_ml": round(n_vox * voxel_ml, 2), "voxels": n_vox,
               "mask_slices": int(present.sum()), "tagged_slices": int(tagged.sum()), "components": 0,
               "sizeable_components": 0, "untagged_slices": untagged.tolist(), "missing_slices": missing.tolist(),
               "side": None}
        if n_vox:
            lab, n = ndimage.label(m, structure=structure)
            sizes = np.bincount(lab.ravel())[1:]
            big = int(((sizes >= SIZEABLE_FRACTION * sizes.max()) & (sizes * voxel_ml >= SIZEABLE_ML)).sum())
            row["components"], row["sizeable_components"] = int(n), big
            if big > 1:
                flags.append({"code": "split", "class": name,
                              "text": f"{name} is in {big} separate sizeable pieces (of {n} components); an organ should be one piece"})
        if len(untagged):
            flags.append({"code": "untagged_mask", "class": name,
                          "text": f"{name} is drawn on {len(untagged)} slice(s) tagged as not containing it "
                                  f"(slices {_ranges(untagged)})"})
        inner = [s for s in missing if present[:s].any() and present[s + 1:].any()]
        if inner or len(missing) > 1:
            flags.append({"code": "missing_on_tagged", "class": name,
                          "text": f"{len(missing)} slice(s) tagged with {name} have no {name} mask (slices {_ranges(missing)})"})
        if k in twins and n_vox:
            if body_x is None:
                body_x = body_centre_x(image, affine)
            left, _ = twins[k]
            offset = float(world_centroid(m, affine)[0]) - body_x  # RAS: + = patient's right
            side = "right" if offset > 0 else "left"
            row["side"] = side
            want = "left" if k == left else "right"
            if side != want:
                flags.append({"code": "wrong_side", "class": name,
                              "text": f"{name} lies on the patient's {side} ({abs(offset):.0f} mm from the body midline), "
                                      f"the {want} side is expected: left and right may be swapped"})
        per_class.append(row)
    if confidence and confidence.get("low"):
        flags.append({"code": "low_confidence", "class": None, "text": confidence["text"]})
    return {"id": case.id, "split": case.split, "classes": per_class, "flags": flags, "confidence": confidence,
            "n_slices": int(tags.shape[0])}


def _ranges(idx: np.ndarray, limit: int = 6) -> str:
    """[3, 4, 5, 9] -> '3-5, 9' (at most ``limit`` runs)."""
    idx = np.asarray(idx)
    runs, start = [], int(idx[0])
    for a, b in zip(idx[:-1], idx[1:]):
        if b != a + 1:
            runs.append((start, int(a)))
            start = int(b)
    runs.append((start, int(idx[-1])))
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:limit])
    return text + (", ..." if len(runs) > limit else "")


def add_cohort_flags(reviews: list[dict], classes: list[str]) -> list[dict]:
    """Volume outliers across the cohort, then scores; returns the reviews worst first."""
    if len(reviews) >= MIN_CASES_FOR_VOLUME:
        for ci, name in enumerate(classes):
            vols = np.array([r["classes"][ci]["volume_ml"] for r in reviews], dtype=np.float64)
            med = float(np.median(vols))
            mad = float(np.median(np.abs(vols - med)))
            mad = max(mad, 0.05 * med, 1e-6)  # identical volumes would make every difference infinite
            for r, v in zip(reviews, vols):
                z = 0.6745 * (v - med) / mad
                r["classes"][ci]["volume_z"] = round(float(z), 2)
                if abs(z) > ROBUST_Z:
                    what = "larger" if z > 0 else "smaller"
                    r["flags"].append({"code": "volume_outlier", "class": name,
                                       "text": f"{name} volume {v:.1f} mL is far {what} than the cohort's median {med:.1f} mL "
                                               f"(robust z = {z:.1f})"})
    for r in reviews:
        r["flags"].sort(key=lambda f: -WEIGHTS[f["code"]])  # the most serious first
        r["score"] = max(0, 100 - sum(WEIGHTS[f["code"]] for f in r["flags"]))
        r["flag_codes"] = sorted({f["code"] for f in r["flags"]}, key=lambda c: -WEIGHTS[c])
        r["flag_short"] = [SHORT[c] for c in r["flag_codes"]]
    bad_slices = {r["id"]: sum(len(c["untagged_slices"]) + len(c["missing_slices"]) for c in r["classes"]) for r in reviews}
    return sorted(reviews, key=lambda r: (r["score"], -bad_slices[r["id"]], r["id"]))


# -- confidence: what the stage kept ------------------------------------------------------------

def cam_margin(cams: np.ndarray, labels: np.ndarray, tau: float) -> Optional[float]:
    """Mean top-1 minus top-2 of [tau, CAM_1..CAM_K] over the foreground pixels of ``labels``.

    ``cams`` (N, K, S, S), ``labels`` (N, S, S) in 0..K; None when the mask is empty.
    """
    fg = labels > 0
    if not fg.any():
        return None
    total, n = 0.0, 0
    for s in np.flatnonzero(fg.any(axis=(1, 2))):
        scores = np.concatenate([np.full((1,) + cams.shape[2:], tau, np.float32), cams[s].astype(np.float32)])
        top = np.sort(scores[:, fg[s]], axis=0)
        total += float((top[-1] - top[-2]).sum())
        n += int(fg[s].sum())
    return total / n


def probability_entropy(probs: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """Mean entropy / log(C) of class probabilities (C, I, J, K) over the foreground voxels of ``labels``."""
    fg = labels > 0
    if not fg.any():
        return None
    p = np.clip(probs[:, fg].astype(np.float32), 1e-6, 1.0)
    return float((-(p * np.log(p)).sum(0) / np.log(p.shape[0])).mean())


def case_confidence(workdir: Path, stage: str, record: dict, case: PreparedCase, mask: np.ndarray,
                    default_tau: float = 0.25) -> dict:
    """What the stage kept to judge its own certainty: CAMs (pseudo-masks) or probabilities (predict --probabilities)."""
    workdir = Path(workdir)
    if stage == "pseudo-masks":
        cam_path = artifacts.cam_stack_path(workdir, "pseudo-masks", case.id)
        lab_path = artifacts.label_stack_path(workdir, "pseudo-masks", case.id)
        if cam_path.exists() and lab_path.exists():
            tau = float((record.get("outputs") or {}).get("tau", default_tau))
            cams, labels = np.load(cam_path, mmap_mode="r"), np.load(lab_path, mmap_mode="r")
            if cams.shape[0] == labels.shape[0]:
                m = cam_margin(np.asarray(cams), np.asarray(labels), tau)
                if m is not None:
                    low = m < LOW_MARGIN
                    return {"kind": "CAM margin", "value": round(m, 3), "low": low,
                            "text": f"the CAM margin inside the mask is {m:.2f} (below {LOW_MARGIN}: the class scores barely beat "
                                    "the background or each other)" if low else f"CAM margin {m:.2f}"}
    if stage == "predict":
        prob_path = artifacts.mask_dir(workdir, "predict") / f"{case.id}.npz"
        if prob_path.exists():
            with np.load(prob_path) as z:
                probs = z["probabilities"]
            if tuple(probs.shape[1:]) == tuple(mask.shape):
                e = probability_entropy(probs, mask)
                if e is not None:
                    low = e > HIGH_ENTROPY
                    return {"kind": "probability entropy", "value": round(e, 3), "low": low,
                            "text": f"the segmenter is unsure inside the mask (mean normalised entropy {e:.2f} > {HIGH_ENTROPY})"
                            if low else f"mean normalised entropy {e:.2f}"}
    return {"kind": None, "value": None, "low": False, "text": "not available (this stage kept no CAMs or probabilities)"}

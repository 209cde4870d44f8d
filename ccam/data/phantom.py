"""Synthetic abdominal MR/CT cohort (phantom) generator, deterministic for a seed.

The anatomy is built in RAS+ world millimetres (nibabel convention: +x towards the patient's
Right, +y Anterior, +z Superior), rendered on the RAS voxel grid and only then stored in the
requested voxel order, so the same seed gives the same anatomy whatever the storage.

Contents of a volume (axial slices along z):

- body outline (ellipse with subcutaneous fat and a muscle rim), visceral fat/bowel mixture,
  lung bases above the diaphragm;
- distractors: spine (bright vertebral bodies with discs, posterior elements, canal),
  paraspinal muscles, aorta (anterior-left of the spine);
- the four classes of :data:`CLASSES` as smoothly deformed ellipsoids: liver (patient's right,
  upper abdomen), spleen (left, posterior), right and left kidney (posterior, either side of the
  spine, mirror images drawn from the same shape/intensity/texture distribution, heavily
  overlapping z-ranges).  Organs never overlap; the mask is their label map (value = index + 1).

Realism: per-tissue texture, partial-volume edges (the intensity image is smoothed a little
before noise, the mask stays crisp), multiplicative bias field (MR), Gaussian (CT) or Rician
(MR) noise.  CT is stored as int16 HU, MR as float32.

Public entry points: :func:`make_phantom_volume`, :func:`make_phantom_cohort`; helpers
:func:`axial_axis`, :func:`tags_from_mask` and :func:`save_nifti` are reusable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = [
    "CLASSES",
    "ORIENTATIONS",
    "MODALITIES",
    "make_phantom_volume",
    "make_phantom_cohort",
    "axial_axis",
    "tags_from_mask",
    "save_nifti",
]

CLASSES = ["liver", "right_kidney", "left_kidney", "spleen"]
ORIENTATIONS = ("RAS", "LPS", "SLICE_FIRST")
MODALITIES = ("MR", "CT")

# Cohort orientation pattern: all three storages occur in any 5 consecutive cases.
_ORIENTATION_CYCLE = ("RAS", "LPS", "RAS", "SLICE_FIRST", "LPS")

# Cohort geometry when shape is the default (160, 160, 40): ~352 mm in-plane, 200 mm in z.
_BASE_SHAPE = (160, 160, 40)
_BASE_FOV_XY = 352.0
_BASE_FOV_Z = 200.0

# Tissue codes of the internal (never returned) tissue map.
(AIR, FAT, MUSCLE, VISCERA, LUNG, MARROW, CORTEX, AORTA, CANAL, SINUS, LIVER, KIDNEY, SPLEEN,
 DISC) = range(14)
_N_TISSUES = 14
_ORGAN_TISSUE = (LIVER, KIDNEY, KIDNEY, SPLEEN)  # by label - 1; kidneys share one tissue

# Mean intensities per tissue code.  MR: T1 post-contrast-like, arbitrary positive units.
_CT_LUT = {AIR: -1000, FAT: -100, MUSCLE: 45, VISCERA: -90, LUNG: -850, MARROW: 620,
           CORTEX: 900, AORTA: 200, CANAL: 15, SINUS: -60, LIVER: 60, KIDNEY: 150,
           SPLEEN: 50, DISC: 90}
_MR_LUT = {AIR: 0, FAT: 850, MUSCLE: 300, VISCERA: 700, LUNG: 40, MARROW: 620, CORTEX: 140,
           AORTA: 800, CANAL: 130, SINUS: 740, LIVER: 480, KIDNEY: 560, SPLEEN: 450, DISC: 340}
# Bowel end of the visceral fat/bowel mixture.
_CT_BOWEL, _MR_BOWEL = 25.0, 380.0
# Texture amplitude (per unit of the smooth texture field).
_CT_TEX = {AIR: 0, FAT: 12, MUSCLE: 10, VISCERA: 8, LUNG: 25, MARROW: 70, CORTEX: 40, AORTA: 8,
           CANAL: 5, SINUS: 12, LIVER: 7, KIDNEY: 12, SPLEEN: 7, DISC: 10}
_MR_TEX_FRAC = 0.045

# Anatomy template (mm, RAS, volume centre = 0), scaled per case.
_BODY_A, _BODY_B = 150.0, 110.0          # body semi-axes (x, y)
_NEED_HALF_XY = (168.0, 128.0)           # half field of view that holds the largest body
_NEED_HALF_Z = 97.0                      # half z-range that holds the jittered organs
_GAP = 0.04                              # fat plane between touching organs (normalised units)
_PV_SIGMA = (0.55, 0.55, 0.4)            # partial-volume blur, voxels
_CHUNK_VOXELS = 6_000_000                # z-chunking of full-volume work (memory bound)


# ----------------------------------------------------------------------------------------
# geometry helpers


def _ras_affine(shape, spacing):
    """4x4 RAS affine of the (x, y, z) grid with the volume centre at world 0."""
    aff = np.eye(4)
    for i in range(3):
        aff[i, i] = spacing[i]
        aff[i, 3] = -(shape[i] - 1) / 2.0 * spacing[i]
    return aff


def _store(arr, ras_affine, orientation):
    """RAS-ordered array and affine -> (array, affine) in the file order of ``orientation``."""
    nx, ny = arr.shape[0], arr.shape[1]
    if orientation == "RAS":
        return arr, ras_affine.copy()
    if orientation == "LPS":
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, nx - 1
        flip[1, 1], flip[1, 3] = -1.0, ny - 1
        return np.ascontiguousarray(arr[::-1, ::-1, :]), ras_affine @ flip
    perm = np.zeros((4, 4))  # SLICE_FIRST: file index (k, j, i) = RAS index (i, j, k)
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), ras_affine @ perm


def axial_axis(affine) -> int:
    """Array axis whose direction is closest to world z (superior-inferior)."""
    return int(np.argmax(np.abs(np.asarray(affine, float)[2, :3])))


def tags_from_mask(mask, axis: int, classes=CLASSES) -> dict:
    """Per class, inclusive ranges ``[[start, end], ...]`` of 0-based indices along ``axis``
    where the class (label value = index + 1) has at least one voxel; absent classes omitted."""
    m = np.moveaxis(np.asarray(mask), axis, 0).reshape(mask.shape[axis], -1)
    tags = {}
    for value, name in enumerate(classes, start=1):
        present = (m == value).any(axis=1)
        if not present.any():
            continue
        edges = np.diff(np.concatenate([[0], present.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
        tags[name] = [[int(s), int(e)] for s, e in zip(starts, ends)]
    return tags


def save_nifti(arr, affine, path) -> Path:
    """Write ``arr`` with ``affine`` (qform = sform, code 1, zooms in mm) atomically."""
    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_zooms(tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    img.header.set_xyzt_units("mm")
    name = path.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{name[: len(name) - len(ext)]}.tmp{os.getpid()}{ext}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bspline_axis(a, pos, axis):
    """Cubic B-spline resampling of ``a`` at fractional indices ``pos`` (1 <= pos <= len - 3)
    along ``axis``: smooth (C2) upsampling of a random field without grid artefacts."""
    i0 = np.floor(pos).astype(np.intp)
    t = (pos - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    weights = ((1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
               (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6)
    out = None
    for k, w in enumerate(weights):
        term = np.take(a, i0 + (k - 1), axis=axis)
        term *= w.reshape(shape)
        if out is None:
            out = term
        else:
            out += term
    return out


# ----------------------------------------------------------------------------------------
# anatomy


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _sample_anatomy(rng):
    """All shape parameters of one case, in template millimetres (RAS, centre 0)."""
    deg = np.pi / 180.0
    body_sx, body_sy = _u(rng, 0.92, 1.08), _u(rng, 0.92, 1.08)
    A, B = _BODY_A * body_sx, _BODY_B * body_sy
    body = dict(cx=_u(rng, -4, 4), cy=-5.0 + _u(rng, -4, 4), a=A, b=B,
                fat=_u(rng, 8, 22), muscle=_u(rng, 8, 13),
                mod=_u(rng, 0.0, 0.04), wave=_u(rng, 300, 500), phase=_u(rng, 0, 2 * np.pi))
    spine_y = body["cy"] - 0.56 * B + _u(rng, -3, 3)
    spine = dict(x=_u(rng, -3, 3), y=spine_y, r=17.0 * _u(rng, 0.9, 1.1),
                 period=_u(rng, 28, 34), disc=_u(rng, 6, 9), phase=_u(rng, 0, 34))
    aorta = dict(x=spine["x"] - 18.0 + _u(rng, -3, 3), y=spine_y + spine["r"] + 15.0 + _u(rng, -3, 3),
                 r=11.0 * _u(rng, 0.85, 1.15))
    lungs = [dict(c=(s * 80.0 * body_sx, -15.0, 145.0 + _u(rng, -8, 8)), a=(62.0, 72.0, 85.0))
             for s in (1.0, -1.0)]

    def organ(label, c, a, rot_deg, jitter_rot_deg, **shape):
        size = _u(rng, 0.85, 1.15)
        a = np.array(a) * size * rng.uniform(0.96, 1.04, 3)
        a = np.minimum(np.maximum(a, np.array(shape_a0[label]) * 0.85), np.array(shape_a0[label]) * 1.15)
        c = np.array(c) * np.array([body_sx, body_sy, 1.0]) + rng.uniform(-0.15, 0.15, 3) * np.array(shape_a0[label])
        ang = (np.array(rot_deg) + rng.uniform(-1, 1, 3) * np.array(jitter_rot_deg)) * deg
        waves = []
        for _ in range(3):
            v = rng.normal(size=3)
            v = v / np.linalg.norm(v) * _u(rng, 1.5, 3.0)
            waves.append((tuple(float(t) for t in v), _u(rng, 0, 2 * np.pi), _u(rng, 0.03, 0.07)))
        d = dict(label=label, c=tuple(float(t) for t in c), a=tuple(float(t) for t in a),
                 R=_rotation(*ang), waves=waves, bend_y=0.0, bend_z=0.0, shear=0.0, ty=0.0,
                 tz=0.0, sinus=None, margin=1.3)
        d.update(shape)
        return d

    shape_a0 = {1: (70.0, 62.0, 60.0), 2: (27.0, 23.0, 52.0), 3: (27.0, 23.0, 52.0), 4: (30.0, 50.0, 45.0)}
    # Kidneys: one bend/tilt magnitude for both, mirrored, so only position differs.
    bend, tilt, twist = _u(rng, 0.12, 0.25), _u(rng, 6, 16), _u(rng, 10, 25)
    organs = [
        organ(1, (55.0, 0.0, 15.0), shape_a0[1], (0.0, 0.0, 0.0), (5.0, 5.0, 8.0),
              shear=_u(rng, 0.15, 0.3), ty=_u(rng, 0.15, 0.3), tz=_u(rng, 0.1, 0.25), margin=1.6),
        organ(2, (62.0, -50.0, -22.0), shape_a0[2], (0.0, -tilt, twist), (4.0, 4.0, 4.0),
              bend_z=bend, sinus=-1.0, margin=1.45),
        organ(3, (-62.0, -50.0, -16.0), shape_a0[3], (0.0, tilt, -twist), (4.0, 4.0, 4.0),
              bend_z=-bend, sinus=1.0, margin=1.45),
        organ(4, (-80.0, -40.0, 25.0), shape_a0[4], (0.0, 0.0, 30.0), (5.0, 5.0, 10.0),
              bend_y=-_u(rng, 0.1, 0.25), margin=1.45),
    ]
    return dict(body=body, spine=spine, aorta=aorta, lungs=lungs, organs=organs)


def _organ_field(org, xt, yt, zt):
    """Normalised deformed-ellipsoid field f (< 1 inside) on the grid xt x yt x zt (template mm).

    Returns (f, u) with f of shape (len(xt), len(yt), len(zt)) float32 and u the organ-frame
    coordinates (ux, uy, uz) used for internal structure."""
    c, a, R = org["c"], org["a"], org["R"]
    d = ((xt - c[0])[:, None, None], (yt - c[1])[None, :, None], (zt - c[2])[None, None, :])
    ux, uy, uz = ((float(R[0, i]) * d[0] + float(R[1, i]) * d[1] + float(R[2, i]) * d[2])
                  * (1.0 / a[i]) for i in range(3))
    if org["bend_z"]:
        ux = ux + org["bend_z"] * uz * uz
    if org["bend_y"]:
        ux = ux + org["bend_y"] * uy * uy
    if org["shear"] or org["ty"] or org["tz"]:
        uxc = np.clip(ux, -1.0, 1.0)
        uy = (uy + org["shear"] * uxc) / (1.0 + org["ty"] * uxc)
        uz = uz / (1.0 + org["tz"] * uxc)
    f = np.sqrt(ux * ux + uy * uy + uz * uz)
    for (w0, w1, w2), phase, amp in org["waves"]:
        f -= amp * np.sin(w0 * ux + w1 * uy + w2 * uz + phase)
    return f.astype(np.float32, copy=False), (ux, uy, uz)


def _organ_bbox(org, grids):
    """Index ranges (lo, hi) per axis of the organ's bounding box in the volume."""
    ext = np.sqrt(((org["R"] * np.array(org["a"])[None, :]) ** 2).sum(axis=1)) * org["margin"]
    out = []
    for ax in range(3):
        g = grids[ax]
        lo, hi = org["c"][ax] - ext[ax], org["c"][ax] + ext[ax]
        i0 = int(np.searchsorted(g, lo, side="left"))
        i1 = int(np.searchsorted(g, hi, side="right"))
        out.append((i0, max(i0, i1)))
    return out


def _render_tissue_chunk(anat, xt, yt, zt, spine2d):
    """Tissue codes (uint8, (nx, ny, len(zt))) of everything except the four organs."""
    b = anat["body"]
    X = (xt - b["cx"])[:, None, None]
    Y = (yt - b["cy"])[None, :, None]
    scale = (1.0 + b["mod"] * np.sin(2 * np.pi * zt / b["wave"] + b["phase"])).astype(np.float32)
    t = np.zeros((xt.size, yt.size, zt.size), np.uint8)
    for code, inset in ((FAT, 0.0), (MUSCLE, b["fat"]), (VISCERA, b["fat"] + b["muscle"])):
        A = ((b["a"] - inset) * scale)[None, None, :]
        Bz = ((b["b"] - inset) * scale)[None, None, :]
        e = (X / A) ** 2 + (Y / Bz) ** 2
        t[e < 1.0] = code
    interior = t == VISCERA
    for lung in anat["lungs"]:
        (cx, cy, cz), (ax, ay, az) = lung["c"], lung["a"]
        zs = np.flatnonzero(np.abs(zt - cz) < az)
        if zs.size == 0:
            continue
        sl = slice(zs[0], zs[-1] + 1)
        e = (((xt - cx) / ax) ** 2)[:, None, None] + (((yt - cy) / ay) ** 2)[None, :, None] \
            + (((zt[sl] - cz) / az) ** 2)[None, None, :]
        sub = t[:, :, sl]
        sub[(e < 1.0) & interior[:, :, sl]] = LUNG
    body2d = t.any(axis=2) if zt.size else np.zeros(t.shape[:2], bool)
    para, vb, cortex_ring, post_bone, canal, aorta = spine2d
    t[para & body2d] = MUSCLE
    t[post_bone] = CORTEX
    t[canal] = CANAL
    t[cortex_ring] = CORTEX
    s = anat["spine"]
    disc = ((zt - s["phase"]) % s["period"]) < s["disc"]
    for k in range(zt.size):
        t[:, :, k][vb] = DISC if disc[k] else MARROW
    t[aorta] = AORTA
    return t


def _spine_2d(anat, xt, yt):
    """In-plane (constant along z) masks of the spine, paraspinal muscles and aorta."""
    s, ao = anat["spine"], anat["aorta"]
    X, Y = xt[:, None], yt[None, :]

    def disk(cx, cy, rx, ry=None):
        ry = rx if ry is None else ry
        return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 < 1.0

    r = s["r"]
    vb_outer = disk(s["x"], s["y"], r)
    vb_inner = disk(s["x"], s["y"], r - 2.5)
    canal_y = s["y"] - r - 8.0
    canal = disk(s["x"], canal_y, 7.0)
    post_bone = disk(s["x"], canal_y, 12.0) | disk(s["x"], canal_y - 17.0, 5.0, 12.0)
    para = disk(s["x"] + 32.0, s["y"] - 26.0, 24.0, 18.0) | disk(s["x"] - 32.0, s["y"] - 26.0, 24.0, 18.0)
    aorta = disk(ao["x"], ao["y"], ao["r"])
    return para, vb_inner, vb_outer & ~vb_inner, post_bone & ~canal, canal, aorta


# ----------------------------------------------------------------------------------------
# public API


def make_phantom_volume(shape=(160, 160, 40), spacing=(2.2, 2.2, 5.0), modality="MR", seed=0,
                        orientation="RAS"):
    """One synthetic abdominal volume, as it would be stored on disk.

    Args:
        shape: matrix size (nx, ny, nz) along R, A, S (before storage reordering).
        spacing: voxel size (sx, sy, sz) in mm along R, A, S.
        modality: ``"MR"`` or ``"CT"``.
        seed: integer seed; the same seed gives byte-identical arrays (the anatomy does not
            depend on ``modality``, ``orientation`` or ``shape``, apart from scaling to fit).
        orientation: storage voxel order: ``"RAS"`` (axes x, y, z increase to R, A, S),
            ``"LPS"`` (x and y flipped) or ``"SLICE_FIRST"`` (axes permuted to (z, y, x)).

    Returns:
        (image, mask, affine): image (int16 HU for CT, float32 for MR) and mask (uint8 label
        map, 0 = background, ``CLASSES[i]`` = i + 1), both shaped (nx, ny, nz) for RAS/LPS and
        (nz, ny, nx) for SLICE_FIRST; affine 4x4 float64 voxel -> RAS world mm, volume centre at
        the world origin.  If the field of view is too small for an adult abdomen the anatomy is
        shrunk (separately in-plane and along z) to fit.
    """
    modality = str(modality).upper()
    orientation = str(orientation).upper()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 2 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"shape must be 3 ints >= 2 and spacing 3 positive mm, got {shape}, {spacing}")
    nx, ny, nz = shape
    ct = modality == "CT"

    ss_anat, ss_tex, ss_int, ss_noise = np.random.SeedSequence(int(seed)).spawn(4)
    anat = _sample_anatomy(np.random.default_rng(ss_anat))

    # Template coordinates of the voxel centres (anatomy shrunk if the field of view is small).
    ras_aff = _ras_affine(shape, spacing)
    half = [(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    s_xy = min(1.0, half[0] / _NEED_HALF_XY[0], half[1] / _NEED_HALF_XY[1])
    s_z = min(1.0, half[2] / _NEED_HALF_Z)
    grids = [((ras_aff[i, 3] + np.arange(n) * spacing[i]) / sc).astype(np.float32)
             for i, (n, sc) in enumerate(zip(shape, (s_xy, s_xy, s_z)))]
    xt, yt, zt = grids
    cz = max(1, min(nz, _CHUNK_VOXELS // (nx * ny)))

    # 1. Tissue map of the non-organ anatomy.
    spine2d = _spine_2d(anat, xt, yt)
    tissue = np.empty(shape, np.uint8)
    for z0 in range(0, nz, cz):
        tissue[:, :, z0:z0 + cz] = _render_tissue_chunk(anat, xt, yt, zt[z0:z0 + cz], spine2d)

    # 2. Organ label map: each voxel goes to the organ with the smallest normalised field,
    # with a thin gap where two organs meet; organs only replace viscera/lung.
    mask = np.zeros(shape, np.uint8)
    boxes = [_organ_bbox(o, grids) for o in anat["organs"]]
    lo = [min(b[ax][0] for b in boxes) for ax in range(3)]
    hi = [max(b[ax][1] for b in boxes) for ax in range(3)]
    if all(h > l for l, h in zip(lo, hi)):
        ushape = tuple(h - l for l, h in zip(lo, hi))
        best = np.full(ushape, 1e30, np.float32)
        second = np.full(ushape, 1e30, np.float32)
        lab = np.zeros(ushape, np.uint8)
        sinus = np.zeros(ushape, bool)
        local = []
        for org, box in zip(anat["organs"], boxes):
            sl = tuple(slice(b0 - l, b1 - l) for (b0, b1), l in zip(box, lo))
            local.append(sl)
            if any(b1 <= b0 for b0, b1 in box):
                continue
            f, (ux, uy, uz) = _organ_field(org, *(g[b0:b1] for g, (b0, b1) in zip(grids, box)))
            bb, ss, ll = best[sl], second[sl], lab[sl]
            better = f < bb
            np.copyto(ss, np.where(better, bb, np.minimum(ss, f)))
            np.copyto(bb, np.where(better, f, bb))
            ll[better] = org["label"]
            if org["sinus"] is not None:
                e = ((ux - 0.3 * org["sinus"]) / 0.3) ** 2 + ((uy - 0.1) / 0.35) ** 2 + (uz / 0.5) ** 2
                sinus[sl] |= e < 1.0
            del f, ux, uy, uz, better
        usl = tuple(slice(l, h) for l, h in zip(lo, hi))
        tis = tissue[usl]
        keep = (best < 1.0) & ((second - best) > _GAP) & ((tis == VISCERA) | (tis == LUNG))
        del best, second
        lab[~keep] = 0
        for org, sl in zip(anat["organs"], local):
            sub = lab[sl]
            m = sub == org["label"]
            cc, n = ndimage.label(m)
            if n > 1:  # keep one connected component per organ
                sizes = np.bincount(cc.ravel())
                sizes[0] = 0
                sub[m & (cc != int(np.argmax(sizes)))] = 0
        mask[usl] = lab
        for value, code in enumerate(_ORGAN_TISSUE, start=1):
            tis[lab == value] = code
        tis[sinus & ((lab == 2) | (lab == 3))] = SINUS
        del lab, sinus

    # 3. Intensities: per-case tissue means, texture, partial volume, bias, noise.
    rng_int = np.random.default_rng(ss_int)
    if ct:
        lut = np.array([_CT_LUT[k] for k in range(_N_TISSUES)], np.float32)
        lut[[FAT, MUSCLE, LIVER, SPLEEN, KIDNEY, AORTA]] += rng_int.uniform(-6, 6, 6).astype(np.float32)
        lut[KIDNEY] += np.float32(rng_int.uniform(-20, 20))
        lut[AORTA] += np.float32(rng_int.uniform(-30, 30))
        amp = np.array([_CT_TEX[k] for k in range(_N_TISSUES)], np.float32)
        bowel = np.float32(_CT_BOWEL + rng_int.uniform(-10, 10))
        noise_sd = _u(rng_int, 8.0, 15.0)
    else:
        gain = _u(rng_int, 0.6, 1.6)
        lut = np.array([_MR_LUT[k] for k in range(_N_TISSUES)], np.float32)
        lut *= rng_int.uniform(0.93, 1.07, _N_TISSUES).astype(np.float32)
        lut[SPLEEN] = lut[LIVER] * np.float32(rng_int.uniform(0.88, 0.98))
        lut *= np.float32(gain)
        amp = lut * np.float32(_MR_TEX_FRAC)
        bowel = np.float32(_MR_BOWEL * gain * rng_int.uniform(0.9, 1.1))
        noise_sd = _u(rng_int, 0.02, 0.035) * float(lut[LIVER])
        # smooth multiplicative bias field, separable as B(x, y) * B(z)
        c = rng_int.normal(0.0, 0.12, 7)
        Xn, Yn, Zn = xt / _BODY_A, yt / _BODY_B, zt / 100.0
        logb = (c[0] * Xn[:, None] + c[1] * Yn[None, :] + c[2] * Xn[:, None] ** 2
                + c[3] * Yn[None, :] ** 2 + c[4] * Xn[:, None] * Yn[None, :])
        bias_xy = np.exp(logb).astype(np.float32)
        bias_z = np.exp(c[5] * Zn + c[6] * Zn ** 2).astype(np.float32)

    # Smooth texture field (~7 mm correlation), low-res noise interpolated per chunk.
    rng_tex = np.random.default_rng(ss_tex)
    steps = [max(1.0, 7.0 / s) for s in spacing]
    lshape = [int(np.ceil((n - 1) / st)) + 4 for n, st in zip(shape, steps)]
    # B-spline smoothing of white noise divides the variance by (315/151) per axis on average.
    low = rng_tex.standard_normal(lshape, dtype=np.float32) * np.float32((315.0 / 151.0) ** 1.5)
    pos = [np.arange(n) / st + 1.0 for n, st in zip(shape, steps)]

    rng_noise = np.random.default_rng(ss_noise)
    image = np.empty(shape, np.int16 if ct else np.float32)
    halo = 2
    for z0 in range(0, nz, cz):
        z1 = min(nz, z0 + cz)
        a0, a1 = max(0, z0 - halo), min(nz, z1 + halo)
        t = tissue[:, :, a0:a1]
        tex = _bspline_axis(_bspline_axis(_bspline_axis(low, pos[2][a0:a1], 2), pos[0], 0), pos[1], 1)
        img = lut[t]
        img += amp[t] * tex
        vis = t == VISCERA
        mix = np.clip(0.5 + 0.9 * tex[vis], 0.0, 1.0)
        img[vis] = lut[VISCERA] + (bowel - lut[VISCERA]) * mix + 0.3 * amp[VISCERA] * tex[vis]
        del tex, vis, mix
        img = ndimage.gaussian_filter(img, _PV_SIGMA, mode="nearest", truncate=3.0)
        img = img[:, :, z0 - a0:z1 - a0]
        n_shape = img.shape
        if ct:
            img += noise_sd * rng_noise.standard_normal(n_shape, dtype=np.float32)
            image[:, :, z0:z1] = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
        else:
            img *= bias_xy[:, :, None]
            img *= bias_z[None, None, z0:z1]
            re = img + noise_sd * rng_noise.standard_normal(n_shape, dtype=np.float32)
            im = noise_sd * rng_noise.standard_normal(n_shape, dtype=np.float32)
            image[:, :, z0:z1] = np.sqrt(re * re + im * im)
        del img
    del tissue

    image, affine = _store(image, ras_aff, orientation)
    mask, _ = _store(mask, ras_aff, orientation)
    return image, mask, affine


def _assign_splits(n, split, rng):
    fr = np.asarray(split, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split must be 3 non-negative fractions (train, val, test), got {split!r}")
    fr = fr / fr.sum()
    if n < 3:
        return ["train"] * n
    n_val, n_test = int(round(n * fr[1])), int(round(n * fr[2]))
    if fr[1] > 0:
        n_val = max(1, n_val)
    if fr[2] > 0 and n >= 5:
        n_test = max(1, n_test)
    while n_val + n_test > n - 1:  # keep at least one training case
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    splits = ["train"] * n
    order = rng.permutation(n)
    for i in order[:n_val]:
        splits[i] = "val"
    for i in order[n_val:n_val + n_test]:
        splits[i] = "test"
    return splits


def make_phantom_cohort(out_dir, n_cases=20, seed=0, modality="MR", shape=None,
                        split=(0.7, 0.15, 0.15)) -> Path:
    """Write a synthetic cohort and its manifest (DESIGN section 3).

    Writes ``out_dir/images/<id>.nii.gz``, ``out_dir/masks/<id>.nii.gz`` (ids ``case000``,
    ``case001``, ...) and ``out_dir/manifest.json`` (written last, atomically).  ``shape`` is the
    base matrix (nx, ny, nz), default (160, 160, 40); per case the in-plane matrix varies by
    0.85x-1.15x with a ~352 mm field of view (so the spacing varies), the number of slices by
    about +-10 % (z spacing 200 mm / base nz), the storage orientation cycles RAS, LPS, RAS,
    SLICE_FIRST, LPS, and anatomy, intensities, bias and noise come from a per-case seed.
    One modality per cohort (``"MR"`` or ``"CT"``).  Tags are derived from the ground-truth
    mask along the file's own axial axis.  Returns the manifest path.
    """
    modality = str(modality).upper()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES} (one per manifest), got {modality!r}")
    n_cases = int(n_cases)
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    base = tuple(int(n) for n in (shape if shape is not None else _BASE_SHAPE))
    if len(base) != 3 or min(base) < 4:
        raise ValueError(f"shape must be 3 ints >= 4, got {shape!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)

    splits = _assign_splits(n_cases, split, np.random.default_rng([int(seed), 7919]))
    cases = []
    for i in range(n_cases):
        rng = np.random.default_rng([int(seed), i])
        f = _u(rng, 0.85, 1.15)
        nx, ny = max(8, int(round(base[0] * f))), max(8, int(round(base[1] * f)))
        nz = max(4, int(round(base[2] * _u(rng, 0.9, 1.1))))
        fov = _BASE_FOV_XY * _u(rng, 0.95, 1.08)
        spacing = (fov / nx, fov / ny, _BASE_FOV_Z / base[2])
        orientation = _ORIENTATION_CYCLE[i % len(_ORIENTATION_CYCLE)]
        case_seed = int(rng.integers(0, 2**31 - 1))
        image, mask, affine = make_phantom_volume((nx, ny, nz), spacing, modality, case_seed, orientation)
        cid = f"case{i:03d}"
        save_nifti(image, affine, out_dir / "images" / f"{cid}.nii.gz")
        save_nifti(mask, affine, out_dir / "masks" / f"{cid}.nii.gz")
        cases.append({"id": cid, "image": f"images/{cid}.nii.gz", "mask": f"masks/{cid}.nii.gz",
                      "tags": tags_from_mask(mask, axial_axis(affine)), "split": splits[i]})

    manifest = {"name": f"phantom-{modality}-{int(seed)}", "modality": modality, "slice_axis": "axial",
                "classes": list(CLASSES), "tags_from_masks": False, "cases": cases}
    path = out_dir / "manifest.json"
    tmp = out_dir / f".manifest.json.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path

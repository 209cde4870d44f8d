"""Real-CT cohort for the benchmarks, built from the TotalSegmentator 2.18.0 sdist (issue 13).

What it is, honestly:

- **Source.** The TotalSegmentator 2.18.0 source distribution on PyPI
  (``totalsegmentator-2.18.0.tar.gz``, sha256 ``5d4223ef...bd03``, ~38 MB) ships its test
  reference files under ``tests/reference_files/``. ``build`` downloads it **once** into the cache
  folder with ``pip download`` (the only network access; the ``ccam`` tool itself never
  downloads anything) and extracts just the files below.
- **Labels are TotalSegmentator model output** (its ``--fast`` 3 mm model, ``total`` task:
  1 spleen, 2 kidney_right, 3 kidney_left, 5 liver), i.e. a *silver standard*, not manual ground
  truth. (Where the sdist also has the full-resolution model's output, the two agree at Dice
  0.96-0.98 on these four organs.)
- **Training/validation cases are deformations of ONE patient** ("patient A":
  ``example_ct.nii.gz``, contrast CT, 122 x 101 x 112 at 3 mm isotropic, RAS, pelvis to upper
  abdomen, liver dome and spleen top cut by the field of view; labels
  ``example_seg_fast_force_split.nii.gz``). Each case is a random smooth elastic displacement
  (max 4-10 mm), a small affine (scale +-8 % per axis, in-plane rotation +-5 deg, translation
  +-10 mm), a random z-crop (0-24 mm off the top, so liver/spleen heights vary, and 24-108 mm
  of abdomen/pelvis below the kidneys), HU scale/offset jitter and noise, applied identically to
  image (linear) and labels (nearest). All cases therefore share every landmark (spine, ribs,
  bowel, vessels) of the same body: a hard, honest test of whether the CAMs sit *on the organ*
  rather than on something that co-occurs with it, but NOT a test of generalisation across
  patients. Do not read the val numbers as cross-patient numbers.
- **Test cases come from a different CT acquisition** ("patient B": the DICOM series
  ``example_ct_dicom/``, Siemens Biograph40 mCT PET/CT, 2022-12-08, 20 axial slices of
  512 x 512 at 0.977 x 0.977 x 2 mm, arms down, a 40 mm slab of the upper abdomen at the liver
  and spleen; labels ``example_seg_dicom.nii.gz``, TotalSegmentator ``--fast``). The headers are
  anonymised, so "different patient" is inferred (different scanner frame, posture, anatomy),
  not documented. The slab contains liver and spleen only (no kidney voxels: every kidney
  slice tag is 0 there). Case ``test_b0`` is the plain resampled scan; ``test_b1``, ``test_b2``
  are mild deformations of it (max 2-4 mm, scale +-3 %, rotation +-2 deg, shift +-5 mm).
- The sdist also holds an MR (``example_mr_sm.nii.gz``, 117 x 91 x 20 at 3 mm, LPS, with all
  four organs in ``example_seg_mr.nii.gz``) and a thoracic CT (``aorta_report/example_ct.nii.gz``,
  no liver/kidney/spleen labels). The MR is not used: a manifest holds one modality.

Geometry: every case is resampled to 2 mm in-plane (``--inplane-mm``) on a square 384 mm field
of view (``--fov-mm``, 192 x 192) centred on the body, and 3 mm in z; a case keeps its source's
axis directions (train/val stored RAS like patient A, test stored LAS like patient B's
segmentation), so the project's geometry handling is exercised. ``ccam prepare`` resizes every
slice to S x S regardless of spacing, so one field of view for all cases keeps the organ scale
the same between train and test. Slice tags are written explicitly (inclusive ranges along the
file's own axial axis, from the masks, as the phantom does); ``tags_from_masks`` stays false.

Usage::

    .venv/bin/python benchmarks/real_ct.py build --cache ~/.cache/ccam-real-ct --out runs/real_ct_data \
        [--cases 16] [--seed 0] [--test-cases 3]
    .venv/bin/python benchmarks/real_ct.py run --cache ~/.cache/ccam-real-ct --workroot runs/real_ct \
        [--data DIR] [--config configs/demo.yaml] [--config-name NAME] [--set k=v ...]

``run`` builds the cohort when it is missing or was built with other settings (default folder
``<cache>/cohort``), then calls ``benchmarks/localisation.py --manifest M --workroot W
--config-name NAME --config CFG [--set k=v ...]``, which prints a markdown table row.
Building 16 + 3 cases takes well under a minute on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ccam.data.phantom import axial_axis, save_nifti, tags_from_mask  # noqa: E402

VERSION = "2.18.0"
SDIST = f"totalsegmentator-{VERSION}.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
REF = f"totalsegmentator-{VERSION}/tests/reference_files/"
TRAIN_IMAGE = "example_ct.nii.gz"
TRAIN_LABEL = "example_seg_fast_force_split.nii.gz"
TEST_DICOM = "example_ct_dicom/"
TEST_LABEL = "example_seg_dicom.nii.gz"
# TotalSegmentator "total" task label values (totalsegmentator/map_to_binary.py) of our classes.
CLASSES = ["liver", "right_kidney", "left_kidney", "spleen"]
TS_VALUE = {"liver": 5, "right_kidney": 2, "left_kidney": 3, "spleen": 1}
AIR = -1024.0
BUILD_VERSION = 1  # bump when the cohort recipe changes (run rebuilds on mismatch)


def log(msg: str) -> None:
    print(f"real_ct: {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    print(f"real_ct: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------
# sdist download and extraction


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """The sdist in ``cache`` (downloaded with pip once; skipped when present and intact)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / SDIST
    if not path.exists():
        log(f"downloading {SDIST} from PyPI into {cache} (once) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", f"totalsegmentator=={VERSION}", "-d", str(cache)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0 or not path.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
            die(f"cannot download totalsegmentator=={VERSION} sdist from PyPI (offline?): {tail[0]} "
                f"-- fix: connect, or copy {SDIST} into {cache}")
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        die(f"{path} has sha256 {digest}, expected {SDIST_SHA256} -- delete it and rerun")
    return path


def extract(cache: Path) -> Path:
    """Extract the reference files we use to ``cache/ref`` (once); returns that folder."""
    dest = cache / "ref"
    stamp = dest / ".complete"
    if stamp.exists():
        return dest
    sdist = fetch_sdist(cache)
    tmp = cache / f".ref.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    wanted = (REF + TRAIN_IMAGE, REF + TRAIN_LABEL, REF + TEST_LABEL)
    with tarfile.open(sdist, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and
                   (m.name in wanted or m.name.startswith(REF + TEST_DICOM))]
        for m in members:
            m.name = m.name[len(REF):]
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp, members=members, **kw)
    missing = [w[len(REF):] for w in wanted if not (tmp / w[len(REF):]).exists()]
    if missing or not any((tmp / TEST_DICOM).iterdir()):
        die(f"{SDIST} lacks {missing or TEST_DICOM}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    stamp.write_text(SDIST_SHA256 + "\n")
    return dest


# ----------------------------------------------------------------------------------------
# sources


def _labels_to_classes(ts: np.ndarray, classes: list[str]) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for k, name in enumerate(classes, start=1):
        lut[TS_VALUE[name]] = k
    return lut[np.asarray(ts, dtype=np.uint8)]


def load_patient_a(ref: Path):
    img = nib.load(str(ref / TRAIN_IMAGE))
    lab = nib.load(str(ref / TRAIN_LABEL))
    if not np.allclose(img.affine, lab.affine, atol=1e-3) or img.shape != lab.shape:
        die(f"{TRAIN_IMAGE} and {TRAIN_LABEL} are on different grids")
    return (np.asarray(img.dataobj, dtype=np.float32), img.affine,
            np.asarray(lab.dataobj, dtype=np.uint8), lab.affine)


def load_patient_b(ref: Path):
    """The DICOM series as an (x, y, z) float array with its RAS affine, and its segmentation."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(ref / TEST_DICOM))
    if not names:
        die(f"no DICOM series in {ref / TEST_DICOM}")
    reader.SetFileNames(names)
    im = reader.Execute()
    arr = sitk.GetArrayFromImage(im).transpose(2, 1, 0).astype(np.float32)  # (x, y, z), HU
    d = np.array(im.GetDirection(), float).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d * np.array(im.GetSpacing(), float)[None, :]
    aff[:3, 3] = im.GetOrigin()
    aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff  # ITK LPS -> NIfTI RAS world
    lab = nib.load(str(ref / TEST_LABEL))
    return arr, aff, np.asarray(lab.dataobj, dtype=np.uint8), lab.affine


def body_centre_xy(img: np.ndarray, aff: np.ndarray) -> np.ndarray:
    """World (x, y) of the centre of the torso's bounding box (largest body component; the
    table and separate arms drop out)."""
    ax = axial_axis(aff)
    mid = np.take(img, img.shape[ax] // 2, axis=ax)
    body = ndimage.binary_opening(mid > -400, iterations=3)
    lab, n = ndimage.label(body)
    if n == 0:
        die("no body found in the source image")
    big = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    idx = np.argwhere(big)
    c2 = (idx.min(0) + idx.max(0)) / 2.0
    vox = np.insert(c2, ax, (img.shape[ax] - 1) / 2.0)
    return (aff @ np.append(vox, 1.0))[:2]


# ----------------------------------------------------------------------------------------
# resampling with a random warp


def _bspline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) cubic B-spline interpolation weights: a smooth 1-D upsampling."""
    pos = 1.0 + np.linspace(0.0, n_ctrl - 3.0 - 1e-6, n_out)
    i0 = np.floor(pos).astype(int)
    t = pos - i0
    w = np.stack([(1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
                  (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6], axis=1)
    m = np.zeros((n_out, n_ctrl))
    for k in range(4):
        np.add.at(m, (np.arange(n_out), i0 + k - 1), w[:, k])
    return m


def elastic_field(shape, spacing, max_mm: float, rng, ctrl_mm=(48.0, 48.0, 45.0)) -> np.ndarray:
    """(3, *shape) smooth random displacement in mm (world axes), max magnitude ``max_mm``."""
    if max_mm <= 0:
        return np.zeros((3,) + tuple(shape), np.float32)
    mats = []
    for n, sp, c in zip(shape, spacing, ctrl_mm):
        n_ctrl = max(4, int(np.ceil(n * sp / c)) + 3)
        mats.append((n_ctrl, _bspline_matrix(n, n_ctrl)))
    out = np.empty((3,) + tuple(shape), np.float32)
    for comp in range(3):
        coarse = rng.standard_normal([m[0] for m in mats])
        f = np.einsum("ia,abc->ibc", mats[0][1], coarse)
        f = np.einsum("jb,ibc->ijc", mats[1][1], f)
        f = np.einsum("kc,ijc->ijk", mats[2][1], f)
        out[comp] = f
    mag = np.sqrt((out ** 2).sum(0)).max()
    out *= np.float32(max_mm / max(mag, 1e-6))
    return out


def out_grid(src_aff: np.ndarray, centre_xy, z_lo: float, z_hi: float, inplane: float, fov: float,
             z_mm: float):
    """Shape and affine of the output grid: the source's axis directions (axis-aligned),
    ``inplane`` mm on a square ``fov``, ``z_mm`` from world z ``z_lo`` to ``z_hi``."""
    rot = src_aff[:3, :3]
    if np.abs(rot - np.diag(np.diag(rot))).max() > 1e-3 * np.abs(rot).max():
        die("only axis-aligned sources are supported")
    signs = np.sign(np.diag(rot))
    n_xy = int(round(fov / inplane))
    nz = int(np.floor((z_hi - z_lo) / z_mm + 1e-6)) + 1
    shape = (n_xy, n_xy, nz)
    sp = np.array([inplane, inplane, z_mm])
    centre = np.array([centre_xy[0], centre_xy[1], z_lo + (nz - 1) * z_mm / 2.0])
    aff = np.eye(4)
    aff[:3, :3] = np.diag(signs * sp)
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return shape, aff


def resample(src_img, img_aff, src_lab, lab_aff, shape, aff, warp):
    """Sample image (linear, air outside) and labels (nearest, 0 outside) on the output grid.

    ``warp(p)`` maps output world points (3, N) to source world points; the source z index is
    clamped to its range so no air slab appears at a z-crop edge."""
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    vox = np.stack([ii.ravel(), jj.ravel(), kk.ravel()])
    del ii, jj, kk
    world = aff[:3, :3].astype(np.float32) @ vox + aff[:3, 3:4].astype(np.float32)
    q = warp(world)
    out = []
    for arr, a, order, cval in ((src_img, img_aff, 1, AIR), (src_lab, lab_aff, 0, 0)):
        inv = np.linalg.inv(a)
        c = inv[:3, :3].astype(np.float32) @ q + inv[:3, 3:4].astype(np.float32)
        zax = axial_axis(a)
        np.clip(c[zax], 0, arr.shape[zax] - 1, out=c[zax])
        v = ndimage.map_coordinates(arr, c, order=order, mode="constant", cval=cval, prefilter=False)
        out.append(v.reshape(shape))
    return out[0], out[1]


def draw_affine(rng, scale: float, rot_deg: float, shift_mm: float):
    """Random small affine: per-axis scale 1 +- ``scale``, rotation about z, in-plane shift."""
    s = rng.uniform(1 - scale, 1 + scale, 3)
    th = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    r = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    t = np.append(rng.uniform(-shift_mm, shift_mm, 2), 0.0)
    params = dict(scale_xyz=[round(float(v), 4) for v in s], rot_deg=round(float(np.rad2deg(th)), 2),
                  shift_mm=[round(float(v), 1) for v in t[:2]])
    return r @ np.diag(s), t, params


def make_warp(centre, m, t, elastic):
    """Backward warp output world -> source world: q = c + M (p - c) + t + u(p), with u given on
    the output grid's voxels (world axes), so ``p`` must be that grid's points in C order."""
    m = np.asarray(m, np.float32)
    c = np.asarray(centre, np.float32)[:, None]
    t = np.asarray(t, np.float32)[:, None]

    def warp(p):
        q = m @ (p - c) + c + t
        if elastic is not None:
            q += elastic.reshape(3, -1)
        return q

    return warp


def jitter_intensity(img: np.ndarray, rng, scale: float, offset: float, noise: float) -> tuple[np.ndarray, dict]:
    a = rng.uniform(1 - scale, 1 + scale)
    b = rng.uniform(-offset, offset)
    sd = rng.uniform(0, noise)
    body = img > -900
    out = img.copy()
    out[body] = img[body] * a + b
    if sd > 0:
        out += (sd * rng.standard_normal(img.shape)).astype(np.float32)
    return out, dict(hu_scale=round(float(a), 4), hu_offset=round(float(b), 1), noise_sd=round(float(sd), 1))


# ----------------------------------------------------------------------------------------
# cohort


def _z_world(aff, k):
    return float(aff[2, 2] * k + aff[2, 3])


def make_case(src: dict, rng, *, z_lo: float, z_hi: float, inplane: float, fov: float, z_mm: float,
              scale: float, rot_deg: float, shift_mm: float, elastic_mm, intensity):
    """One case from a source: output image (int16 HU), labels (uint8), affine, parameters.

    ``z_lo``/``z_hi``: the source world z-range the case covers; ``elastic_mm``: (lo, hi) of the
    displacement's max magnitude, or None; ``intensity``: (scale, offset, noise) or None."""
    m, t, params = draw_affine(rng, scale, rot_deg, shift_mm)
    zc = (z_lo + z_hi) / 2.0
    half = (z_hi - z_lo) / 2.0 / m[2, 2]  # q_z = zc + s_z (p_z - zc) spans [z_lo, z_hi]
    shape, aff = out_grid(src["orient_aff"], src["centre_xy"], zc - half, zc + half, inplane, fov, z_mm)
    u = None
    if elastic_mm is not None:
        amp = float(rng.uniform(*elastic_mm))
        u = elastic_field(shape, (inplane, inplane, z_mm), amp, rng)
        params["elastic_max_mm"] = round(amp, 2)
    centre = np.array([src["centre_xy"][0], src["centre_xy"][1], zc])
    warp = make_warp(centre, m, t, u)
    img, lab = resample(src["img"], src["img_aff"], src["lab"], src["lab_aff"], shape, aff, warp)
    del u
    if intensity is not None:
        img, ip = jitter_intensity(img, rng, *intensity)
        params.update(ip)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    params["source_z_mm"] = [round(z_lo, 1), round(z_hi, 1)]
    return img, lab.astype(np.uint8), aff, params


def _organ_slices(lab: np.ndarray, aff: np.ndarray, value: int):
    ax = axial_axis(aff)
    present = np.moveaxis(lab == value, ax, 0).reshape(lab.shape[ax], -1).any(1)
    k = np.flatnonzero(present)
    return (int(k.min()), int(k.max())) if k.size else None


def build(cache: Path, out: Path, n_cases: int = 16, seed: int = 0, n_test: int = 3, n_val: int = 2,
          inplane: float = 2.0, fov: float = 384.0, z_mm: float = 3.0) -> Path:
    """Write ``out/images``, ``out/masks``, ``out/manifest.json``, ``out/README.md`` and
    ``out/provenance.json``; returns the manifest path."""
    t0 = time.time()
    if n_cases < 1:
        die("--cases must be >= 1")
    ref = extract(cache)
    img_a, aff_a, ts_a, laff_a = load_patient_a(ref)
    classes = [c for c in CLASSES if (ts_a == TS_VALUE[c]).any()]
    lab_a = _labels_to_classes(ts_a, classes)
    src_a = dict(img=img_a, img_aff=aff_a, lab=lab_a, lab_aff=laff_a, orient_aff=aff_a,
                 centre_xy=body_centre_xy(img_a, aff_a))
    # z-crop range (source slices): the top loses 0-8 slices (<= 24 mm at 3 mm; it stays >= 2
    # slices above the lowest organ top), the bottom keeps 8-36 slices below the lowest organ
    ext = [_organ_slices(lab_a, aff_a, k + 1) for k in range(len(classes))]
    nz_a = img_a.shape[axial_axis(aff_a)]
    lowest = min(e[0] for e in ext)
    top_min = min(nz_a - 1, max(min(e[1] for e in ext) + 2, nz_a - 9))
    sp_a = float(abs(aff_a[2, axial_axis(aff_a)]))
    if aff_a[2, axial_axis(aff_a)] < 0:
        die("patient A is expected with z increasing along its axial axis")

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for old in list((out / "images").glob("*.nii.gz")) + list((out / "masks").glob("*.nii.gz")):
        old.unlink()
    split_rng = np.random.default_rng([seed, 7919])
    n_val = max(0, min(n_val, (n_cases - 1) // 2))  # at least half the cases train
    val_ids = set(int(i) for i in split_rng.permutation(n_cases)[:n_val])
    cases, prov = [], []

    def write(cid, img, lab, aff, split, source, params):
        save_nifti(img, aff, out / "images" / f"{cid}.nii.gz")
        save_nifti(lab, aff, out / "masks" / f"{cid}.nii.gz")
        cases.append({"id": cid, "image": f"images/{cid}.nii.gz", "mask": f"masks/{cid}.nii.gz",
                      "tags": tags_from_mask(lab, axial_axis(aff), classes), "split": split})
        prov.append({"id": cid, "split": split, "source": source, "shape": list(img.shape),
                     "orientation": "".join(nib.aff2axcodes(aff)), **params})
        log(f"{cid} ({split}, {source}): {img.shape} {''.join(nib.aff2axcodes(aff))} {params}")

    for i in range(n_cases):
        rng = np.random.default_rng([seed, 1, i])
        k_lo = max(0, lowest - int(rng.integers(8, 37)))
        k_hi = int(rng.integers(top_min, nz_a))
        img, lab, aff, params = make_case(
            src_a, rng, z_lo=_z_world(aff_a, k_lo), z_hi=_z_world(aff_a, k_hi), inplane=inplane, fov=fov,
            z_mm=z_mm, scale=0.08, rot_deg=5.0, shift_mm=10.0, elastic_mm=(4.0, 10.0),
            intensity=(0.05, 20.0, 12.0))
        write(f"a{i:03d}", img, lab, aff, "val" if i in val_ids else "train", "patient A (example_ct)", params)
    del img_a, ts_a, lab_a, src_a

    if n_test > 0:
        img_b, aff_b, ts_b, laff_b = load_patient_b(ref)
        src_b = dict(img=img_b, img_aff=aff_b, lab=_labels_to_classes(ts_b, classes), lab_aff=laff_b,
                     orient_aff=laff_b, centre_xy=body_centre_xy(img_b, aff_b))
        zs = sorted(_z_world(aff_b, k) for k in (0, img_b.shape[axial_axis(aff_b)] - 1))
        for j in range(n_test):
            rng = np.random.default_rng([seed, 2, j])
            mild = j > 0
            img, lab, aff, params = make_case(
                src_b, rng, z_lo=zs[0], z_hi=zs[1], inplane=inplane, fov=fov, z_mm=z_mm,
                scale=0.03 if mild else 0.0, rot_deg=2.0 if mild else 0.0, shift_mm=5.0 if mild else 0.0,
                elastic_mm=(2.0, 4.0) if mild else None, intensity=(0.02, 10.0, 6.0) if mild else None)
            write(f"b{j}", img, lab, aff, "test", "patient B (example_ct_dicom)", params)

    n_tr = sum(c["split"] == "train" for c in cases)
    n_te = sum(c["split"] == "test" for c in cases)
    name = (f"real-ct-totalseg{VERSION}: train/val = {n_cases} deformations of patient A (example_ct), "
            f"test = {n_te} of patient B (example_ct_dicom); TotalSegmentator silver-standard labels")
    manifest = {"name": name, "modality": "CT", "slice_axis": "axial", "classes": classes,
                "tags_from_masks": False, "cases": cases}
    settings = dict(build_version=BUILD_VERSION, cases=n_cases, seed=seed, test_cases=n_test, val_cases=n_val,
                    inplane_mm=inplane, fov_mm=fov, z_mm=z_mm, sdist=SDIST, sdist_sha256=SDIST_SHA256)
    (out / "provenance.json").write_text(json.dumps({"settings": settings, "cases": prov}, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# Real-CT cohort ({name})\n\nBuilt by `benchmarks/real_ct.py build` from the TotalSegmentator "
        f"{VERSION} sdist (sha256 {SDIST_SHA256}).\n\n"
        f"- train: {n_tr}, val: {n_cases - n_tr}: random deformations of ONE patient (A: "
        f"`tests/reference_files/{TRAIN_IMAGE}`, labels `{TRAIN_LABEL}`); they share every landmark.\n"
        f"- test: {n_te}: patient B (`tests/reference_files/{TEST_DICOM}`, labels `{TEST_LABEL}`), a different "
        "CT acquisition (PET/CT, 40 mm upper-abdominal slab: liver and spleen only, no kidneys); b0 is the "
        "plain resampled scan, the others mild deformations.\n"
        "- labels: TotalSegmentator `--fast` model output (silver standard, not manual ground truth); "
        "classes: " + ", ".join(f"{k + 1} = {c}" for k, c in enumerate(classes)) + ".\n"
        f"- grid: {inplane} mm in-plane on a {fov:.0f} mm square field of view centred on the body, {z_mm} mm "
        "in z; per-case parameters in provenance.json.\n")
    path = out / "manifest.json"
    tmp = out / f".manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    log(f"wrote {path}: {n_tr} train, {n_cases - n_tr} val, {n_te} test in {time.time() - t0:.1f} s")
    return path


def _built_with(out: Path, settings: dict) -> bool:
    try:
        old = json.loads((out / "provenance.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return False
    return (out / "manifest.json").exists() and all(old.get(k) == v for k, v in settings.items())


# ----------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--cache", required=True, type=Path, help="folder for the sdist (downloaded once) and its extract")
        p.add_argument("--cases", type=int, default=16, help="deformed cases of patient A (train + val)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--test-cases", type=int, default=3, help="cases of patient B (b0 undeformed)")
        p.add_argument("--val-cases", type=int, default=2)
        p.add_argument("--inplane-mm", type=float, default=2.0)
        p.add_argument("--fov-mm", type=float, default=384.0)
        p.add_argument("--z-mm", type=float, default=3.0)

    b = sub.add_parser("build", help="download (once) and build the cohort")
    common(b)
    b.add_argument("--out", required=True, type=Path, help="cohort folder (manifest.json, images/, masks/)")
    r = sub.add_parser("run", help="build if missing, then run benchmarks/localisation.py on it")
    common(r)
    r.add_argument("--workroot", required=True, type=Path)
    r.add_argument("--data", type=Path, default=None, help="cohort folder (default <cache>/cohort)")
    r.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    r.add_argument("--config-name", default=None, help="row label (default real-ct/<config stem>)")
    r.add_argument("--set", action="append", default=[], metavar="K=V", help="passed to localisation.py")
    a = ap.parse_args(argv)

    kw = dict(n_cases=a.cases, seed=a.seed, n_test=a.test_cases, n_val=a.val_cases,
              inplane=a.inplane_mm, fov=a.fov_mm, z_mm=a.z_mm)
    if a.cmd == "build":
        build(a.cache, a.out, **kw)
        return 0
    data = a.data or (a.cache / "cohort")
    settings = dict(build_version=BUILD_VERSION, cases=a.cases, seed=a.seed, test_cases=a.test_cases,
                    val_cases=a.val_cases, inplane_mm=a.inplane_mm, fov_mm=a.fov_mm, z_mm=a.z_mm)
    manifest = data / "manifest.json"
    if not _built_with(data, settings):
        build(a.cache, data, **kw)
    else:
        log(f"cohort present: {manifest}")
    loc = REPO / "benchmarks" / "localisation.py"
    if not loc.exists():
        die(f"{loc} not found (it is written separately); the cohort is at {manifest}")
    cmd = [sys.executable, str(loc), "--manifest", str(manifest), "--workroot", str(a.workroot),
           "--config-name", a.config_name or f"real-ct/{Path(a.config).stem}", "--config", str(a.config)]
    for kv in a.set:
        cmd += ["--set", kv]
    log("running " + " ".join(cmd))
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())

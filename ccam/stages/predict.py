"""`ccam predict`: segment volumes with the trained U-Net and write label maps on their source grids.

Two uses of one command:

- ``ccam predict --workdir W`` is the pipeline stage: the prepared cohort's test cases, read from
  their prepared slices, into ``W/predictions/<case_id>.nii.gz``.
- ``ccam predict --workdir W --input PATH --output DIR`` segments new volumes: PATH is a
  NIfTI/MHA/NRRD file, a folder of them, a DICOM series folder (or a folder of series folders),
  or a manifest. Each volume gets the normalisation of `prepare` (`ccam.data.normalise`)
  and the same canonical slicing (`ccam.io.geometry`); ``--continue`` skips cases already
  written, ``--part i/n`` takes every n-th case from the i-th (0-based; the nnU-Net convention),
  so n jobs can share a cohort without talking to each other.

Slices go through the network ``predict.batch_size`` at a time; softmax probabilities are
upsampled bilinearly to the source in-plane size before the argmax, and the label map is written
with the source affine in both qform and sform. ``--probabilities`` adds ``DIR/<case_id>.npz``
with ``probabilities`` (C, I, J, K) float16 in the file's voxel order (NIfTI-1 has no float16).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ccam import artifacts
from ccam.cam import autocast
from ccam.data.cohort import Cohort
from ccam.data.normalise import normaliser
from ccam.errors import UserError
from ccam.io.atomic import atomic_path
from ccam.io.geometry import SliceGeometry, resize_slices
from ccam.io.volume import read_volume, write_label_map
from ccam.models.segmenter import Segmenter
from ccam.io.hashing import sha256_file
from ccam.io.inputs import find_inputs, parse_part
from ccam.io.paths import inside
from ccam.progress import tqdm
from ccam.stages import base
from ccam.training import select_device

log = logging.getLogger("ccam")


# -- segmenting one volume ----------------------------------------------------------------------

@torch.inference_mode()
def segment(model: Segmenter, blocks: Iterator[np.ndarray], geom: SliceGeometry, device: torch.device,
            probabilities: bool = False, progress: Optional[tqdm] = None,
            precision: str = "fp32") -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Label map (I, J, K) uint8 on the source grid, and optionally probabilities (C, I, J, K) float16.

    ``blocks`` yields consecutive (b, S, S) float32 blocks of the normalised canonical stack.
    ``precision`` "bf16" runs the U-Net under autocast (softmax and resampling stay float32).
    """
    n, plane = geom.n_slices, geom.plane_shape
    labels = np.empty((n,) + plane, dtype=np.uint8)  # canonical (N, R, C) at source resolution
    probs = np.empty((n, model.num_classes) + plane, dtype=np.float16) if probabilities else None
    a = 0
    for block in blocks:
        x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))[:, None].to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(x)
        p = resize_slices(torch.softmax(logits.float(), dim=1), plane)  # (b, C, R, C') probabilities
        b = x.shape[0]
        labels[a:a + b] = p.max(1).indices.to(torch.uint8).cpu().numpy()  # = argmax(1), several times faster on CPU
        if probs is not None:
            probs[a:a + b] = p.half().cpu().numpy()
        a += b
        if progress is not None:
            progress.update(b)
    if a != n:
        raise RuntimeError(f"segment: got {a} slices for a volume of {n}")
    out = np.ascontiguousarray(geom.to_file_order(labels))
    if probs is None:
        return out, None
    # the class axis rides along in front: same flips and permutation as geom.to_file_order
    v = np.moveaxis(probs, 1, 0)
    if geom.flip_row:
        v = v[:, :, ::-1, :]
    if geom.flip_col:
        v = v[:, :, :, ::-1]
    return out, v.transpose((0,) + tuple(1 + int(i) for i in np.argsort(geom.perm)))


def prepared_blocks(slices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Blocks of an already prepared (N, S, S) stack (a memory map)."""
    for a in range(0, slices.shape[0], batch_size):
        yield np.array(slices[a:a + batch_size], dtype=np.float32)


def volume_blocks(array: np.ndarray, geom: SliceGeometry, meta: dict, batch_size: int, case_id: str) -> Iterator[np.ndarray]:
    """Blocks of the canonical stack of a source volume, normalised and resampled like `prepare` does."""
    norm = normaliser(meta["modality"], array, meta["ct_window"], meta["mr_percentiles"], case_id)
    view = geom.canonical_view(array)
    s = geom.size
    for a in range(0, geom.n_slices, batch_size):
        block = np.array(view[a:a + batch_size], dtype=np.float32)  # a copy: norm() works in place
        if not np.isfinite(block).all():
            raise UserError("image has NaN or Inf voxels", case=case_id, fix="fix or mask the non-finite voxels and re-export the image")
        block = norm(block)
        yield resize_slices(torch.from_numpy(block)[:, None], (s, s))[:, 0].numpy()


def write_probabilities(path: Path, probs: np.ndarray, affine: np.ndarray, classes: list[str]) -> None:
    """An .npz (read with ``np.load``) of ``probabilities`` (C, I, J, K) float16, ``affine`` and ``classes``.

    Deflate level 1: three times faster than numpy's default level for the same size (probabilities
    are mostly 0 or 1); the arrays stream into the archive, so no second copy is held in memory.
    """
    arrays = {"probabilities": probs, "affine": np.asarray(affine, dtype=np.float64),
              "classes": np.array(["background"] + list(classes))}
    with atomic_path(path, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, arr in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, arr, allow_pickle=False)


# -- pipeline stage: the prepared test cases ----------------------------------------------------

def _check_segmenter(ctx: base.StageContext, cohort: Cohort, meta: dict) -> None:
    if cohort.slice_size != meta["slice_size"] or cohort.classes != meta["classes"]:
        raise UserError("the segmenter was trained on another prepared cohort", path=str(artifacts.stage_dir(ctx.workdir, "train-seg")),
                        fix=f"re-run `ccam train-seg --workdir {ctx.workdir}`")


def part_cases(ctx: base.StageContext) -> list:
    """The cases of the per-case loop, the test split, in a fixed order (`ccam.parts` gives part i/n every n-th from the i-th)."""
    return Cohort(ctx.workdir).split("test")


def run_part(ctx: base.StageContext, cases: list) -> int:
    """Predict ``cases`` (those without a label map yet: files are written atomically); returns their slices."""
    todo = [c for c in cases if not (ctx.dir / f"{c.id}.nii.gz").exists()]
    if not todo:
        return 0
    cfg = ctx.cfg
    device = select_device(cfg)
    model, meta = artifacts.load_segmenter(ctx.workdir, device)
    cohort = Cohort(ctx.workdir)
    _check_segmenter(ctx, cohort, meta)
    bs = cfg.predict.batch_size
    n_slices = 0
    with tqdm(total=sum(c.n_slices for c in todo), desc="predict", unit="slice", dynamic_ncols=True) as bar:
        for case in todo:
            geom = case.geometry
            labels, _ = segment(model, prepared_blocks(case.slices(), bs), geom, device, progress=bar,
                                precision=cfg.runtime.precision)
            write_label_map(ctx.dir / f"{case.id}.nii.gz", labels, geom.affine_array, n_labels=cohort.num_classes,
                            qform_code=geom.qform_code, sform_code=geom.sform_code)
            n_slices += case.n_slices
    return n_slices


def run(ctx: base.StageContext) -> dict:
    cohort = Cohort(ctx.workdir)
    _check_segmenter(ctx, cohort, artifacts.load_segmenter(ctx.workdir, select_device(ctx.cfg))[1])
    cases = part_cases(ctx)
    if not cases:
        log.info("predict: the cohort has no test case; nothing to predict")
    run_part(ctx, cases)
    return {"cases": len(cases), "slices": sum(c.n_slices for c in cases),
            "checkpoint": artifacts.checkpoint(ctx.workdir, "train-seg").name}


def extra_inputs(ctx: base.StageContext) -> dict:
    """The checkpoint actually used (its bytes), so a retrained segmenter re-runs predict."""
    try:
        return {"checkpoint": sha256_file(artifacts.checkpoint(ctx.workdir, "train-seg"))}
    except UserError:
        return {"checkpoint": None}


STAGE = base.register(base.stage(
    "predict", run, extra_inputs=extra_inputs,
    help="Segment the cohort's test cases (or, with --input, any volumes) with the trained U-Net.",
    examples="ccam predict --workdir runs/demo\n"
             "ccam predict --workdir runs/demo --input new_scans/ --output new_masks/\n"
             "ccam predict --workdir runs/demo --input cohort.json --output masks/ --part 0/4 --continue",
))


def predict_files(workdir: Path, cfg, input_path: Path, output: Path, *, resume: bool = False,
                  part: Optional[str] = None, probabilities: bool = False) -> dict:
    """Segment every volume of ``input_path`` (this job's part of it) into ``output``; returns counts."""
    i, n = parse_part(part)
    cases, modality = find_inputs(input_path)
    device = select_device(cfg)
    model, meta = artifacts.load_segmenter(workdir, device)
    if modality is not None and modality != meta["modality"]:
        raise UserError(f"the manifest's modality is {modality} but the segmenter was trained on {meta['modality']}",
                        path=str(input_path), fix="use a segmenter trained on this modality")
    mine = cases[i::n]
    for cid, path in mine:
        inside(output, f"{cid}.nii.gz")  # ids are checked; this guards the folder whatever they are
        if (output / f"{cid}.nii.gz").resolve() == Path(path).resolve():
            raise UserError("the output would overwrite the input image", case=cid, path=str(path),
                            fix="choose an --output folder other than the input folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder ({e.strerror})", path=str(output), fix="choose a writable --output")

    def done(cid: str) -> bool:  # files are written atomically, so existing means complete
        return (output / f"{cid}.nii.gz").exists() and (not probabilities or (output / f"{cid}.npz").exists())

    todo = [c for c in mine if not (resume and done(c[0]))]
    skipped = len(mine) - len(todo)
    log.info("predict: %d case(s) in the input, %d in part %d/%d, %d already written and skipped, %d to do",
             len(cases), len(mine), i, n, skipped, len(todo))
    bs, S, K = cfg.predict.batch_size, meta["slice_size"], len(meta["classes"])
    n_slices = 0
    for cid, path in tqdm(todo, desc="predict", unit="case", dynamic_ncols=True):
        vol = read_volume(path, case=cid)
        geom = SliceGeometry.from_affine(vol.array.shape, vol.affine, meta["slice_axis"], S, vol.qform_code, vol.sform_code)
        with tqdm(total=geom.n_slices, desc=cid, unit="slice", leave=False, dynamic_ncols=True) as bar:
            labels, probs = segment(model, volume_blocks(vol.array, geom, meta, bs, cid), geom, device, probabilities, bar,
                                    precision=cfg.runtime.precision)
        del vol
        if probs is not None:
            write_probabilities(output / f"{cid}.npz", probs, geom.affine_array, meta["classes"])
        # the label map last: with --continue its presence marks the case complete
        write_label_map(output / f"{cid}.nii.gz", labels, geom.affine_array, n_labels=K,
                        qform_code=geom.qform_code, sform_code=geom.sform_code)
        n_slices += geom.n_slices
        del labels, probs
    return {"cases": len(todo), "skipped": skipped, "slices": n_slices}

"""Export a stage's masks for clinical review in the MONAI Label layout (DESIGN section 5).

``DIR/images/<id>.nii.gz``           the source image, NIfTI, source grid, fresh header (no patient text)
``DIR/labels/original/<id>.nii.gz``  our label map, same grid and the same affine in qform and sform
``DIR/labels/final/``                empty: reviewers save approved or corrected masks here, and
                                     ``ccam train-seg --masks DIR/labels/final`` trains on them
``DIR/labels_itksnap.txt``, ``DIR/labels_slicer.ctbl``, ``DIR/labels.json``  class names and colours
``DIR/provenance.json``              stage, its record, config and checkpoint hashes, version, date

Re-exporting never touches ``labels/final``. An export whose provenance matches the stage record
is up to date and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from ccam.progress import tqdm

from ccam import __version__, artifacts
from ccam.data.cohort import Cohort
from ccam.errors import UserError
from ccam.export.labels import write_label_descriptions
from ccam.io.atomic import atomic_path, read_json, write_json
from ccam.io.hashing import sha256_file
from ccam.io.volume import Volume, read_volume, write_label_map
from ccam.stages.base import folder_of

log = logging.getLogger("ccam")

# stage -> (folder of its record, folder of its <id>.nii.gz masks, folders whose checkpoints made them), relative to W
EXPORTABLE = {
    name: (folder_of(name), str(artifacts.mask_dir(Path(), name)), tuple(folder_of(m) for m in artifacts.MODELS_BEHIND[name]))
    for name in artifacts.MASKS
}
ALIASES = {"coarse": "sample", "coarse_masks": "sample", "pseudo": "pseudo-masks", "pseudo_masks": "pseudo-masks",
           "refined": "refine", "refined_masks": "refine", "predicted": "predict", "predictions": "predict"}


def _sha(path: Path) -> str:
    return sha256_file(path)


def write_image(path: Path, vol: Volume) -> Path:
    """The image on its own grid as NIfTI: voxels and dtype unchanged, affine in qform and sform, no text fields."""
    img = nib.Nifti1Image(np.asarray(vol.array), vol.affine)
    img.set_qform(vol.affine, code=int(vol.qform_code) or 1)
    img.set_sform(vol.affine, code=int(vol.sform_code) or 1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))
    return path


def resolve_stage(stage: str) -> str:
    name = ALIASES.get(stage, stage)
    if name not in EXPORTABLE:
        raise UserError(f"stage '{stage}' has no masks to export", fix=f"choose one of: {', '.join(EXPORTABLE)}")
    return name


def stage_masks(workdir: Path, stage: str) -> tuple[str, Path, dict]:
    """(stage name, folder of its ``<id>.nii.gz`` masks, its record); UserError when it has none."""
    workdir = Path(workdir)
    name = resolve_stage(stage)
    rec_folder, mask_folder, _ = EXPORTABLE[name]
    rec_path = workdir / rec_folder / "_stage.json"
    if not rec_path.exists():
        raise UserError(f"stage '{name}' has not finished in this work directory", path=str(workdir),
                        fix=f"run `ccam {name} --workdir {workdir}` (or `ccam run`) first")
    try:
        record = json.loads(rec_path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        raise UserError("the stage record is unreadable", path=str(rec_path), fix=f"re-run `ccam {name} --workdir {workdir}`")
    if (record.get("outputs") or {}).get("enabled", True) is False:
        raise UserError(f"stage '{name}' is disabled in this run, so it wrote no masks", path=str(rec_path),
                        fix="use pseudo-masks instead, or enable it (--set refine.enabled=true) and re-run")
    return name, workdir / mask_folder, record


def case_image_and_mask(workdir: Path, name: str, cohort: Cohort, mask_file: Path) -> tuple[str, Volume, Volume]:
    """(case id, image, mask) of one ``<id>.nii.gz`` mask of stage ``name``; UserError when the mask is off the image's grid."""
    cid = mask_file.name[:-7]
    case = cohort.case(cid)
    image = read_volume(case.image_path, case=cid)
    mask = read_volume(mask_file, case=cid)
    if tuple(mask.array.shape) != tuple(image.array.shape) or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise UserError(f"mask is not on the image's grid (shape {mask.array.shape} vs {image.array.shape})", case=cid,
                        path=str(mask_file), fix=f"re-run `ccam {name} --workdir {workdir}`")
    return cid, image, mask


def export_review(workdir: Path, stage: str, out: Path) -> dict:
    """Export ``stage``'s masks of the run in ``workdir`` to ``out``; returns the provenance record."""
    workdir, out = Path(workdir), Path(out)
    name, _, record = stage_masks(workdir, stage)
    rec_folder, mask_folder, ckpt_folders = EXPORTABLE[name]
    rec_path = workdir / rec_folder / "_stage.json"
    record_sha = hashlib.sha256(rec_path.read_bytes()).hexdigest()
    prov_path = out / "provenance.json"
    if prov_path.exists():
        old = read_json(prov_path, {})
        if old.get("stage_record", {}).get("sha256") == record_sha and all(
                (out / "images" / f"{c}.nii.gz").exists() and (out / "labels" / "original" / f"{c}.nii.gz").exists()
                for c in old.get("cases", [])):
            log.info("export: %s is up to date (%s), skipped", out, name)
            return old
    else:
        old = {}

    cohort = Cohort(workdir)
    ids = {c.id for c in cohort.cases}
    files = sorted((workdir / mask_folder).glob("*.nii.gz"))
    cases = [f for f in files if f.name[:-7] in ids]
    if len(cases) < len(files):
        log.warning("export: %d file(s) in %s are not cases of the cohort and are left out", len(files) - len(cases), mask_folder)
    if not cases:
        raise UserError(f"stage '{name}' wrote no masks", path=str(workdir / mask_folder), fix=f"re-run `ccam {name} --workdir {workdir}`")
    try:
        for sub in ("images", "labels/original", "labels/final"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the export folder ({e.strerror})", path=str(out), fix="choose a writable --out")

    written = {}
    for f in tqdm(cases, desc=f"export {name}", unit="case", dynamic_ncols=True):
        cid, image, mask = case_image_and_mask(workdir, name, cohort, f)
        img_out = write_image(out / "images" / f"{cid}.nii.gz", image)
        lab_out = write_label_map(out / "labels" / "original" / f"{cid}.nii.gz", np.asarray(mask.array), image.affine,
                                  n_labels=cohort.num_classes, qform_code=image.qform_code, sform_code=image.sform_code)
        written[cid] = {"image": _sha(img_out), "label": _sha(lab_out)}
        del image, mask
    for cid in set(old.get("cases", [])) - set(written):  # cases of an earlier export that this stage no longer has
        (out / "images" / f"{cid}.nii.gz").unlink(missing_ok=True)
        (out / "labels" / "original" / f"{cid}.nii.gz").unlink(missing_ok=True)
    descriptions = write_label_descriptions(out, cohort.classes)

    config_path = workdir / "config.yaml"
    checkpoints = {}
    for folder in ckpt_folders:
        for p in sorted((workdir / folder).glob("*.pt")) if (workdir / folder / "_stage.json").exists() else []:
            if p.name != "checkpoint_last.pt":  # the resume state; best/final are the weights that were used
                checkpoints[f"{folder}/{p.name}"] = _sha(p)
    provenance = {
        "tool": "ccam", "version": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "stage": name, "mask_folder": mask_folder, "workdir": str(workdir.resolve()),
        "stage_record": {"sha256": record_sha, "key": record.get("key"), "finished": record.get("finished"),
                         "code_version": record.get("code_version")},
        "config_sha256": _sha(config_path) if config_path.exists() else None,
        "checkpoints": checkpoints, "classes": cohort.classes, "label_files": descriptions,
        "layout": {"images": "images/<id>.nii.gz", "machine_masks": "labels/original/<id>.nii.gz",
                   "reviewed_masks": "labels/final/<id>.nii.gz (save approved or corrected masks here; "
                                     f"train on them with `ccam train-seg --workdir {workdir} --masks {out / 'labels' / 'final'}`)"},
        "cases": sorted(written), "files": written,
    }
    write_json(prov_path, provenance)  # last: its presence marks a complete export
    first = sorted(written)[0]
    log.info("export: %d case(s) of %s in %s; view one with: itksnap -g %s -s %s -l %s", len(written), name, out,
             out / "images" / f"{first}.nii.gz", out / "labels" / "original" / f"{first}.nii.gz", out / descriptions["itksnap"])
    return provenance

"""nnU-Net v2 raw dataset of the reviewed masks, so a user can train nnU-Net on them next.

``out/DatasetNNN_Name/imagesTr/<case>_0000.nii.gz``  the source image (one channel), source grid
``out/DatasetNNN_Name/labelsTr/<case>.nii.gz``       the reviewed label map, same grid, labels 0..K
``out/DatasetNNN_Name/dataset.json``                 channel_names, labels, numTraining, file_ending

Reviewed: accepted and undecided cases bring the stage's mask, edited cases the mask in
labels/final, rejected cases are left out (`ccam.review.decisions.reviewed_mask_files`). By
default the train and val cases go in (every case for `predict`, whose masks are the test
cases'); then ``nnUNetv2_plan_and_preprocess -d NNN`` with ``nnUNet_raw=out``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np
from ccam.progress import tqdm

from ccam import __version__
from ccam.data.cohort import Cohort
from ccam.errors import UserError
from ccam.export.review import resolve_stage, write_image
from ccam.io.atomic import write_json
from ccam.io.volume import read_volume, write_label_map

log = logging.getLogger("ccam")
NAME = re.compile(r"^[A-Za-z0-9_]+$")


def dataset_folder(out: Path, dataset_id: int, name: str) -> Path:
    if not 1 <= int(dataset_id) <= 999:
        raise UserError(f"nnU-Net dataset id {dataset_id} is out of range", fix="choose an id from 1 to 999 (nnU-Net reserves 001-010 for MSD tasks)")
    if not NAME.match(name or ""):
        raise UserError(f"nnU-Net dataset name '{name}' may hold only letters, digits and _", fix="e.g. --name AbdomenCCAM")
    return Path(out) / f"Dataset{int(dataset_id):03d}_{name}"


def export_nnunet(workdir: Path, stage: str, out: Path, dataset_id: int, name: str, *,
                  splits: Optional[tuple[str, ...]] = None, final_dir: Optional[Path] = None) -> dict:
    """Write the nnU-Net v2 raw dataset of ``stage``'s reviewed masks under ``out``; returns dataset.json."""
    from ccam.review.decisions import reviewed_mask_files

    workdir = Path(workdir)
    stage = resolve_stage(stage)
    folder = dataset_folder(out, dataset_id, name)
    cohort = Cohort(workdir)
    if splits is None:
        splits = ("train", "val", "test") if stage == "predict" else ("train", "val")
    cases = [(cid, f, origin) for cid, f, origin in reviewed_mask_files(workdir, stage, final_dir)
             if cohort.case(cid).split in splits]
    if not cases:
        raise UserError(f"no reviewed masks of {stage} for the {'/'.join(splits)} cases", path=str(workdir),
                        fix="review fewer rejections, or export another stage")
    try:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the dataset folder ({e.strerror})", path=str(folder), fix="choose a writable --out")
    old = folder / "dataset.json"
    previous = []
    if old.exists():
        try:
            previous = json.loads(old.read_text()).get("ccam", {}).get("cases", [])
        except (json.JSONDecodeError, OSError, AttributeError):
            previous = []
    origins = {}
    for cid, mask_path, origin in tqdm(cases, desc=f"nnU-Net {folder.name}", unit="case", dynamic_ncols=True):
        case = cohort.case(cid)
        image = read_volume(case.image_path, case=cid)
        mask = read_volume(mask_path, case=cid)
        if tuple(mask.array.shape) != tuple(image.array.shape) or not np.allclose(mask.affine, image.affine, atol=1e-3):
            raise UserError("mask is not on the image's grid", case=cid, path=str(mask_path),
                            fix="save the mask on the image's grid (same shape and affine)")
        labels = np.asarray(mask.array)
        if labels.min() < 0 or labels.max() > cohort.num_classes:
            raise UserError(f"mask has labels {int(labels.min())}..{int(labels.max())}, expected 0..{cohort.num_classes}",
                            case=cid, path=str(mask_path), fix="use 0 for background and k for the k-th class")
        write_image(folder / "imagesTr" / f"{cid}_0000.nii.gz", image)
        write_label_map(folder / "labelsTr" / f"{cid}.nii.gz", labels.astype(np.int64), image.affine,
                        n_labels=cohort.num_classes, qform_code=image.qform_code, sform_code=image.sform_code)
        origins[cid] = origin
        del image, mask
    for cid in set(previous) - set(origins):  # cases of an earlier export now rejected or gone
        (folder / "imagesTr" / f"{cid}_0000.nii.gz").unlink(missing_ok=True)
        (folder / "labelsTr" / f"{cid}.nii.gz").unlink(missing_ok=True)
    dataset = {
        "name": name,
        "description": f"ccam {stage} masks after clinician review ({sum(o == 'edited' for o in origins.values())} edited)",
        "channel_names": {"0": "CT" if cohort.modality.upper() == "CT" else "MRI"},  # "CT" selects nnU-Net's CT normalisation
        "labels": {"background": 0, **{c: k for k, c in enumerate(cohort.classes, start=1)}},
        "numTraining": len(origins),
        "file_ending": ".nii.gz",
        "reference": f"ccam {__version__}, work directory {workdir.resolve()}",
        "ccam": {"stage": stage, "splits": list(splits), "cases": sorted(origins), "mask_origin": origins},
    }
    write_json(folder / "dataset.json", dataset)  # last: its presence marks a complete dataset
    log.info("export: nnU-Net dataset %s with %d case(s); train with nnUNet_raw=%s nnUNetv2_plan_and_preprocess -d %d",
             folder, len(origins), Path(out).resolve(), int(dataset_id))
    return dataset

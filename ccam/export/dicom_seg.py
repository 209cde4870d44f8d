"""DICOM-SEG (highdicom) of a label map whose image is a DICOM series.

One segment per class, named after the class, with a SNOMED CT coded property type where one is
known (liver, kidney with its laterality as a type modifier, spleen, prostate, ...), referencing
the source series (same study, frame of reference and per-frame source images). The label map
must lie on the series' grid as `ccam.io.volume.read_volume` reads it; frames are taken through
world coordinates, so any voxel order of the NIfTI mask maps onto the DICOM rows and columns.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ccam import __version__
from ccam.errors import UserError
from ccam.export.labels import class_colours
from ccam.io.atomic import atomic_path

log = logging.getLogger("ccam")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# class name (lower case, side removed) -> SNOMED CT (code, meaning) of the segmented property type
ANATOMY = {
    "liver": ("10200004", "Liver"), "kidney": ("64033007", "Kidney"), "spleen": ("78961009", "Spleen"),
    "prostate": ("41216001", "Prostate"), "pancreas": ("15776009", "Pancreas"), "gallbladder": ("28231008", "Gallbladder"),
    "stomach": ("69695003", "Stomach"), "aorta": ("15825003", "Aorta"), "heart": ("80891009", "Heart"),
    "lung": ("39607008", "Lung"), "bladder": ("89837001", "Urinary bladder"), "urinary_bladder": ("89837001", "Urinary bladder"),
    "adrenal_gland": ("23451007", "Adrenal gland"), "adrenal": ("23451007", "Adrenal gland"), "bone": ("272673000", "Bone"),
    "brain": ("12738006", "Brain"), "esophagus": ("32849002", "Esophagus"), "duodenum": ("38848004", "Duodenum"),
    "femur": ("71341001", "Femur"), "breast": ("76752008", "Breast"), "uterus": ("35039007", "Uterus"),
}
ALTERED = {"tumor": ("108369006", "Neoplasm"), "tumour": ("108369006", "Neoplasm"), "lesion": ("52988006", "Lesion")}
SIDES = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}


def coded_term(name: str) -> tuple[tuple[str, str, str], tuple[str, str], Optional[tuple[str, str]]]:
    """(category code, type code, laterality modifier or None) for a class name; generic tissue when unknown."""
    n = name.lower().replace("-", "_").replace(" ", "_")
    side = None
    for s in ("left", "right"):
        for pre in (f"{s}_", s[0] + "_"):
            if n.startswith(pre):
                n, side = n[len(pre):], s
        for suf in (f"_{s}", "_" + s[0]):
            if n.endswith(suf):
                n, side = n[: -len(suf)], s
    if n in ALTERED:
        return ("49755003", "SCT", "Morphologically Altered Structure"), ALTERED[n], SIDES.get(side)
    if n in ANATOMY:
        return ("91723000", "SCT", "Anatomical Structure"), ANATOMY[n], SIDES.get(side)
    return ("85756007", "SCT", "Tissue"), ("85756007", "Tissue"), SIDES.get(side)


def series_files(folder: Path) -> list[str]:
    """The files of the DICOM series in ``folder`` in the order SimpleITK (so `read_volume`) stacks them."""
    import SimpleITK as sitk

    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    if not files:
        raise UserError("folder holds no DICOM series", path=str(folder), fix="point to the folder of the case's DICOM series")
    return files


def frames_from_labels(datasets: list, labels: np.ndarray, affine: np.ndarray, case: Optional[str] = None) -> np.ndarray:
    """(F, rows, cols) labels of each source frame, sampled from ``labels`` (I, J, K) on its RAS ``affine``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=labels.dtype)
    for f, ds in enumerate(datasets):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing (between rows), column spacing
        rows, cols = np.mgrid[0:int(ds.Rows), 0:int(ds.Columns)]
        # DICOM: point(r, c) = IPP + c * dc * row_cosine + r * dr * column_cosine (LPS)
        lps = ipp[:, None, None] + iop[:3, None, None] * cols * dc + iop[3:, None, None] * rows * dr
        ras = _LPS_TO_RAS[:3, :3] @ lps.reshape(3, -1)
        ijk = inv[:3, :3] @ ras + inv[:3, 3:4]
        idx = np.rint(ijk).astype(np.int64)
        if np.abs(ijk - idx).max() > 0.05 or (idx < 0).any() or (idx >= np.array(labels.shape)[:, None]).any():
            raise UserError(f"mask is not on the DICOM series' grid (frame {f + 1} falls outside or between its voxels)",
                            case=case, fix="write the mask on the series' own grid (as `ccam` reads the series)")
        out[f] = labels[idx[0], idx[1], idx[2]].reshape(int(ds.Rows), int(ds.Columns))
    return out


def write_dicom_seg(series_dir: Path, labels: np.ndarray, affine: np.ndarray, classes: list[str], path: Path, *,
                    case: Optional[str] = None, series_number: int = 300, description: str = "ccam segmentation") -> Path:
    """Write a DICOM-SEG of ``labels`` (I, J, K) in 0..K on the grid of the DICOM series in ``series_dir``. Atomic."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.coding import Code

    files = series_files(Path(series_dir))
    try:
        datasets = [pydicom.dcmread(f) for f in files]
    except Exception as e:
        raise UserError(f"cannot read the DICOM series ({e})", case=case, path=str(series_dir), fix="check the series is complete")
    labels = np.asarray(labels)
    if labels.max(initial=0) > len(classes) or labels.min(initial=0) < 0:
        raise UserError(f"mask has labels up to {int(labels.max())}, {len(classes)} classes expected", case=case,
                        fix="use 0 for background and k for the k-th class")
    frames = frames_from_labels(datasets, labels, affine, case).astype(np.uint8 if len(classes) < 256 else np.uint16)
    algorithm = hd.AlgorithmIdentificationSequence(name="ccam", version=__version__,
                                                   family=Code("123110", "DCM", "Artificial Intelligence"))
    descriptions = []
    for k, (name, rgb) in enumerate(zip(classes, class_colours(classes)), start=1):
        (cat, cat_scheme, cat_meaning), (code, meaning), side = coded_term(name)
        desc = hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64],
            segmented_property_category=Code(cat, cat_scheme, cat_meaning),
            segmented_property_type=Code(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{case or 'case'}:{name}",
            display_color=hd.color.CIELabColor.from_rgb(*rgb))
        if side is not None:
            mod = hd.sr.CodedConcept(side[0], "SCT", side[1])
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [mod]
        descriptions.append(desc)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ccam", manufacturer_model_name="ccam C-CAM",
            software_versions=__version__, device_serial_number="none", series_description=description[:64],
            omit_empty_frames=True)
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"cannot build a DICOM-SEG from this series ({e})", case=case, path=str(series_dir),
                        fix="check the series has patient, study and frame-of-reference attributes")
    path = Path(path)
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(str(tmp))
    return path


def read_dicom_seg(path: Path, series_dir: Path) -> tuple[np.ndarray, list[dict]]:
    """Re-read a DICOM-SEG on its source series: (F, rows, cols) label frames in the series' file order and
    its segments [{"number", "label", "type", "modifier"}] (highdicom + pydicom)."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(path))
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(Path(series_dir))]
    uids = [ds.SOPInstanceUID for ds in datasets]
    numbers = list(seg.segment_numbers)
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                            combine_segments=True, relabel=False,
                                            assert_missing_frames_are_empty=True)
    segments = []
    for item in seg.SegmentSequence:
        t = item.SegmentedPropertyTypeCodeSequence[0]
        mods = getattr(t, "SegmentedPropertyTypeModifierCodeSequence", [])
        segments.append({"number": int(item.SegmentNumber), "label": str(item.SegmentLabel), "type": str(t.CodeMeaning),
                         "type_code": str(t.CodeValue), "modifier": str(mods[0].CodeMeaning) if len(mods) else None})
    return np.asarray(arr), segments


def export_dicom_seg(workdir: Path, stage: str, out: Path, final_dir: Optional[Path] = None) -> dict[str, str]:
    """DICOM-SEG of the reviewed masks of every case whose image is a DICOM series: ``out/<id>.dcm``.

    Returns {case id: file}; UserError when no case of the cohort comes from a DICOM series."""
    from ccam.data.cohort import Cohort
    from ccam.io.volume import read_volume
    from ccam.review.decisions import reviewed_mask_files

    workdir, out = Path(workdir), Path(out)
    cohort = Cohort(workdir)
    written, skipped = {}, []
    for cid, mask_path, origin in reviewed_mask_files(workdir, stage, final_dir):
        case = cohort.case(cid)
        if not Path(case.image_path).is_dir():
            skipped.append(cid)
            continue
        mask = read_volume(mask_path, case=cid)
        written[cid] = str(write_dicom_seg(Path(case.image_path), np.asarray(mask.array), mask.affine, cohort.classes,
                                           out / f"{cid}.dcm", case=cid,
                                           description=f"ccam {stage}{' (edited)' if origin == 'edited' else ''}"))
    if not written:
        raise UserError("no case of this cohort has a DICOM series as its image, so there is nothing to write as DICOM-SEG",
                        path=str(workdir), fix="use --format monai, nnunet or seg.nrrd for NIfTI/MHA/NRRD sources")
    if skipped:
        log.info("export: DICOM-SEG skipped %d case(s) whose image is not a DICOM series: %s", len(skipped), ", ".join(skipped))
    log.info("export: %d DICOM-SEG file(s) in %s", len(written), out)
    return written

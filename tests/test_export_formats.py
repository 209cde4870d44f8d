"""Export formats clinics use: 3D Slicer .seg.nrrd, an nnU-Net v2 raw dataset of the reviewed
masks, and DICOM-SEG for cases whose image is a DICOM series; each is read back and checked
voxel for voxel against the NIfTI masks."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ccam.data.cohort import Cohort
from ccam.errors import UserError
from ccam.io.atomic import write_json
from ccam.io.volume import read_volume, write_label_map
from ccam.review.decisions import record_decisions


def write_stage(work: Path, masks: dict[str, np.ndarray], affines: dict[str, np.ndarray]) -> None:
    for cid, m in masks.items():
        write_label_map(work / "pseudo_masks" / f"{cid}.nii.gz", m, affines[cid], n_labels=4)
    write_json(work / "pseudo_masks" / "_stage.json", {"stage": "pseudo-masks", "key": "k1", "finished": "t1", "outputs": {}})


@pytest.fixture
def work(prepared) -> Path:
    """A prepared 8-case run whose pseudo-masks are the phantom's ground truth (a stand-in for a stage's output)."""
    w = prepared(32)
    co = Cohort(w)
    gts = {c.id: read_volume(c.mask_path) for c in co.cases}
    write_stage(w, {c: np.asarray(v.array) for c, v in gts.items()}, {c: v.affine for c, v in gts.items()})
    return w


def test_seg_nrrd_round_trip(work, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    from ccam.export.labels import class_colours
    from ccam.export.seg_nrrd import export_seg_nrrd, read_seg_nrrd

    co = Cohort(work)
    written = export_seg_nrrd(work, "pseudo-masks", tmp_path / "slicer")
    assert sorted(written) == sorted(c.id for c in co.cases)
    for cid in ("case000", "case001", "case003"):  # stored RAS, LPS, slice-first
        ref = nib.load(str(work / "pseudo_masks" / f"{cid}.nii.gz"))
        labels, affine, segments = read_seg_nrrd(Path(written[cid]))
        assert np.array_equal(labels, np.asarray(ref.dataobj)) and np.allclose(affine, ref.affine, atol=1e-4), cid
        assert [(s["name"], s["label"], s["color"]) for s in segments] == \
            [(c, k, rgb) for k, (c, rgb) in enumerate(zip(co.classes, class_colours(co.classes)), start=1)]
        # and as 3D Slicer's own reader sees it (LPS)
        seg = slicerio.read_segmentation(written[cid])
        assert [s["name"] for s in seg["segments"]] == co.classes
        assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 3, 4]
        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        assert np.allclose(lps_to_ras @ np.asarray(seg["ijkToLPS"]), ref.affine, atol=1e-4)
        assert np.array_equal(np.asarray(seg["voxels"]), np.asarray(ref.dataobj))
        kidney = next(s for s in seg["segments"] if s["name"] == "left_kidney")
        assert kidney["terminology"]["type"] == ["SCT", "64033007", "Kidney"]  # Slicer's terminology, with the side
        assert kidney["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]


def test_nnunet_dataset_of_reviewed_masks(work, tmp_path):
    from ccam.export.nnunet import export_nnunet

    co = Cohort(work)
    train_val = sorted(c.id for c in co.split("train", "val"))
    edited, rejected = train_val[0], train_val[1]
    final = tmp_path / "final"
    final.mkdir()
    ref = nib.load(str(work / "pseudo_masks" / f"{edited}.nii.gz"))
    edit = np.asarray(ref.dataobj).copy()
    edit[edit == 4] = 0  # the reviewer removed the spleen
    write_label_map(final / f"{edited}.nii.gz", edit, ref.affine, n_labels=4)
    record_decisions(work, {edited: {"decision": "edit"}, rejected: {"decision": "reject"}}, source="test", final_dir=final)

    out = tmp_path / "nnUNet_raw"
    ds = export_nnunet(work, "pseudo-masks", out, 7, "AbdomenCCAM")
    root = out / "Dataset007_AbdomenCCAM"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta == ds
    # what nnU-Net v2 expects: channel names, labels contiguous from 0, numTraining, file ending, CASE_0000 images
    assert meta["channel_names"] == {"0": "MRI"} and meta["file_ending"] == ".nii.gz"
    assert list(meta["labels"].values()) == list(range(len(co.classes) + 1)) and meta["labels"]["background"] == 0
    images = sorted(p.name for p in (root / "imagesTr").iterdir())
    labels = sorted(p.name for p in (root / "labelsTr").iterdir())
    assert all(re.fullmatch(r".+_0000\.nii\.gz", n) for n in images)
    ids = [n[: -len("_0000.nii.gz")] for n in images]
    assert [f"{i}.nii.gz" for i in ids] == labels and meta["numTraining"] == len(ids)
    assert ids == [c for c in train_val if c != rejected]  # no test case, no rejected case
    for cid in ids:
        img = nib.load(str(root / "imagesTr" / f"{cid}_0000.nii.gz"))
        lab = nib.load(str(root / "labelsTr" / f"{cid}.nii.gz"))
        src = nib.load(co.case(cid).image_path)
        assert img.shape == lab.shape == src.shape and np.allclose(img.affine, lab.affine) and np.allclose(lab.affine, src.affine)
        assert np.array_equal(np.asarray(img.dataobj), np.asarray(src.dataobj))
        values = set(np.unique(np.asarray(lab.dataobj)).tolist())
        assert values <= set(meta["labels"].values()) and np.issubdtype(lab.get_data_dtype(), np.integer)
        want = edit if cid == edited else np.asarray(nib.load(str(work / "pseudo_masks" / f"{cid}.nii.gz")).dataobj)
        assert np.array_equal(np.asarray(lab.dataobj), want), cid
    assert meta["ccam"]["mask_origin"][edited] == "edited"
    # a later rejection removes the case from a re-export
    record_decisions(work, {ids[-1]: {"decision": "reject"}}, source="test")
    export_nnunet(work, "pseudo-masks", out, 7, "AbdomenCCAM")
    assert not (root / "imagesTr" / f"{ids[-1]}_0000.nii.gz").exists() and not (root / "labelsTr" / f"{ids[-1]}.nii.gz").exists()
    with pytest.raises(UserError, match="dataset id 1000"):
        export_nnunet(work, "pseudo-masks", out, 1000, "X")
    with pytest.raises(UserError, match="letters, digits"):
        export_nnunet(work, "pseudo-masks", out, 8, "bad name")


def write_dicom_series(array: np.ndarray, affine: np.ndarray, folder: Path, modality: str = "MR") -> str:
    """One DICOM file per k-slice of ``array`` (I, J, K) int16 on the RAS ``affine``; returns the series UID.

    Column c of a frame is voxel axis i, row r is axis j (DICOM: point = IPP + c*dc*row_cosine + r*dr*col_cosine)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = list(lps[:3, 0] / dc) + list(lps[:3, 1] / dr)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(array.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PH0001", "19700101", "O"
        ds.StudyDate = ds.SeriesDate = datetime.date.today().strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = modality, 1, k + 1, "ccam-test"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(dr), float(dc)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(array[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(str(folder / f"{k:03d}.dcm"), enforce_file_format=True)
    return series


def test_dicom_seg_round_trip(phantom_manifest, cli, tmp_path):
    """A cohort whose case000 is a DICOM series: prepare -> masks -> DICOM-SEG -> highdicom/pydicom re-read."""
    import highdicom as hd
    import pydicom

    from ccam.export.dicom_seg import export_dicom_seg, read_dicom_seg

    data = tmp_path / "data"
    shutil.copytree(Path(phantom_manifest).parent, data)
    src = nib.load(str(data / "images" / "case000.nii.gz"))  # stored RAS
    image = np.rint(np.asarray(src.dataobj, dtype=np.float32)).astype(np.int16)
    uid = write_dicom_series(image, src.affine, data / "dicom" / "case000")
    work = tmp_path / "w"
    rc, _, err = cli("prepare", "--manifest", data / "manifest.json", "--workdir", work, "--set", "data.slice_size=32")
    assert rc == 0, err
    # the prepared case000 now comes from its DICOM series (same grid). Set in cases.json rather than in the
    # manifest: `read_header` of a DICOM folder returns the voxels instead of the shape (see the report)
    meta = json.loads((work / "prepare" / "cases.json").read_text())
    meta["cases"][0]["image"] = str(data / "dicom" / "case000")
    (work / "prepare" / "cases.json").write_text(json.dumps(meta))
    co = Cohort(work)
    case = co.case("case000")
    grid = read_volume(case.image_path)
    assert np.array_equal(grid.array.astype(np.int16), image) and np.allclose(grid.affine, src.affine, atol=1e-3)
    gt = np.asarray(nib.load(str(data / "masks" / "case000.nii.gz")).dataobj).astype(np.uint8)
    write_stage(work, {"case000": gt, "case001": np.asarray(read_volume(co.case("case001").mask_path).array)},
                {"case000": grid.affine, "case001": read_volume(co.case("case001").mask_path).affine})

    written = export_dicom_seg(work, "pseudo-masks", tmp_path / "seg")
    assert list(written) == ["case000"]  # case001 is NIfTI: no DICOM-SEG
    frames, segments = read_dicom_seg(Path(written["case000"]), data / "dicom" / "case000")
    # voxel for voxel against the NIfTI mask on the source grid: frame k, row j, column i
    assert frames.shape == (gt.shape[2], gt.shape[1], gt.shape[0])
    assert np.array_equal(frames, gt.transpose(2, 1, 0))
    assert [s["label"] for s in segments] == co.classes
    assert [(s["type"], s["modifier"]) for s in segments] == [("Liver", None), ("Kidney", "Right"), ("Kidney", "Left"),
                                                               ("Spleen", None)]
    seg = pydicom.dcmread(written["case000"])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == pydicom.dcmread(data / "dicom" / "case000" / "000.dcm").StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert seg.PatientID == "PH0001"
    assert isinstance(hd.seg.segread(written["case000"]), hd.seg.Segmentation)
    # a mask on another grid is a one-line user error
    write_stage(work, {"case000": gt[:, :, :-1]}, {"case000": grid.affine})
    with pytest.raises(UserError, match="case case000: .*grid"):
        export_dicom_seg(work, "pseudo-masks", tmp_path / "seg2")


def _export_has_format() -> bool:
    import ccam.cli

    ccam.cli._register_stage_commands()
    cmd = ccam.cli.cli.commands.get("export")
    return cmd is not None and any("--format" in p.opts for p in cmd.params)


@pytest.mark.skipif(not _export_has_format(), reason="`ccam export` has no --format option yet (see the integration "
                                                     "note: ccam/commands/export.py calls ccam.export.nnunet/seg_nrrd/dicom_seg)")
def test_export_formats_through_the_cli(work, cli, tmp_path):
    rc, _, err = cli("export", "--workdir", work, "--stage", "pseudo-masks", "--format", "nnunet", "--dataset-id", "12",
                     "--name", "Phantom", "--out", tmp_path / "raw")
    assert rc == 0, err
    assert json.loads((tmp_path / "raw" / "Dataset012_Phantom" / "dataset.json").read_text())["numTraining"] == 7
    rc, _, err = cli("export", "--workdir", work, "--stage", "pseudo", "--format", "seg.nrrd", "--out", tmp_path / "slicer")
    assert rc == 0 and len(list((tmp_path / "slicer").glob("*.seg.nrrd"))) == 8, err
    rc, _, err = cli("export", "--workdir", work, "--stage", "pseudo-masks", "--format", "dicom-seg", "--out", tmp_path / "dcm")
    assert rc == 2 and "no case of this cohort has a DICOM series" in err and "Traceback" not in err
    rc, _, err = cli("export", "--workdir", work, "--stage", "pseudo-masks", "--format", "nnunet", "--name", "bad name",
                     "--out", tmp_path / "raw")
    assert rc == 2 and "letters, digits" in err

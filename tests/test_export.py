"""`ccam export`: MONAI Label layout, alignment of labels/original/X on images/X for an asymmetric
phantom stored RAS, LPS and slice-first, viewer label files, provenance, re-export, and the loop
back into `train-seg --masks DIR/labels/final`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ccam.data.cohort import Cohort
from ccam.io.atomic import save_npy, write_json
from ccam.io.volume import read_volume, write_label_map

CASES = {"case000": "RAS", "case001": "LPS", "case003": "SLICE_FIRST"}  # the phantom cohort's storage cycle


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def work(tmp_path, phantom_manifest, cli) -> Path:
    """A prepared run whose `pseudo-masks` stage folder holds masks for three cases.

    The masks are the phantom's ground truth (a stand-in for any stage's output: only the export
    is under test), written as the stages write them. case000's image carries a patient name."""
    data = tmp_path / "data"
    shutil.copytree(Path(phantom_manifest).parent, data)
    img = nib.load(str(data / "images" / "case000.nii.gz"))
    img.header["descrip"] = b"Doe^John 1970"
    nib.save(img, str(data / "images" / "case000.nii.gz"))
    w = tmp_path / "w"
    rc, _, err = cli("prepare", "--manifest", data / "manifest.json", "--workdir", w, "--set", "data.slice_size=32")
    assert rc == 0, err
    co = Cohort(w)
    for cid in CASES:
        c = co.case(cid)
        gt = read_volume(c.mask_path)
        write_label_map(w / "pseudo_masks" / f"{cid}.nii.gz", gt.array, c.geometry.affine_array, n_labels=4)
    write_json(w / "pseudo_masks" / "_stage.json", {"stage": "pseudo-masks", "key": "k1", "finished": "t1", "outputs": {}})
    return w


def _world_centroid(img: nib.Nifti1Image, mask: np.ndarray, label: int) -> np.ndarray:
    ijk = np.argwhere(mask == label)
    return nib.affines.apply_affine(img.affine, ijk).mean(0)


def test_export_layout_and_alignment(work, cli, tmp_path):
    out = tmp_path / "review"
    rc, _, err = cli("export", "--workdir", work, "--stage", "pseudo-masks", "--out", out)
    assert rc == 0, err
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{c}.nii.gz" for c in sorted(CASES)]
    assert sorted(p.name for p in (out / "labels" / "original").iterdir()) == [f"{c}.nii.gz" for c in sorted(CASES)]
    assert (out / "labels" / "final").is_dir() and not any((out / "labels" / "final").iterdir())
    co = Cohort(work)
    classes = co.classes
    for cid, storage in CASES.items():
        src = nib.load(co.case(cid).image_path)
        img = nib.load(str(out / "images" / f"{cid}.nii.gz"))
        lab = nib.load(str(out / "labels" / "original" / f"{cid}.nii.gz"))
        # same grid, same affine, in qform and sform of both files
        assert img.shape == lab.shape == src.shape, cid
        for f in (img, lab):
            assert np.allclose(f.affine, src.affine, atol=1e-5) and np.allclose(f.get_qform(), f.get_sform(), atol=1e-5), cid
            assert int(f.header["qform_code"]) > 0 and int(f.header["sform_code"]) > 0
        assert img.get_data_dtype() == src.get_data_dtype() and np.array_equal(np.asarray(img.dataobj), np.asarray(src.dataobj))
        mask = np.asarray(lab.dataobj)
        assert lab.get_data_dtype() == np.uint8
        assert np.array_equal(mask, np.asarray(nib.load(co.case(cid).mask_path).dataobj)), cid
        # the phantom is asymmetric: in RAS world space (+x = patient's right) the liver and right
        # kidney lie at +x, the spleen and left kidney at -x, whatever the storage order
        x = {name: _world_centroid(lab, mask, k)[0] for k, name in enumerate(classes, start=1)}
        assert x["liver"] > 20 and x["right_kidney"] > 20, (cid, storage, x)
        assert x["spleen"] < -20 and x["left_kidney"] < -20, (cid, storage, x)
        # the mask sits on the organ in the image: one tissue, far less spread than the rest (air, fat, bone)
        arr = np.asarray(img.dataobj, dtype=np.float32)
        assert abs(arr[mask == 1].std()) < arr[mask == 0].std(), cid
    assert nib.load(str(out / "images" / "case000.nii.gz")).header["descrip"].tobytes().strip(b"\x00") == b""

    itk = [line for line in (out / "labels_itksnap.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(itk) == len(classes) + 1
    for k, line in enumerate(itk):
        parts = line.split()
        assert int(parts[0]) == k and len(parts) >= 8
        assert line.split('"')[1] == (["Clear Label"] + classes)[k]
    ctbl = [line.split() for line in (out / "labels_slicer.ctbl").read_text().splitlines() if not line.startswith("#")]
    assert [(int(p[0]), p[1]) for p in ctbl] == list(enumerate(["background"] + classes))
    assert all(len(p) == 6 and all(0 <= int(v) <= 255 for v in p[2:]) for p in ctbl)
    assert len({tuple(p[2:5]) for p in ctbl}) == len(ctbl)  # every class its own colour
    lj = json.loads((out / "labels.json").read_text())
    assert lj["labels"] == {"background": 0, **{c: k for k, c in enumerate(classes, start=1)}}

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "pseudo-masks" and prov["cases"] == sorted(CASES)
    assert prov["version"] and prov["date"] and len(prov["config_sha256"]) == 64
    assert prov["stage_record"]["key"] == "k1" and len(prov["stage_record"]["sha256"]) == 64
    assert set(prov["files"]) == set(CASES)


def test_reexport_keeps_reviewed_masks_and_skips_when_current(work, cli, tmp_path):
    out = tmp_path / "review"
    assert cli("export", "--workdir", work, "--stage", "pseudo", "--out", out)[0] == 0
    rc, _, err = cli("export", "--workdir", work, "--stage", "pseudo-masks", "--out", out)
    assert rc == 0 and "up to date" in err
    shutil.copy(out / "labels" / "original" / "case001.nii.gz", out / "labels" / "final" / "case001.nii.gz")
    (work / "pseudo_masks" / "case003.nii.gz").unlink()  # the stage ran again and now has two cases
    write_json(work / "pseudo_masks" / "_stage.json", {"stage": "pseudo-masks", "key": "k2", "finished": "t2", "outputs": {}})
    rc, _, err = cli("export", "--workdir", work, "--stage", "pseudo-masks", "--out", out)
    assert rc == 0 and "up to date" not in err
    assert (out / "labels" / "final" / "case001.nii.gz").exists()  # the reviewer's work is never touched
    assert sorted(p.name for p in (out / "images").iterdir()) == ["case000.nii.gz", "case001.nii.gz"]
    assert json.loads((out / "provenance.json").read_text())["stage_record"]["key"] == "k2"


def test_export_errors(work, cli, tmp_path):
    rc, _, err = cli("export", "--workdir", work, "--stage", "refine", "--out", tmp_path / "r")
    assert rc == 2 and "has not finished" in err
    write_json(work / "refined_masks" / "_stage.json", {"stage": "refine", "outputs": {"enabled": False}})
    rc, _, err = cli("export", "--workdir", work, "--stage", "refined", "--out", tmp_path / "r")
    assert rc == 2 and "disabled" in err
    rc, _, err = cli("export", "--workdir", tmp_path / "nowhere", "--stage", "predict")
    assert rc == 2 and "not a ccam work directory" in err
    rc, _, err = cli("export", "--workdir", work, "--stage", "train-pcam")
    assert rc == 2


def test_reviewed_masks_train_the_segmenter(work, cli, tmp_path):
    out = tmp_path / "review"
    assert cli("export", "--workdir", work, "--stage", "pseudo-masks", "--out", out)[0] == 0
    co = Cohort(work)
    for c in co.cases:  # the pipeline's own masks for every case (a box), so only reviewed cases differ
        lab = np.zeros((c.n_slices, 32, 32), np.uint8)
        lab[:, 10:20, 8:16] = 1
        save_npy(work / "pseudo_masks" / "labels" / f"{c.id}.npy", lab)
    shutil.copy(out / "labels" / "original" / "case000.nii.gz", out / "labels" / "final" / "case000.nii.gz")
    rc, _, err = cli("train-seg", "--workdir", work, "--masks", out / "labels" / "final", "--set", "seg.channels=[8,16]",
                     "--set", "seg.epochs=1", "--set", "seg.augment=false")
    assert rc == 0, err
    src = json.loads((work / "seg" / "mask_sources.json").read_text())
    assert src["case000"]["source"] == "masks_dir" and src["case001"]["source"] == "pseudo_masks"

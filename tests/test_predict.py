"""`ccam predict`: the pipeline stage, new volumes (NIfTI in RAS, LPS and slice-first storage, MHA,
DICOM series, manifest), geometry round trip, --continue, --part, --probabilities, errors; and an
idempotent `run` of prepare -> train-seg -> predict -> evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ccam.cli import main as ccam_main
from ccam.config import resolve
from ccam.data.cohort import Cohort
from ccam.data.phantom import make_phantom_volume, save_nifti
from ccam.metrics import dice_per_class
from ccam.runner import run_pipeline

TRAIN = ["--set", "seg.channels=[8,16,32,64]", "--set", "seg.epochs=12", "--set", "seg.lr=0.003",
         "--set", "seg.batch_size=16", "--set", "seg.augment=false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and a busy machine cannot stall it (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_manifest) -> Path:
    """A work dir with `prepare` (S = 32) and `train-seg` done, trained on the phantom's masks as --masks."""
    w = tmp_path_factory.mktemp("trained")
    assert ccam_main(["prepare", "--manifest", str(phantom_manifest), "--workdir", str(w), "--set", "data.slice_size=32"]) == 0
    assert ccam_main(["train-seg", "--workdir", str(w), "--masks", str(Path(phantom_manifest).parent / "masks"), *TRAIN]) == 0
    return w


@pytest.fixture(scope="module")
def orientations(tmp_path_factory) -> Path:
    """One anisotropic patient stored RAS, LPS and slice-first (NIfTI), and RAS as MHA; masks beside."""
    import SimpleITK as sitk

    d = tmp_path_factory.mktemp("orient")
    (d / "in").mkdir()
    (d / "gt").mkdir()
    for o in ("RAS", "LPS", "SLICE_FIRST"):
        img, mask, aff = make_phantom_volume((60, 56, 15), spacing=(5.9, 6.3, 12.5), modality="MR", seed=11, orientation=o)
        save_nifti(img, aff, d / "in" / f"{o.lower()}.nii.gz")
        save_nifti(mask, aff, d / "gt" / f"{o.lower()}.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(d / "in" / "lps.nii.gz")), str(d / "in" / "lps_mha.mha"))
    shutil.copy(d / "gt" / "lps.nii.gz", d / "gt" / "lps_mha.nii.gz")
    return d


def _canonical(path: Path) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def test_pipeline_stage_predicts_test_cases_on_source_grid(trained, cli, phantom_manifest):
    rc, _, err = cli("predict", "--workdir", trained)
    assert rc == 0, err
    co = Cohort(trained)
    test = co.split("test")
    files = sorted(p.name for p in (trained / "predictions").glob("*.nii.gz"))
    assert files == sorted(f"{c.id}.nii.gz" for c in test)
    for c in test:
        out, src = nib.load(str(trained / "predictions" / f"{c.id}.nii.gz")), nib.load(c.image_path)
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
        assert out.get_data_dtype() == np.uint8
        assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1
        assert np.allclose(out.get_qform(), out.get_sform())
        pred = np.asarray(out.dataobj)
        assert set(np.unique(pred)) <= set(range(5)) and (pred > 0).any()
    rc, _, err = cli("predict", "--workdir", trained)
    assert rc == 0 and "up to date, skipped" in err
    # --input on the same images gives the same masks as the stage (same normalisation and slicing)
    rc, _, err = cli("predict", "--workdir", trained, "--input", phantom_manifest, "--output", trained / "again")
    assert rc == 0, err
    for c in test:
        a = np.asarray(nib.load(str(trained / "predictions" / f"{c.id}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(trained / "again" / f"{c.id}.nii.gz")).dataobj)
        assert np.array_equal(a, b)
    assert len(list((trained / "again").glob("*.nii.gz"))) == len(co.cases)  # a manifest: all its cases


def test_geometry_round_trip_ras_lps_slice_first_mha(trained, orientations, cli, tmp_path):
    out = tmp_path / "out"
    rc, _, err = cli("predict", "--workdir", trained, "--input", orientations / "in", "--output", out)
    assert rc == 0, err
    ids = ["lps", "lps_mha", "ras", "slice_first"]
    assert sorted(p.name[:-7] for p in out.glob("*.nii.gz")) == ids
    for cid in ids:
        pred = nib.load(str(out / f"{cid}.nii.gz"))
        ref = nib.load(str(orientations / "gt" / f"{cid}.nii.gz"))
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4), cid
    assert nib.load(str(out / "slice_first.nii.gz")).shape == (15, 56, 60)
    canon = {cid: _canonical(out / f"{cid}.nii.gz") for cid in ids}
    for cid in ids[1:]:  # the same patient, whatever the storage: the same voxels in world space
        assert np.array_equal(canon[cid], canon["lps"]), cid
    gt = _canonical(orientations / "gt" / "ras.nii.gz")
    liver = dice_per_class(canon["ras"], gt, 4)[0]
    mirrored = dice_per_class(canon["ras"][::-1], gt, 4)[0]  # what a left/right error in the geometry would give
    # five training patients and 12 epochs: the Dice on this unseen patient depends on the seed (0.27-0.75 over
    # seeds 0-3), so the check is that it lands on the liver, and far better than the mirrored geometry would
    assert liver > 0.2 and liver > 2 * mirrored, f"the liver prediction is not on the liver (Dice {liver:.2f}, mirrored {mirrored:.2f})"


def test_dicom_series_input(trained, orientations, cli, tmp_path):
    import SimpleITK as sitk

    img = sitk.Cast(sitk.ReadImage(str(orientations / "in" / "ras.nii.gz")), sitk.sitkInt16)
    series = tmp_path / "dicom" / "patient1"
    series.mkdir(parents=True)
    direction = img.GetDirection()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # one series instance UID
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        row, col = direction[0::3], direction[1::3]  # directions of the x and y index axes
        sl.SetMetaData("0020|0037", "\\".join(str(v) for v in row + col))
        sl.SetMetaData("0028|0030", f"{img.GetSpacing()[1]}\\{img.GetSpacing()[0]}")
        sl.SetMetaData("0018|0050", str(img.GetSpacing()[2]))
        sl.SetMetaData("0008|0060", "MR")
        sl.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.{k + 1}")  # one SOP instance UID per slice
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # else GDCM invents a new series for every file
        writer.SetFileName(str(series / f"{k:03d}.dcm"))
        writer.Execute(sl)
    out = tmp_path / "out"
    rc, _, err = cli("predict", "--workdir", trained, "--input", series, "--output", out)
    assert rc == 0, err
    pred = nib.load(str(out / "patient1.nii.gz"))
    ref = nib.load(str(orientations / "in" / "ras.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-3)
    # the folder of series folders works too
    rc, _, err = cli("predict", "--workdir", trained, "--input", tmp_path / "dicom", "--output", tmp_path / "out2")
    assert rc == 0 and (tmp_path / "out2" / "patient1.nii.gz").exists(), err


def test_continue_part_and_probabilities(trained, orientations, cli, tmp_path):
    src = orientations / "in"
    out = tmp_path / "out"
    rc, _, err = cli("predict", "--workdir", trained, "--input", src, "--output", out, "--part", "0/2", "--probabilities")
    assert rc == 0, err
    first = sorted(p.name for p in out.glob("*.nii.gz"))
    rc, _, err = cli("predict", "--workdir", trained, "--input", src, "--output", out, "--part", "1/2", "--probabilities")
    assert rc == 0, err
    both = sorted(p.name for p in out.glob("*.nii.gz"))
    assert first == ["lps.nii.gz", "ras.nii.gz"]  # every 2nd case of the sorted ids, from the 0th
    assert both == ["lps.nii.gz", "lps_mha.nii.gz", "ras.nii.gz", "slice_first.nii.gz"]

    z = np.load(out / "slice_first.npz")
    probs, lab = z["probabilities"], np.asarray(nib.load(str(out / "slice_first.nii.gz")).dataobj)
    assert probs.dtype == np.float16 and probs.shape == (5,) + lab.shape
    assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert np.mean(probs.argmax(0) == lab) > 0.99  # float16 rounding may flip exact ties only

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "ras.nii.gz").unlink()
    rc, _, err = cli("predict", "--workdir", trained, "--input", src, "--output", out, "--continue", "--probabilities")
    assert rc == 0 and "3 already written and skipped, 1 to do" in err
    assert (out / "ras.nii.gz").exists()
    for name, t in stamps.items():
        if name != "ras.nii.gz" and name != "ras.npz":
            assert (out / name).stat().st_mtime_ns == t, name
    # asking for probabilities later: cases without their .npz are not complete
    (out / "lps.npz").unlink()
    rc, _, err = cli("predict", "--workdir", trained, "--input", src, "--output", out, "--continue", "--probabilities")
    assert rc == 0 and "1 to do" in err and (out / "lps.npz").exists()


@pytest.mark.parametrize("args, text", [
    (["--part", "2/2"], "need 0 <= i < n"),
    (["--part", "x"], "must look like i/n"),
    (["--input", "nowhere.nii.gz", "--output", "o"], "input not found"),
    (["--input", "IN"], "--input needs --output"),
    (["--output", "o"], "go with --input"),
    (["--input", "IN", "--output", "IN"], "would overwrite the input image"),
])
def test_predict_user_errors(trained, orientations, cli, tmp_path, args, text):
    args = [str(orientations / "in") if a == "IN" else a for a in args]
    if "--part" in args:
        args = ["--input", str(orientations / "in"), "--output", str(tmp_path / "o")] + args
    rc, _, err = cli("predict", "--workdir", trained, *args)
    assert rc == 2 and text in err and "Traceback" not in err


def test_predict_needs_a_trained_segmenter(prepared, orientations, cli, tmp_path):
    w = prepared(32)
    rc, _, err = cli("predict", "--workdir", w, "--input", orientations / "in", "--output", tmp_path / "o")
    assert rc == 2 and "train-seg" in err
    rc, _, err = cli("predict", "--workdir", w)
    assert rc == 2 and "train-seg" in err


def test_manifest_of_another_modality_is_refused(trained, orientations, cli, tmp_path):
    m = tmp_path / "ct.json"
    m.write_text(json.dumps({"name": "x", "modality": "CT", "classes": ["liver"],
                             "cases": [{"id": "a", "image": str(orientations / "in" / "ras.nii.gz")}]}))
    rc, _, err = cli("predict", "--workdir", trained, "--input", m, "--output", tmp_path / "o")
    assert rc == 2 and "trained on MR" in err


def test_run_is_idempotent(prepared, phantom_manifest, tmp_path, capsys):
    w = prepared(32)
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: seg\nstages: [prepare, train-seg, predict, evaluate]\n")
    cfg = resolve(w, None, ["seg.channels=[8,16]", "seg.epochs=1", "seg.augment=false", "evaluate.surface_distances=false"])
    masks = str(Path(phantom_manifest).parent / "masks")
    ran = run_pipeline(w, cfg, pipe, options={"masks": masks})
    assert ran == ["train-seg", "predict", "evaluate"]  # prepare was already done
    report = json.loads((w / "reports" / "evaluation.json").read_text())
    assert list(report["stages"]) == ["predicted"]
    assert "| predicted | test |" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in w.rglob("*") if p.is_file()}
    assert run_pipeline(w, cfg, pipe, options={"masks": masks}) == []
    assert {p: p.stat().st_mtime_ns for p in w.rglob("*") if p.is_file()} == stamps

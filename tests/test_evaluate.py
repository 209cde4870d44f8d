"""`ccam evaluate` on hand-made masks with known Dice and surface distances, the oracle tau sweep on
hand-made CAMs, stages left out when they did not run, and skip/staleness."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ccam.data.cohort import Cohort
from ccam.io.atomic import save_npy, write_json
from ccam.io.geometry import labels_from_source, scores_to_source
from ccam.metrics import dice_per_class

SHAPE = (20, 16, 12)
SPACING = (1.0, 1.5, 2.0)
ORGAN = (slice(4, 14), slice(4, 12), slice(3, 9))  # 10 x 8 x 6 voxels
OTHER = (slice(15, 18), slice(1, 4), slice(2, 5))


def _affine(lps: bool) -> np.ndarray:
    aff = np.diag(list(SPACING) + [1.0])
    if lps:  # same voxel sizes per array axis, the first two axes running the other way
        aff[0, 0], aff[1, 1] = -SPACING[0], -SPACING[1]
        aff[0, 3], aff[1, 3] = 40.0, 30.0
    return aff


def _save(arr, aff, path: Path) -> None:
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, str(path))


@pytest.fixture
def work(tmp_path, cli) -> Path:
    """Three hand-made cases (a, b: train; c: test) with box ground truth, prepared at S = 16."""
    d = tmp_path / "data"
    d.mkdir()
    gt = np.zeros(SHAPE, np.uint8)
    gt[ORGAN] = 1
    gt[OTHER] = 2
    rng = np.random.default_rng(0)
    cases = []
    for cid, lps, split in (("a", False, "train"), ("b", True, "train"), ("c", False, "test")):
        _save((rng.random(SHAPE) * 100).astype(np.float32), _affine(lps), d / f"{cid}.nii.gz")
        _save(gt, _affine(lps), d / f"{cid}_gt.nii.gz")
        cases.append({"id": cid, "image": f"{cid}.nii.gz", "mask": f"{cid}_gt.nii.gz", "split": split})
    (d / "m.json").write_text(json.dumps({"name": "boxes", "modality": "MR", "classes": ["organ", "other"],
                                          "tags_from_masks": True, "cases": cases}))
    w = tmp_path / "w"
    rc, _, err = cli("prepare", "--manifest", d / "m.json", "--workdir", w, "--set", "data.slice_size=16")
    assert rc == 0, err
    return w


def _stage(w: Path, folder: str, masks: dict, outputs: dict | None = None, sub: str = "") -> None:
    """A finished stage folder as the pipeline leaves it: masks on the source grids, then _stage.json."""
    d = w / folder / sub
    d.mkdir(parents=True, exist_ok=True)
    for cid, arr in masks.items():
        _save(arr.astype(np.uint8), _affine(cid == "b"), d / f"{cid}.nii.gz")
    write_json(w / folder / "_stage.json", {"stage": folder, "key": "hand-made", "outputs": outputs or {}})


def _gt() -> np.ndarray:
    gt = np.zeros(SHAPE, np.uint8)
    gt[ORGAN] = 1
    gt[OTHER] = 2
    return gt


def _assd(p: np.ndarray, g: np.ndarray, spacing) -> float:
    """Average symmetric surface distance, computed independently with scipy."""
    ep, eg = p & ~ndimage.binary_erosion(p), g & ~ndimage.binary_erosion(g)
    d_pg = ndimage.distance_transform_edt(~eg, sampling=spacing)[ep]
    d_gp = ndimage.distance_transform_edt(~ep, sampling=spacing)[eg]
    return float((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size))


def test_known_dice_and_surface_distances(work, cli):
    gt = _gt()
    pred_a = np.roll(gt * (gt == 1), 1, axis=2) + gt * (gt == 2)  # organ one slice up (2 mm); other exact
    pred_b = np.roll(gt * (gt == 1), 1, axis=0)  # organ one voxel along axis 0 (1 mm); other missing
    _stage(work, "predictions", {"a": pred_a, "b": pred_b})
    _stage(work, "sample", {"a": gt}, sub="coarse_masks")  # the coarse masks are perfect
    _stage(work, "refined_masks", {"a": np.zeros(SHAPE)}, {"enabled": False})  # refinement off: left out

    rc, out, err = cli("evaluate", "--workdir", work)
    assert rc == 0, err
    rep = json.loads((work / "reports" / "evaluation.json").read_text())
    assert list(rep["stages"]) == ["coarse", "predicted"]  # no pseudo-masks, refine disabled
    a, b = rep["stages"]["predicted"]["cases"]["a"], rep["stages"]["predicted"]["cases"]["b"]
    assert a["dice"]["organ"] == pytest.approx(5 / 6, abs=1e-6)  # 5 of 6 slices overlap
    assert b["dice"]["organ"] == pytest.approx(9 / 10, abs=1e-6)  # 9 of 10 rows overlap
    assert a["dice"]["other"] == pytest.approx(1.0) and b["dice"]["other"] == pytest.approx(0.0)
    assert a["hd95_mm"]["organ"] == pytest.approx(2.0) and b["hd95_mm"]["organ"] == pytest.approx(1.0)  # the voxel spacing
    assert a["hd95_mm"]["other"] == pytest.approx(0.0) and a["assd_mm"]["other"] == pytest.approx(0.0)
    assert b["hd95_mm"]["other"] is None and b["assd_mm"]["other"] is None  # no surface to measure
    assert a["assd_mm"]["organ"] == pytest.approx(_assd(pred_a == 1, gt == 1, SPACING), abs=1e-4)
    assert b["assd_mm"]["organ"] == pytest.approx(_assd(pred_b == 1, gt == 1, SPACING), abs=1e-4)
    assert 0 < a["assd_mm"]["organ"] < 2.0

    s = rep["stages"]["predicted"]["summary"]["train"]
    assert s["n_cases"] == 2
    assert s["dice"]["organ"]["mean"] == pytest.approx((5 / 6 + 0.9) / 2, abs=1e-6)
    assert s["dice"]["organ"]["std"] == pytest.approx(np.std([5 / 6, 0.9]), abs=1e-6)
    assert s["dice"]["mean"]["mean"] == pytest.approx(((5 / 6 + 1) / 2 + (0.9 + 0) / 2) / 2, abs=1e-6)
    assert s["hd95_mm"]["other"]["n"] == 1  # the NaN of case b is left out, not counted as zero
    coarse = rep["stages"]["coarse"]["summary"]["train"]
    assert coarse["n_cases"] == 1 and coarse["dice"]["mean"]["mean"] == pytest.approx(1.0)
    assert "test" not in rep["stages"]["predicted"]["summary"]  # case c has no prediction

    md = (work / "reports" / "evaluation.md").read_text(encoding="utf-8")
    assert md.strip() in out  # printed to stdout
    assert "| predicted | train | 2 | 86.7 ± 3.3 |" in md and "| coarse | train | 1 | 100.0 ± 0.0 |" in md
    assert "refined" not in md and "pseudo" not in md

    rc, out2, err = cli("evaluate", "--workdir", work)
    assert rc == 0 and "up to date, skipped" in err and md.strip() in out2
    _stage(work, "predictions", {"a": gt, "b": gt}, {"run": 2})  # predict ran again: a new record, the evaluation is stale
    rc, _, err = cli("evaluate", "--workdir", work)
    assert rc == 0 and "evaluate: running" in err
    rep = json.loads((work / "reports" / "evaluation.json").read_text())
    assert rep["stages"]["predicted"]["summary"]["train"]["dice"]["mean"]["mean"] == pytest.approx(1.0)


def test_oracle_tau_sweep_on_cams(work, cli):
    co = Cohort(work)
    case = co.case("a")
    lab = labels_from_source(case.geometry, _gt(), 3)  # (N, S, S) in the canonical view
    cams = np.stack([np.where(lab == 1, 0.7, 0.1), np.where(lab == 2, 0.5, 0.05)], axis=1).astype(np.float16)
    save_npy(work / "sample" / "cams" / "a.npy", cams)
    save_npy(work / "sample" / "cams" / "c.npy", cams)  # a test case: the sweep only looks at training cases
    write_json(work / "sample" / "_stage.json", {"stage": "sample", "key": "k", "outputs": {}})
    rc, out, err = cli("evaluate", "--workdir", work, "--set", "evaluate.tau_sweep=[0.05,0.3,0.6,0.8]")
    assert rc == 0, err
    sw = json.loads((work / "reports" / "evaluation.json").read_text())["tau_sweep"]["coarse"]
    assert sw["n_cases"] == 1 and sw["taus"] == [0.05, 0.3, 0.6, 0.8] and "oracle" in sw["note"]
    assert sw["oracle"]["tau"] == 0.3 and sw["oracle"]["mean_dice"] > 0.8
    # the same numbers as argmax([tau, CAMs]) mapped to the source grid by ccam.io.geometry
    gt = _gt()
    for tau, got in zip(sw["taus"], sw["dice"]):
        scores = np.concatenate([np.full_like(cams[:, :1], tau), cams], axis=1)
        want = dice_per_class(scores_to_source(case.geometry, scores.astype(np.float32)), gt, 2)
        assert [got["organ"], got["other"]] == pytest.approx(np.nan_to_num(want).tolist(), abs=1e-6)
    assert sw["dice"][3]["organ"] == 0.0  # tau above every CAM: nothing predicted
    assert "Oracle tau sweep" in out and "0.3 (oracle)" in out


def test_evaluate_without_any_masks_lists_nothing(work, cli):
    rc, out, err = cli("evaluate", "--workdir", work)
    assert rc == 0, err
    rep = json.loads((work / "reports" / "evaluation.json").read_text())
    assert rep["stages"] == {} and rep["tau_sweep"] == {}
    assert "no stage has produced masks yet" in out


def test_mask_on_wrong_grid_is_a_user_error(work, cli):
    _stage(work, "predictions", {"a": np.zeros((20, 16, 11))})
    rc, _, err = cli("evaluate", "--workdir", work)
    assert rc == 2 and "case a" in err and "source grid" in err

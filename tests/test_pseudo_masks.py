"""Stages `pseudo-masks` and `ablation` on a tiny phantom cohort (after prepare, train-pcam, sample, train-ccam)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ccam.cam import coarse_labels
from ccam.data.cohort import Cohort
from ccam.io.geometry import labels_to_source
from ccam.metrics import dice_per_class
from test_ccam import upstream_copy


@pytest.fixture
def upstream(prepared, cli, tmp_path, tmp_path_factory):
    return upstream_copy(prepared, cli, tmp_path, tmp_path_factory)


def _record(w, folder):
    return json.loads((w / folder / "_stage.json").read_text())


def test_pseudo_masks_for_every_case_on_the_source_grid(upstream, cli):
    w = upstream
    rc, _, err = cli("pseudo-masks", "--workdir", w)
    assert rc == 0, err[-2000:]
    assert _record(w, "pseudo_masks")["outputs"]["row"] == "+AC+CC"
    co = Cohort(w)
    k, tau = co.num_classes, 0.25
    m_s = np.load(w / "sample" / "m_s.npy")
    found = np.zeros(k + 1, dtype=bool)
    for case in co.cases:  # every split
        g = case.geometry
        img = nib.load(str(w / "pseudo_masks" / f"{case.id}.nii.gz"))
        assert img.shape == g.shape and np.allclose(img.affine, g.affine_array, atol=1e-4)
        assert img.get_data_dtype() == np.uint8
        vol = np.asarray(img.dataobj)
        labels = np.load(w / "pseudo_masks" / "labels" / f"{case.id}.npy")
        cams = np.load(w / "pseudo_masks" / "cams" / f"{case.id}.npy")
        assert labels.shape == (case.n_slices, 32, 32) and labels.dtype == np.uint8
        assert cams.shape == (case.n_slices, k, 32, 32) and cams.dtype == np.float16
        assert float(cams.min()) >= 0 and float(cams.max()) <= 1
        assert not cams[case.tags() == 0].any()  # untagged classes have no activation
        # the labels come from these CAMs ...
        assert np.array_equal(labels, coarse_labels(torch.from_numpy(cams).float(), tau).numpy())
        # ... the anatomy chain forbids every class outside M_s ...
        for c in range(1, k + 1):
            assert not cams[:, c - 1][:, m_s[c] == 0].any()
            assert not (labels[:, m_s[c] == 0] == c).any()
        # ... and the volume is the same mask on the source grid (catches flipped or swapped axes)
        assert (vol == labels_to_source(g, labels, k + 1)).mean() > 0.97
        found |= np.bincount(vol.ravel(), minlength=k + 1).astype(bool)
    assert found[1:].sum() >= 2, found  # not a trivial all-background result


def test_switches_give_the_ablation_rows_from_the_same_models(upstream, cli):
    w = upstream
    before = {f: _record(w, f)["finished"] for f in ("pcam", "sample", "ccam")}
    rc, _, err = cli("pseudo-masks", "--workdir", w, "--set", "ccam.enabled=false", "--set", "anatomy.enabled=false")
    assert rc == 0, err[-2000:]
    assert _record(w, "pseudo_masks")["outputs"]["row"] == "P-CAM"
    for case in Cohort(w).cases:  # P-CAM row = the coarse masks of stage `sample`
        assert np.array_equal(np.load(w / "pseudo_masks" / "labels" / f"{case.id}.npy"), np.load(w / "sample" / "coarse" / f"{case.id}.npy"))
    rc, _, err = cli("pseudo-masks", "--workdir", w, "--set", "anatomy.enabled=true")
    assert rc == 0 and "pseudo-masks: running" in err
    assert _record(w, "pseudo_masks")["outputs"]["row"] == "+AC"
    assert {f: _record(w, f)["finished"] for f in ("pcam", "sample", "ccam")} == before  # nothing retrained


def _world_x(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS x (mm; + = the patient's right) of every voxel of a mask (I, J, K)."""
    ijk = np.argwhere(mask)
    return ijk @ affine[:3, :3].T[:, 0] + affine[0, 3]


def test_ac_row_never_puts_the_left_kidney_on_the_right_side(upstream, cli):
    """The +AC row keeps the left kidney on the body's left wherever M_s says it never occurs.

    M_s is what `sample` made, with the patient's right half of the canonical view cleared for
    the left kidney, as a reviewer would edit ``sample/m_s.npy`` after looking at
    ``m_s_left_kidney.png`` (a 5-case P-CAM is too weak to make that indicator by itself). The
    check runs on the written NIfTI in world coordinates, across the cohort's RAS / LPS /
    slice-first files, so a flipped view or axis anywhere in the chain fails it.
    """
    w = upstream
    co = Cohort(w)
    left, right = co.classes.index("left_kidney") + 1, co.classes.index("right_kidney") + 1
    m_s = np.load(w / "sample" / "m_s.npy")
    s = m_s.shape[-1]
    m_s[left, :, : s // 2] = 0  # canonical columns run patient right -> left
    np.save(w / "sample" / "m_s.npy", m_s)
    rc, _, err = cli("pseudo-masks", "--workdir", w, "--set", "ccam.enabled=false")  # the +AC row
    assert rc == 0, err[-2000:]
    checked = 0
    for case in co.cases:
        vol = np.asarray(nib.load(str(w / "pseudo_masks" / f"{case.id}.nii.gz")).dataobj)
        gt = np.asarray(nib.load(case.mask_path).dataobj)
        aff = case.geometry.affine_array
        # the body's midline between the two kidneys, from ground truth (evaluation only)
        midline = 0.5 * (_world_x(gt == left, aff).mean() + _world_x(gt == right, aff).mean())
        x = _world_x(vol == left, aff)
        checked += x.size
        assert (x < midline).all(), f"{case.id}: {(x >= midline).sum()} left-kidney voxels right of the midline"
    assert checked > 0  # the row does label the left kidney


def test_ablation_table(upstream, cli):
    w = upstream
    rc, out, err = cli("ablation", "--workdir", w)
    assert rc == 0, err[-2000:]
    assert "| +AC+CC |" in out and "oracle" in out
    report = json.loads((w / "reports" / "ablation.json").read_text())
    assert (w / "reports" / "ablation.md").read_text() in out
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["P-CAM", "+AC", "+CC", "+AC+CC"]
    assert report["left_right_pairs"] == [["left_kidney", "right_kidney"]]
    for r in rows.values():
        assert r["oracle"]["mean_dice"] >= r["configured"]["mean_dice"] - 1e-4  # tau 0.25 is in the sweep
        assert all(0 <= v <= 1 for v in r["configured"]["swap"].values())
    # the table's figures are those of the masks the stages write: P-CAM = sample's coarse masks,
    # +AC+CC = pseudo-masks with the default switches
    rc, _, err = cli("pseudo-masks", "--workdir", w)
    assert rc == 0, err[-2000:]
    co = Cohort(w)
    for row, folder in (("P-CAM", "sample/coarse_masks"), ("+AC+CC", "pseudo_masks")):
        dice = []
        for case in co.cases:
            pred = np.asarray(nib.load(str(w / folder / f"{case.id}.nii.gz")).dataobj)
            dice.append(dice_per_class(pred, np.asarray(nib.load(case.mask_path).dataobj), co.num_classes))
        with np.errstate(invalid="ignore"):
            expected = np.nanmean(np.array(dice), axis=0)
        got = np.array([np.nan if v is None else v for v in rows[row]["configured"]["dice"].values()])
        assert np.allclose(got, expected, atol=2e-4, equal_nan=True), (row, got, expected)

"""Manifest validation: every problem reported at once, naming the case and field."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ccam.data.manifest import load_manifest
from ccam.errors import ManifestError, UserError


def _vol(path: Path, shape=(20, 22, 10), spacing=(1.5, 1.5, 4.0)):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), np.diag(list(spacing) + [1.0])), path)


def _cohort(tmp_path: Path, n=6, **case_overrides) -> dict:
    cases = []
    for i in range(n):
        _vol(tmp_path / f"i{i}.nii.gz")
        cases.append({"id": f"p{i}", "image": f"i{i}.nii.gz", "tags": {"liver": [[2, 5]]}, "split": "train"})
    return {"name": "t", "modality": "MR", "slice_axis": "axial", "classes": ["liver", "spleen"], "cases": cases}


def _write(tmp_path: Path, m: dict) -> Path:
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(m))
    return p


def test_valid_manifest_resolves_tags(tmp_path):
    m = _cohort(tmp_path)
    m["cases"][0]["tags"] = {"liver": [[0, 1], [4, 9]], "spleen": [[3, 3]]}
    man = load_manifest(_write(tmp_path, m))
    t = man.cases[0].tags
    assert t.shape == (10, 2)
    assert t[:, 0].tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 1, 1]
    assert t[:, 1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]


def test_all_problems_reported_at_once(tmp_path):
    m = _cohort(tmp_path)
    m["cases"][1]["image"] = "missing.nii.gz"
    m["cases"][2]["id"] = "p0"  # duplicate
    m["cases"][3]["tags"] = {"kidney": [[1, 2]]}  # unknown class
    m["cases"][4]["tags"] = {"liver": [[5, 12]]}  # outside 10 slices
    m["cases"][5]["tags"] = {"liver": [[6, 3]], "spleen": [[1, 4], [3, 6]]}  # reversed, overlapping
    with pytest.raises(ManifestError) as ei:
        load_manifest(_write(tmp_path, m))
    msg = str(ei.value)
    probs = ei.value.problems
    assert any("p1" in p and "file not found" in p for p in probs), msg
    assert any("p0" in p and "duplicate id" in p for p in probs), msg
    assert any("p3" in p and "unknown class 'kidney'" in p for p in probs), msg
    assert any("p4" in p and "outside the volume" in p for p in probs), msg
    assert any("p5" in p and "reversed" in p for p in probs), msg
    assert any("p5" in p and "overlap" in p for p in probs), msg
    assert "\n" not in msg


def test_grid_mismatch_split_and_empty(tmp_path):
    m = _cohort(tmp_path)
    _vol(tmp_path / "mask0.nii.gz", shape=(20, 22, 11))
    m["cases"][0]["mask"] = "mask0.nii.gz"
    m["cases"][1]["split"] = "holdout"
    with pytest.raises(ManifestError) as ei:
        load_manifest(_write(tmp_path, m))
    assert any("p0" in p and "different grids" in p for p in ei.value.problems)
    assert any("p1" in p and "train/val/test" in p for p in ei.value.problems)

    empty = dict(m, cases=[])
    with pytest.raises(ManifestError, match="empty"):
        load_manifest(_write(tmp_path, empty))
    no_train = _cohort(tmp_path)
    for c in no_train["cases"]:
        c["split"] = "test"
    with pytest.raises(ManifestError, match="no case has split 'train'"):
        load_manifest(_write(tmp_path, no_train))


def test_tags_csv_and_from_masks(tmp_path):
    m = _cohort(tmp_path, n=2)
    (tmp_path / "t0.csv").write_text("slice,liver,spleen\n3,1,0\n4,1,1\n")
    m["cases"][0]["tags"] = "t0.csv"
    man = load_manifest(_write(tmp_path, m))
    assert man.cases[0].tags[:, 0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert man.cases[0].tags[:, 1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]

    lab = np.zeros((20, 22, 10), np.uint8)
    lab[5:9, 5:9, 2:4] = 1
    lab[10:12, 10:12, 7] = 2
    for i in range(2):
        nib.save(nib.Nifti1Image(lab, np.diag([1.5, 1.5, 4.0, 1.0])), tmp_path / f"m{i}.nii.gz")
        m["cases"][i]["mask"] = f"m{i}.nii.gz"
        m["cases"][i].pop("tags")
    m["tags_from_masks"] = True
    man = load_manifest(_write(tmp_path, m))
    assert np.flatnonzero(man.cases[1].tags[:, 0]).tolist() == [2, 3]
    assert np.flatnonzero(man.cases[1].tags[:, 1]).tolist() == [7]


def test_bad_json_and_missing_manifest(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_manifest(p)
    with pytest.raises(UserError, match="manifest not found"):
        load_manifest(tmp_path / "nope.json")

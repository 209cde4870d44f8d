"""data_manifests/: the schema file is current, every example is accepted by `ccam prepare`, and the
spreadsheet converter writes a manifest that prepare accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ccam.commands.manifest_schema import schema_text
from ccam.config import REPO_CONFIGS
from ccam.data.cohort import Cohort
from ccam.data.phantom import make_phantom_volume, save_nifti

EXAMPLES = REPO_CONFIGS.parent / "data_manifests"
SHAPE = (48, 48, 24)  # 24 axial slices: the examples' tag ranges lie within 0..23


def test_schema_file_is_current():
    assert (EXAMPLES / "manifest.schema.json").read_text() == schema_text(), \
        "run `ccam manifest-schema --out data_manifests/manifest.schema.json`"


def test_schema_command_prints_the_schema(cli):
    rc, out, _ = cli("manifest-schema")
    assert rc == 0 and json.loads(out)["title"] == "ccam data manifest"


def _materialise(example: Path, dest: Path) -> Path:
    """Copy the example (and its tags/) to ``dest`` and write a synthetic volume at every path it names."""
    from test_export_formats import write_dicom_series

    data = json.loads(example.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    if (EXAMPLES / "tags").is_dir():
        shutil.copytree(EXAMPLES / "tags", dest / "tags", dirs_exist_ok=True)
    for i, case in enumerate(data["cases"]):
        img, mask, aff = make_phantom_volume(SHAPE, spacing=(7.0, 7.0, 8.0), modality=data["modality"], seed=i)
        target = dest / case["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        (dest / "masks").mkdir(exist_ok=True)
        if case["image"].startswith("dicom/"):
            write_dicom_series(img.astype(np.int16), aff, target, modality=data["modality"])
        else:
            save_nifti(img, aff, target)
        if case.get("mask"):
            save_nifti(mask, aff, dest / case["mask"])
    shutil.copy(example, dest / example.name)
    return dest / example.name


@pytest.mark.parametrize("name", ["abdomen_mr_ranges.json", "abdomen_ct_csv_tags.json", "benchmark_tags_from_masks.json",
                                  "prostate_mr_dicom.json"])
def test_example_is_accepted_by_prepare(name, tmp_path, cli):
    pytest.importorskip("pydicom")
    manifest = _materialise(EXAMPLES / name, tmp_path / "data")
    w = tmp_path / "w"
    rc, _, err = cli("prepare", "--manifest", manifest, "--workdir", w, "--set", "data.slice_size=32")
    assert rc == 0, err[-1500:]
    co = Cohort(w)
    data = json.loads(manifest.read_text())
    assert [c.id for c in co.cases] == [c["id"] for c in data["cases"]]
    assert co.modality == data["modality"] and co.classes == data["classes"]
    for c in co.cases:
        assert c.n_slices == SHAPE[2] and c.tags().any()  # every example case has tagged slices


def test_spreadsheet_converter_writes_a_valid_manifest(tmp_path, cli):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("case_id,image,split,class,start,end\n"
                     "p001,images/p001.nii.gz,train,liver,9,20\n"
                     "p001,images/p001.nii.gz,train,liver,3,5\n"
                     "p001,images/p001.nii.gz,train,spleen,11,17\n"
                     "p002,images/p002.nii.gz,test,liver,8,19\n")
    out = tmp_path / "data" / "m.json"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, str(EXAMPLES / "from_spreadsheet.py"), str(sheet), "--name", "sheet", "--modality", "MR",
                        "--classes", "liver,spleen", "--out", str(out), "--one-based"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["cases"][0]["tags"] == {"liver": [[2, 4], [8, 19]], "spleen": [[10, 16]]}  # one-based -> 0-based, sorted
    (out.parent / "images").mkdir()
    for i, c in enumerate(data["cases"]):
        img, _, aff = make_phantom_volume(SHAPE, spacing=(7.0, 7.0, 8.0), seed=i)
        save_nifti(img, aff, out.parent / c["image"])
    rc, _, err = cli("prepare", "--manifest", out, "--workdir", tmp_path / "w", "--set", "data.slice_size=32")
    assert rc == 0, err[-1500:]
    tags = Cohort(tmp_path / "w").case("p001").tags()
    assert tags[2:5, 0].all() and not tags[5:8, 0].any() and tags[8:20, 0].all()

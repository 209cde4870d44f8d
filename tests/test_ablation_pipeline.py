"""`ccam run --pipeline pipelines/ablation.yaml`: the table end to end, with the +Aff row."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from ccam.config import REPO_CONFIGS
from ccam.data.cohort import Cohort
from ccam.metrics import dice_per_class

FAST = ("data.slice_size=32", "pcam.epochs=1", "pcam.batch_size=8", "pcam.width=0.25", "ccam.epochs=1",
        "ccam.batch_size=8", "cam.scales=[1.0]", "refine.epochs=1", "refine.batch_size=8", "refine.t=4")


def test_ablation_pipeline_adds_aff_row_when_refinement_is_on(phantom_manifest, tmp_path, cli):
    w = tmp_path / "w"
    pipe = REPO_CONFIGS.parent / "pipelines" / "ablation.yaml"
    sets = [x for s in FAST for x in ("--set", s)]
    rc, out, err = cli("run", "--pipeline", pipe, "--manifest", phantom_manifest, "--workdir", w, *sets)
    assert rc == 0, err[-2000:]
    report = json.loads((w / "reports" / "ablation.json").read_text())
    rows = [r["row"] for r in report["rows"]]
    assert rows == ["P-CAM", "+AC", "+CC", "+AC+CC"]  # refinement off by default: no +Aff row
    for r in report["rows"]:  # pointing game of every CAM row, per class, against ground truth
        assert set(r["pointing_hit_rate"]) == set(report["classes"])
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["pointing_hit_rate"].values())
        assert sum(r["pointing_slices"].values()) > 0
    assert "## Pointing game (against ground truth)" in out

    rc, out, err = cli("run", "--pipeline", pipe, "--workdir", w, "--set", "refine.enabled=true")
    assert rc == 0, err[-2000:]
    report = json.loads((w / "reports" / "ablation.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows)[-1] == "+AC+CC+Aff" and "| +AC+CC+Aff |" in out
    assert rows["+AC+CC+Aff"]["pointing_hit_rate"] is None  # a label row has no CAM peak
    # the row's figures are those of the refined masks the refine stage wrote
    co = Cohort(w)
    dice = [dice_per_class(np.asarray(nib.load(str(w / "refined_masks" / f"{c.id}.nii.gz")).dataobj),
                           np.asarray(nib.load(c.mask_path).dataobj), co.num_classes) for c in co.cases]
    with np.errstate(invalid="ignore"):
        expected = np.nanmean(np.array(dice), axis=0)
    got = np.array([np.nan if v is None else v for v in rows["+AC+CC+Aff"]["configured"]["dice"].values()])
    assert np.allclose(got, expected, atol=2e-4, equal_nan=True)

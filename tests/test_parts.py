"""``--part i/n`` (issue 12): n processes split the per-case stages; the result equals one process.

M_GC must be bit-identical: the parts write each case's coarse mask, and the stage record (with
M_GC from the summed integer counts of all cases, divided once) is written when the last part ends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ccam.errors import UserError
from ccam.parts import SharedWorkdirLock
from ccam.runner import WorkdirLock
from ccam.stages.base import read_record

RETAU = ("--set", "cam.tau=0.3")  # a result key: sample and everything after it are stale


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def two_copies(through_pseudo_masks, tmp_path):
    return _copy(through_pseudo_masks, tmp_path / "one"), _copy(through_pseudo_masks, tmp_path / "parts")


def _arrays(folder: Path, sub: str) -> dict:
    return {p.name: np.load(p) for p in sorted((folder / sub).glob("*.npy"))}


def test_sample_in_three_parts_equals_one_process_bit_for_bit(two_copies, cli):
    one, parts = two_copies
    rc, _, err = cli("sample", "--workdir", one, *RETAU)
    assert rc == 0, err
    for i in (2, 0):  # any order; not the last part yet: no record
        rc, _, err = cli("sample", "--workdir", parts, "--part", f"{i}/3", *RETAU)
        assert rc == 0, err
        assert read_record(parts, "sample") is None
        assert "waiting for part(s)" in err
    rc, _, err = cli("sample", "--workdir", parts, "--part", "1/3", *RETAU)
    assert rc == 0, err
    rec_one, rec_parts = read_record(one, "sample"), read_record(parts, "sample")
    assert rec_parts is not None and rec_parts["key"] == rec_one["key"]
    assert rec_parts["outputs"] == rec_one["outputs"]
    a, b = (np.load(w / "sample" / "m_gc.npy") for w in (one, parts))
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), "M_GC differs from the single-process run"
    assert np.array_equal(np.load(one / "sample" / "m_s.npy"), np.load(parts / "sample" / "m_s.npy"))
    for sub in ("coarse", "cams"):
        x, y = _arrays(one / "sample", sub), _arrays(parts / "sample", sub)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert not (parts / "sample" / "_parts").exists() and not (parts / "sample" / "_started.json").exists()
    rc, out, _ = cli("status", "--workdir", parts)
    assert [r.split()[1] for r in out.splitlines() if r.startswith("sample")] == ["done"]
    # a plain run afterwards has nothing to do
    rc, _, err = cli("sample", "--workdir", parts, *RETAU)
    assert rc == 0 and "up to date" in err


def test_pseudo_masks_in_two_parts_equal_one_process(two_copies, cli):
    one, parts = two_copies
    assert cli("pseudo-masks", "--workdir", one, "--force")[0] == 0
    for i in (0, 1):
        rc, _, err = cli("pseudo-masks", "--workdir", parts, "--part", f"{i}/2", "--force")
        assert rc == 0, err
    assert read_record(parts, "pseudo-masks")["outputs"] == read_record(one, "pseudo-masks")["outputs"]
    x, y = _arrays(one / "pseudo_masks", "labels"), _arrays(parts / "pseudo_masks", "labels")
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    for p in sorted((one / "pseudo_masks").glob("*.nii.gz")):
        assert np.array_equal(np.asarray(nib.load(p).dataobj), np.asarray(nib.load(parts / "pseudo_masks" / p.name).dataobj))


def test_merge_by_hand_and_its_errors(two_copies, cli):
    _, parts = two_copies
    rc, _, err = cli("sample", "--workdir", parts, "--merge", *RETAU)
    assert rc == 2 and "no parts" in err.splitlines()[-1] and "Traceback" not in err
    assert cli("sample", "--workdir", parts, "--part", "0/2", *RETAU)[0] == 0
    rc, _, err = cli("sample", "--workdir", parts, "--merge", *RETAU)
    assert rc == 2 and "1/2" in err and "have not finished" in err
    rc, _, err = cli("sample", "--workdir", parts, "--part", "2/2", *RETAU)
    assert rc == 2 and "0 <= i < n" in err
    rc, _, err = cli("train-pcam", "--workdir", parts, "--part", "0/2")
    assert rc == 2 and "no such option" in err.lower()
    # the rest done by a normal run (it resumes the parts' folder), then nothing is left to merge
    assert cli("sample", "--workdir", parts, *RETAU)[0] == 0
    assert read_record(parts, "sample") is not None


def test_parts_share_the_work_directory_and_an_exclusive_holder_excludes_them(through_pseudo_masks):
    w = through_pseudo_masks
    with SharedWorkdirLock(w), SharedWorkdirLock(w):
        with pytest.raises(UserError, match="in use"):
            WorkdirLock(w).__enter__()
    with WorkdirLock(w):
        with pytest.raises(UserError, match="in use"):
            SharedWorkdirLock(w).__enter__()


def test_evaluate_in_two_parts_equals_one_process(two_copies, cli):
    """The parts measure the cases (metrics and tau sweep, cached per case); the last part adds the
    localisation diagnostics and writes the same report as one process."""
    import json

    one, parts = two_copies
    sets = ("--set", "evaluate.surface_distances=false")
    assert cli("evaluate", "--workdir", one, *sets)[0] == 0
    for i in (1, 0):
        rc, _, err = cli("evaluate", "--workdir", parts, "--part", f"{i}/2", *sets)
        assert rc == 0, err
    a, b = (json.loads((w / "reports" / "evaluation.json").read_text()) for w in (one, parts))
    assert a["stages"] == b["stages"] and a["tau_sweep"] == b["tau_sweep"]
    assert a.get("localisation", {}).get("sources") == b.get("localisation", {}).get("sources")
    assert read_record(parts, "evaluate")["outputs"]["mean_dice"] == read_record(one, "evaluate")["outputs"]["mean_dice"]

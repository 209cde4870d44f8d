"""`prepare`, the stage runner (records, skip, staleness, resume, lock) and CLI error handling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ccam import config as config_mod
from ccam.data.cohort import Cohort
from ccam.data.phantom import make_phantom_volume
from ccam.errors import UserError
from ccam.runner import WorkdirLock, run_stage
from ccam.stages.base import STAGES, Stage, register, stage_status


def _single_orientation_cohort(tmp_path: Path) -> Path:
    cases = []
    for i, orient in enumerate(["RAS", "LPS", "SLICE_FIRST"]):
        img, mask, aff = make_phantom_volume((64, 60, 12), seed=7, orientation=orient)
        nib.save(nib.Nifti1Image(img, aff), tmp_path / f"{orient}.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), tmp_path / f"{orient}_m.nii.gz")
        cases.append({"id": orient.lower(), "image": f"{orient}.nii.gz", "mask": f"{orient}_m.nii.gz", "split": "train"})
    m = {"name": "o", "modality": "MR", "slice_axis": "axial", "classes": ["liver", "right_kidney", "left_kidney", "spleen"],
         "tags_from_masks": True, "cases": cases}
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(m))
    return p


def test_prepare_same_anatomy_whatever_the_storage(tmp_path, cli):
    man = _single_orientation_cohort(tmp_path)
    rc, _, err = cli("prepare", "--manifest", man, "--workdir", tmp_path / "w", "--set", "data.slice_size=32")
    assert rc == 0, err
    co = Cohort(tmp_path / "w")
    ras, lps, sf = (co.case(i).slices() for i in ("ras", "lps", "slice_first"))
    assert ras.shape == (12, 32, 32) and ras.dtype == np.float32
    assert np.allclose(ras, lps, atol=1e-5) and np.allclose(ras, sf, atol=1e-5)
    assert np.array_equal(co.case("ras").tags(), co.case("slice_first").tags())
    assert 0.0 <= float(ras.min()) and float(ras.max()) <= 1.0
    assert "validation: none" in err  # 3 training cases: too few to hold one out
    assert (tmp_path / "w" / "config.yaml").exists()


def test_validation_split_taken_by_patient(prepared):
    w = prepared(32)
    co = Cohort(w)
    assert {c.split for c in co.cases} == {"train", "val", "test"}
    assert all(c.slices().shape == (c.n_slices, 32, 32) for c in co.cases)


def test_skip_stale_and_invalidation(prepared, cli):
    w = prepared(32)
    rec1 = json.loads((w / "prepare" / "_stage.json").read_text())
    assert {"key", "inputs", "code_version", "outputs"} <= set(rec1)
    rc, _, err = cli("prepare", "--workdir", w, "--manifest", Cohort(w).meta["manifest"])
    assert rc == 0 and "up to date, skipped" in err

    calls = []

    def count(ctx):
        calls.append(1)
        (ctx.dir / "n.txt").write_text(str(len(Cohort(ctx.workdir).cases)))
        return {"n": len(calls)}

    register(Stage("test-count", "test_count", ("seg",), ("prepare",), count))
    try:
        cfg = config_mod.resolve(w)
        run_stage(w, cfg, "test-count")
        run_stage(w, cfg, "test-count")
        assert len(calls) == 1 and stage_status(w, cfg, "test-count") == "done"
        # a change in the stage's own section makes it stale; others' sections do not
        assert stage_status(w, config_mod.resolve(w, sets=["pcam.epochs=99"]), "test-count") == "done"
        assert stage_status(w, config_mod.resolve(w, sets=["seg.epochs=99"]), "test-count") == "stale"
        # a changed upstream config makes prepare stale and, through it, everything downstream
        cfg48 = config_mod.resolve(w, sets=["data.slice_size=48"])
        assert stage_status(w, cfg48, "prepare") == "stale" and stage_status(w, cfg48, "test-count") == "stale"
        rc, out, _ = cli("status", "--workdir", w)
        assert rc == 0 and "prepare" in out and "done" in out
        rc, _, _ = cli("prepare", "--workdir", w, "--manifest", Cohort(w).meta["manifest"], "--set", "data.slice_size=48")
        assert rc == 0 and Cohort(w).slice_size == 48
        assert stage_status(w, config_mod.resolve(w), "test-count") == "stale"
        run_stage(w, config_mod.resolve(w), "test-count")
        assert len(calls) == 2
    finally:
        STAGES.pop("test-count")


def test_crash_resumes_and_user_error_restores(prepared):
    w = prepared(32)
    state = {"fail": "crash"}

    def flaky(ctx):
        marker = ctx.dir / "partial.txt"
        if state["fail"] == "crash":
            marker.write_text("epoch 1")
            raise RuntimeError("killed")
        if state["fail"] == "user":
            from ccam.errors import UserError

            raise UserError("bad input", case="x")
        return {"resumed": marker.exists()}

    register(Stage("test-flaky", "test_flaky", ("seg",), ("prepare",), flaky))
    try:
        cfg = config_mod.resolve(w)
        with pytest.raises(RuntimeError):
            run_stage(w, cfg, "test-flaky")
        assert not (w / "test_flaky" / "_stage.json").exists()
        state["fail"] = None
        rec = run_stage(w, cfg, "test-flaky")
        assert rec["outputs"]["resumed"] is True  # same inputs: partial state kept for resume
        # a user error in a re-run with new inputs leaves the previous outputs untouched
        before = (w / "test_flaky" / "_stage.json").read_bytes()
        state["fail"] = "user"
        from ccam.errors import UserError

        with pytest.raises(UserError):
            run_stage(w, config_mod.resolve(w, sets=["seg.epochs=3"]), "test-flaky")
        assert (w / "test_flaky" / "_stage.json").read_bytes() == before
    finally:
        STAGES.pop("test-flaky")


def test_bad_manifest_rerun_keeps_previous_outputs(prepared, cli, tmp_path):
    w = prepared(32)
    before = (w / "prepare" / "_stage.json").read_bytes()
    src = Path(Cohort(w).meta["manifest"])
    m = json.loads(src.read_text())
    m["cases"][0]["tags"] = {"liver": [[0, 999]]}
    bad = src.parent / "bad_manifest.json"
    bad.write_text(json.dumps(m))
    rc, _, err = cli("prepare", "--workdir", w, "--manifest", bad)
    assert rc == 2 and "outside the volume" in err and "Traceback" not in err
    assert (w / "prepare" / "_stage.json").read_bytes() == before
    assert len(list((w / "prepare" / "slices").glob("*.npy"))) == len(m["cases"])
    assert not list((w / "prepare").rglob("*.part*"))


def test_lock_blocks_a_second_process(prepared, cli):
    w = prepared(32)
    with WorkdirLock(w):
        rc, _, err = cli("prepare", "--workdir", w)
    assert rc == 2 and "in use by another ccam process" in err


def _one_case_manifest(tmp_path: Path, arr: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 5.0, 1.0])), tmp_path / "img.nii.gz")
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"name": "e", "modality": "MR", "slice_axis": "axial", "classes": ["liver"],
                             "cases": [{"id": "bad1", "image": "img.nii.gz", "tags": {"liver": [[0, 1]]}, "split": "train"}]}))
    return p


@pytest.mark.parametrize("kind", ["nan", "4d", "corrupt"])
def test_user_errors_exit_2_with_one_line(tmp_path, cli, kind):
    arr = np.random.default_rng(0).random((16, 16, 6)).astype(np.float32)
    if kind == "nan":
        arr[3, 3, 3] = np.nan
    if kind == "4d":
        arr = np.stack([arr, arr], -1)
    man = _one_case_manifest(tmp_path, arr)
    if kind == "corrupt":
        data = (tmp_path / "img.nii.gz").read_bytes()
        (tmp_path / "img.nii.gz").write_bytes(data[: len(data) // 2])
    rc, _, err = cli("prepare", "--manifest", man, "--workdir", tmp_path / "w")
    lines = [ln for ln in err.splitlines() if ln.startswith("ccam: error")]
    assert rc == 2 and len(lines) == 1 and "bad1" in lines[0] and "Traceback" not in err, err
    expected = {"nan": "NaN or Inf", "4d": "3D volume is needed", "corrupt": "cannot read image"}[kind]
    assert expected in lines[0]
    assert not (tmp_path / "w" / "prepare" / "_stage.json").exists()


def test_workdir_and_config_errors(tmp_path, cli, phantom_manifest):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = cli("prepare", "--manifest", phantom_manifest, "--workdir", blocker / "w")
    assert rc == 2 and "cannot write to the work directory" in err
    rc, _, err = cli("prepare", "--manifest", phantom_manifest, "--workdir", tmp_path / "w", "--set", "data.nope=1")
    assert rc == 2 and "data.nope: unknown key" in err
    rc, _, err = cli("run", "--workdir", tmp_path / "empty")
    assert rc == 2 and "pass --manifest" in err
    rc, _, err = cli("status", "--workdir", tmp_path / "missing")
    assert rc == 2 and "does not exist" in err


def test_default_yaml_matches_built_in_defaults():
    import yaml

    data = yaml.safe_load((config_mod.REPO_CONFIGS / "default.yaml").read_text())
    assert config_mod.validate(data).model_dump() == config_mod.Config().model_dump()
    demo = yaml.safe_load((config_mod.REPO_CONFIGS / "demo.yaml").read_text())
    config_mod.validate(demo)  # every demo key exists


def test_missing_previous_stage_is_a_clear_error(prepared, cli, tmp_path):
    rc, _, err = cli("train-pcam", "--workdir", tmp_path / "empty")
    assert rc == 2 and "needs 'prepare', which is missing" in err and "ccam prepare" in err
    w = prepared(32)
    rc, _, err = cli("sample", "--workdir", w)
    lines = [ln for ln in err.splitlines() if ln.startswith("ccam: error")]
    assert rc == 2 and len(lines) == 1 and "needs 'train-pcam'" in lines[0] and "Traceback" not in err
    assert not (w / "sample").exists()


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    """DataLoader workers are forked children: when the ccam process is killed with SIGKILL, a worker
    that lives on a little must not keep the work directory locked for the next command."""
    import signal
    import subprocess
    import sys
    import time

    w = tmp_path / "w"
    code = ("import os, sys, time\n"
            "from pathlib import Path\n"
            "from ccam.runner import WorkdirLock\n"
            "lock = WorkdirLock(Path(sys.argv[1])).__enter__()\n"
            "if os.fork() == 0:\n"
            "    time.sleep(60); os._exit(0)\n"
            "print('locked', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(w)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="in use by another ccam process"):
            WorkdirLock(w).__enter__()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        time.sleep(0.2)
        with WorkdirLock(w):  # the child still runs, the lock is free
            pass
    finally:
        os.killpg(p.pid, signal.SIGKILL)

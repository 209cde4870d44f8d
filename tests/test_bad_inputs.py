"""The bad-input battery (issue 10): every input a user can get wrong ends with exit 2, one line that
names the case or file, no traceback, and the work directory's previous outputs byte for byte
unchanged; hostile case ids never make ccam write outside the work directory or --output.

Each entry of ``BAD`` builds one bad input in a copy of a small finished work directory (prepare,
train-pcam, sample, train-ccam, pseudo-masks at S = 32) and returns the command to run and a text
the error line must contain.
"""

from __future__ import annotations

import gzip
import os
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ccam.cli import main as ccam_main
from ccam.data.cohort import Cohort

@pytest.fixture(scope="module")
def base(through_pseudo_masks) -> Path:
    return through_pseudo_masks


def tree_hash(root: Path) -> dict:
    """Every file below ``root`` (but the lock file) -> sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".ccam.lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- building blocks -------------------------------------------------------------------------------

def _manifest(ctx, **change) -> Path:
    """The phantom manifest with ``change`` applied to the top level or (``case0``/``cases``) to the cases."""
    data = json.loads(Path(ctx["manifest"]).read_text())
    src = Path(ctx["manifest"]).parent
    for c in data["cases"]:  # absolute paths: the bad manifest lives elsewhere
        c["image"] = str(src / c["image"])
        if c.get("mask"):
            c["mask"] = str(src / c["mask"])
    case0 = change.pop("case0", None)
    if case0:
        data["cases"][0].update(case0)
        data["cases"][0] = {k: v for k, v in data["cases"][0].items() if v is not None}
    data.update(change)
    p = ctx["tmp"] / "bad.json"
    p.write_text(json.dumps(data))
    return p


def _image(ctx, arr, affine=None, name="img.nii.gz", header_dtype=None) -> str:
    img = nib.Nifti1Image(arr, np.diag([5.0, 5.0, 10.0, 1.0]) if affine is None else affine)
    if header_dtype is not None:
        img.set_data_dtype(header_dtype)
    p = ctx["tmp"] / name
    nib.save(img, str(p))
    return str(p)


def _first_image(ctx) -> tuple[np.ndarray, np.ndarray]:
    data = json.loads(Path(ctx["manifest"]).read_text())
    img = nib.load(str(Path(ctx["manifest"]).parent / data["cases"][0]["image"]))
    return np.asarray(img.dataobj), img.affine


def _case0(ctx) -> str:
    return json.loads(Path(ctx["manifest"]).read_text())["cases"][0]["id"]


def _prepare(ctx, manifest) -> list:
    return ["prepare", "--manifest", manifest, "--workdir", ctx["w"]]


def _with_image(ctx, path, **more):
    return _prepare(ctx, _manifest(ctx, case0={"image": path, "mask": None, **more}))


def _tags_csv(ctx, text: str | bytes, kind="file") -> list:
    p = ctx["tmp"] / "tags.csv"
    if kind == "dir":
        p.mkdir()
    elif isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return _prepare(ctx, _manifest(ctx, case0={"tags": str(p)}))


def _nested(ctx) -> list:
    p = ctx["tmp"] / "deep.json"
    p.write_text("[" * 100000 + "]" * 100000)
    return _prepare(ctx, p)


def _garbage(path: Path, data: bytes = b"\x00garbage\xff" * 50) -> None:
    path.write_bytes(data)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _stage(ctx, *args) -> list:
    return [*args, "--workdir", ctx["w"]]


def _file(ctx, name: str, data: bytes | str) -> Path:
    p = ctx["tmp"] / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def _dicom_two_series(ctx) -> list:
    """A folder holding two DICOM series (ccam must not silently take the first)."""
    from test_export_formats import write_dicom_series

    arr, aff = _first_image(ctx)
    d = ctx["tmp"] / "two_series"
    write_dicom_series(arr[:, :, :8].astype(np.int16), aff, d / "a")
    write_dicom_series(arr[:, :, :8].astype(np.int16), aff, d / "b")
    for f in (d / "b").iterdir():
        f.rename(d / f"b_{f.name}")
    for f in (d / "a").iterdir():
        f.rename(d / f.name)
    return _with_image(ctx, str(d))


def _zero_spacing(ctx) -> list:
    """A header whose voxel size along one axis is 0 (no qform/sform: the affine comes from pixdim)."""
    arr, _ = _first_image(ctx)
    img = nib.Nifti1Image(arr.astype(np.float32), None)
    img.header.set_zooms((5.0, 0.0, 10.0))
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    p = ctx["tmp"] / "zero.nii.gz"
    nib.save(img, str(p))
    return _with_image(ctx, str(p))


def _truncated_mha(ctx) -> list:
    import SimpleITK as sitk

    arr, _ = _first_image(ctx)
    p = ctx["tmp"] / "img.mha"
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.float32).transpose(2, 1, 0)), str(p))
    _truncate(p)
    return _with_image(ctx, str(p))


def _rgb(ctx) -> list:
    arr, aff = _first_image(ctx)
    rgb = np.zeros(arr.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return _with_image(ctx, _image(ctx, rgb, aff))


def _mask_other_affine(ctx) -> list:
    arr, aff = _first_image(ctx)
    shifted = aff.copy()
    shifted[0, 3] += 30.0
    return _prepare(ctx, _manifest(ctx, case0={"mask": _image(ctx, np.zeros(arr.shape, np.uint8), shifted, "mask.nii.gz")}))


def _export_nonempty(ctx) -> list:
    d = ctx["tmp"] / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("a user's file")
    return ["export", "--workdir", ctx["w"], "--stage", "pseudo-masks", "--out", d]


def _predict_hostile(ctx, cid: str) -> list:
    arr, aff = _first_image(ctx)
    man = ctx["tmp"] / "predict.json"
    man.write_text(json.dumps({"cases": [{"id": cid, "image": _image(ctx, arr, aff)}]}))
    return ["predict", "--workdir", ctx["w"], "--input", man, "--output", ctx["tmp"] / "out" / "masks"]


def _seg_masks(ctx, kind: str) -> list:
    masks = ctx["tmp"] / "masks"
    masks.mkdir()
    cid = Cohort(ctx["w"]).split("train")[0].id
    if kind == "grid":
        nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), str(masks / f"{cid}.nii.gz"))
    elif kind == "labels":
        arr, aff = _first_image(ctx)  # not this case's grid necessarily: use the case's own image grid
        img = nib.load(Cohort(ctx["w"]).case(cid).image_path)
        nib.save(nib.Nifti1Image(np.full(img.shape, 9, np.uint8), img.affine), str(masks / f"{cid}.nii.gz"))
    elif kind == "float":
        img = nib.load(Cohort(ctx["w"]).case(cid).image_path)
        nib.save(nib.Nifti1Image(np.full(img.shape, 0.5, np.float32), img.affine), str(masks / f"{cid}.nii.gz"))
    return ["train-seg", "--workdir", ctx["w"], "--masks", masks, "--set", "seg.epochs=1"]


def _corrupt_then(ctx, rel: str, how, *cmd) -> list:
    how(ctx["w"] / rel)
    return _stage(ctx, *cmd)


def _corrupt_case_file(ctx, folder: str, how, *cmd) -> list:
    cid = Cohort(ctx["w"]).split("train")[0].id
    how(ctx["w"] / folder / f"{cid}.npy")
    return _stage(ctx, *cmd)


def _pipeline(ctx, text: str) -> list:
    return ["run", "--workdir", ctx["w"], "--pipeline", _file(ctx, "pipe.yaml", text)]


# (name, builder(ctx) -> argv, texts of which the error line must contain one)
BAD = [
    # -- manifest: the file itself
    ("manifest-not-json", lambda c: _prepare(c, _file(c, "m.json", "{not json")), ["m.json"]),
    ("manifest-not-utf8", lambda c: _prepare(c, _file(c, "m.json", b"\xff\xfe{\x00")), ["m.json"]),
    ("manifest-nested-100000", _nested, ["deep.json"]),
    ("manifest-a-list", lambda c: _prepare(c, _file(c, "m.json", "[1, 2]")), ["m.json"]),
    ("manifest-is-a-folder", lambda c: _prepare(c, c["tmp"]), [""]),
    ("manifest-missing", lambda c: _prepare(c, c["tmp"] / "nope.json"), ["nope.json"]),
    ("manifest-no-name", lambda c: _prepare(c, _manifest(c, name=None)), ["name"]),
    ("manifest-unknown-field", lambda c: _prepare(c, _manifest(c, colour="blue")), ["colour"]),
    ("manifest-modality-pet", lambda c: _prepare(c, _manifest(c, modality="PET")), ["modality"]),
    ("manifest-slice-axis", lambda c: _prepare(c, _manifest(c, slice_axis="oblique")), ["slice_axis"]),
    ("manifest-no-classes", lambda c: _prepare(c, _manifest(c, classes=[])), ["classes"]),
    ("manifest-duplicate-classes", lambda c: _prepare(c, _manifest(c, classes=["liver", "liver", "spleen", "x"])), ["classes"]),
    ("manifest-no-cases", lambda c: _prepare(c, _manifest(c, cases=[])), ["cases"]),
    ("manifest-no-train-case", lambda c: _prepare(c, _manifest(c, cases=[dict(x, split="test") for x in json.loads(_manifest(c).read_text())["cases"]])), ["train"]),
    ("case-split-unknown", lambda c: _prepare(c, _manifest(c, case0={"split": "training"})), ["split"]),
    ("case-duplicate-id", lambda c: _prepare(c, _manifest(c, cases=json.loads(_manifest(c).read_text())["cases"][:1] * 2)), ["duplicate"]),
    # -- case ids that cannot name a file
    ("case-id-empty", lambda c: _prepare(c, _manifest(c, case0={"id": ""})), ["''"]),
    ("case-id-hidden", lambda c: _prepare(c, _manifest(c, case0={"id": ".hidden"})), [".hidden"]),
    ("case-id-slash", lambda c: _prepare(c, _manifest(c, case0={"id": "a/b"})), ["a/b"]),
    ("case-id-dotdot", lambda c: _prepare(c, _manifest(c, case0={"id": "../../../x/evil"})), ["evil"]),
    ("case-id-absolute", lambda c: _prepare(c, _manifest(c, case0={"id": "/tmp/evil"})), ["evil"]),
    ("case-id-not-a-string", lambda c: _prepare(c, _manifest(c, case0={"id": 7})), ["id"]),
    # -- images
    ("image-missing", lambda c: _with_image(c, str(c["tmp"] / "gone.nii.gz")), ["gone.nii.gz"]),
    ("image-folder-without-dicom", lambda c: _with_image(c, str(c["tmp"])), ["no DICOM"]),
    ("image-garbage", lambda c: _with_image(c, str(_file(c, "g.nii.gz", b"\x00" * 400))), ["g.nii.gz"]),
    ("image-truncated", lambda c: (_with_image(c, _image(c, *_first_image(c))), _truncate(c["tmp"] / "img.nii.gz"))[0], ["img.nii.gz"]),
    ("image-rgb", _rgb, ["RGB"]),
    ("image-complex", lambda c: _with_image(c, _image(c, _first_image(c)[0].astype(np.complex64), _first_image(c)[1])), ["complex"]),
    ("image-4d", lambda c: _with_image(c, _image(c, np.stack([_first_image(c)[0]] * 2, -1), _first_image(c)[1])), ["3D"]),
    ("image-zero-spacing", _zero_spacing, ["voxel size"]),
    ("image-no-slices", lambda c: _with_image(c, _image(c, np.zeros((16, 16, 0), np.float32))), ["img.nii.gz"]),
    ("image-constant", lambda c: _with_image(c, _image(c, np.full(_first_image(c)[0].shape, 7.0, np.float32), _first_image(c)[1])), ["constant"]),
    ("image-nan", lambda c: _with_image(c, _image(c, np.where(np.arange(_first_image(c)[0].size).reshape(_first_image(c)[0].shape) == 5, np.nan, _first_image(c)[0]).astype(np.float32), _first_image(c)[1])), ["NaN"]),
    ("image-truncated-mha", _truncated_mha, ["truncated"]),
    ("image-two-dicom-series", _dicom_two_series, ["2 DICOM series"]),
    # -- tags
    ("tags-unknown-class", lambda c: _prepare(c, _manifest(c, case0={"tags": {"heart": [[0, 1]]}})), ["heart"]),
    ("tags-reversed", lambda c: _prepare(c, _manifest(c, case0={"tags": {"liver": [[5, 2]]}})), ["reversed"]),
    ("tags-outside-volume", lambda c: _prepare(c, _manifest(c, case0={"tags": {"liver": [[0, 999]]}})), ["outside"]),
    ("tags-overlap", lambda c: _prepare(c, _manifest(c, case0={"tags": {"liver": [[0, 5], [3, 8]]}})), ["overlap"]),
    ("tags-not-a-pair", lambda c: _prepare(c, _manifest(c, case0={"tags": {"liver": [[1, 2, 3]]}})), ["[start, end]"]),
    ("tags-missing", lambda c: _prepare(c, _manifest(c, case0={"tags": None})), ["tags"]),
    ("tags-csv-missing", lambda c: _prepare(c, _manifest(c, case0={"tags": str(c["tmp"] / "no.csv")})), ["no.csv"]),
    ("tags-csv-folder", lambda c: _tags_csv(c, "", kind="dir"), ["tags.csv"]),
    ("tags-csv-not-utf8", lambda c: _tags_csv(c, b"slice,liver\n0,\xff\xfe\n"), ["tags.csv"]),
    ("tags-csv-no-header", lambda c: _tags_csv(c, "0,1,0,0,0\n1,1,0,0,0\n"), ["header"]),
    ("tags-csv-not-integers", lambda c: _tags_csv(c, "slice,liver\n0,yes\n"), ["integers"]),
    ("tags-csv-not-0-1", lambda c: _tags_csv(c, "slice,liver\n0,2\n"), ["0/1"]),
    ("tags-csv-unknown-class", lambda c: _tags_csv(c, "slice,heart\n0,1\n"), ["heart"]),
    ("tags-csv-slice-outside", lambda c: _tags_csv(c, "slice,liver\n999,1\n"), ["999"]),
    # -- ground truth
    ("mask-other-affine", _mask_other_affine, ["different grids"]),
    ("mask-missing", lambda c: _prepare(c, _manifest(c, case0={"mask": str(c["tmp"] / "nomask.nii.gz")})), ["nomask"]),
    ("tags-from-masks-without-mask", lambda c: _prepare(c, _manifest(c, tags_from_masks=True, case0={"mask": None})), ["mask"]),
    # -- settings
    ("config-missing", lambda c: _stage(c, "sample", "--config", c["tmp"] / "no.yaml"), ["no.yaml"]),
    ("config-binary", lambda c: _stage(c, "sample", "--config", _file(c, "b.yaml", bytes(range(256)) * 4)), ["b.yaml"]),
    ("config-a-list", lambda c: _stage(c, "sample", "--config", _file(c, "l.yaml", "- 1\n- 2\n")), ["l.yaml"]),
    ("config-bad-yaml", lambda c: _stage(c, "sample", "--config", _file(c, "y.yaml", "cam: [1, 2\n")), ["y.yaml"]),
    ("config-unknown-key", lambda c: _stage(c, "sample", "--set", "cam.nope=1"), ["cam.nope"]),
    ("set-no-equals", lambda c: _stage(c, "sample", "--set", "cam.tau"), ["cam.tau"]),
    ("set-bad-yaml", lambda c: _stage(c, "sample", "--set", "cam.scales=[1,"), ["cam.scales"]),
    ("set-tau-out-of-range", lambda c: _stage(c, "sample", "--set", "cam.tau=2"), ["cam.tau"]),
    ("set-device-banana", lambda c: _stage(c, "sample", "--set", "runtime.device=banana"), ["banana"]),
    ("set-device-cuda-without-gpu", lambda c: _stage(c, "sample", "--set", "runtime.device=cuda"), ["CUDA"]),
    ("set-workers-negative", lambda c: _stage(c, "sample", "--set", "runtime.num_workers=-1"), ["num_workers"]),
    ("set-scales-empty", lambda c: _stage(c, "sample", "--set", "cam.scales=[]"), ["cam.scales"]),
    ("set-scales-negative", lambda c: _stage(c, "sample", "--set", "cam.scales=[-1.0]"), ["cam.scales"]),
    ("set-scales-tiny", lambda c: _stage(c, "sample", "--set", "cam.scales=[0.001]"), ["cam.scales"]),
    ("set-tau-sweep-empty", lambda c: _stage(c, "evaluate", "--set", "evaluate.tau_sweep=[]"), ["tau_sweep"]),
    ("pipeline-missing", lambda c: ["run", "--workdir", c["w"], "--pipeline", c["tmp"] / "p.yaml"], ["p.yaml"]),
    ("pipeline-bad-yaml", lambda c: _pipeline(c, "stages: [prepare,\n"), ["pipe.yaml"]),
    ("pipeline-no-stages", lambda c: _pipeline(c, "name: x\n"), ["pipe.yaml"]),
    ("pipeline-entry-not-a-name", lambda c: _pipeline(c, "stages:\n  - [1, 2]\n"), ["pipe.yaml"]),
    ("pipeline-unknown-stage", lambda c: _pipeline(c, "stages: [prepare, dance]\n"), ["dance"]),
    ("run-until-unknown", lambda c: ["run", "--workdir", c["w"], "--until", "dance"], ["dance"]),
    # -- damaged artifacts: the error names the stage to re-run
    ("cases-json-corrupt", lambda c: _corrupt_then(c, "prepare/cases.json", _garbage, "sample", "--force"), ["cases.json"]),
    ("slices-npy-truncated", lambda c: _corrupt_case_file(c, "prepare/slices", _truncate, "sample", "--force"), ["prepare"]),
    ("tags-npy-garbage", lambda c: _corrupt_case_file(c, "prepare/tags", _garbage, "sample", "--force"), ["prepare"]),
    ("pcam-checkpoint-garbage", lambda c: _corrupt_then(c, "pcam/checkpoint_best.pt", _garbage, "sample", "--force"), ["checkpoint_best.pt"]),
    ("ccam-checkpoint-garbage", lambda c: _corrupt_then(c, "ccam/checkpoint_best.pt", _garbage, "pseudo-masks", "--force"), ["checkpoint_best.pt"]),
    ("sample-cams-truncated", lambda c: _corrupt_case_file(c, "sample/cams", _truncate, "pseudo-masks", "--force", "--set", "ccam.enabled=false"), ["sample"]),
    ("sample-coarse-missing", lambda c: _corrupt_case_file(c, "sample/coarse", Path.unlink, "train-ccam", "--force"), ["sample"]),
    ("m-s-garbage", lambda c: _corrupt_then(c, "sample/m_s.npy", _garbage, "pseudo-masks", "--force"), ["m_s.npy"]),
    ("missing-upstream-stage", lambda c: _stage(c, "predict"), ["train-seg"]),
    # -- other commands
    ("seg-masks-folder-missing", lambda c: ["train-seg", "--workdir", c["w"], "--masks", c["tmp"] / "nomasks"], ["nomasks"]),
    ("seg-mask-wrong-grid", lambda c: _seg_masks(c, "grid"), ["source grid"]),
    ("seg-mask-labels-above-k", lambda c: _seg_masks(c, "labels"), ["label values"]),
    ("seg-mask-not-integer", lambda c: _seg_masks(c, "float"), ["non-integer"]),
    ("predict-input-missing", lambda c: ["predict", "--workdir", c["w"], "--input", c["tmp"] / "none", "--output", c["tmp"] / "o"], ["none"]),
    ("predict-part-malformed", lambda c: ["predict", "--workdir", c["w"], "--input", c["tmp"], "--output", c["tmp"] / "o", "--part", "x"], ["--part"]),
    ("export-stage-unfinished", lambda c: ["export", "--workdir", c["w"], "--stage", "predict"], ["predict"]),
    ("export-out-non-empty", _export_nonempty, ["mine"]),
    ("export-out-into-prepare", lambda c: ["export", "--workdir", c["w"], "--stage", "pseudo-masks", "--out", c["w"] / "prepare"], ["prepare"]),
]


@pytest.mark.parametrize("name,build,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_line_and_damages_nothing(name, build, expect, base, phantom_manifest, tmp_path, capsys):
    w = tmp_path / "w"
    shutil.copytree(base, w)
    ctx = {"w": w, "tmp": tmp_path / "in", "manifest": phantom_manifest}
    ctx["tmp"].mkdir()
    argv = [str(a) for a in build(ctx)]
    before = tree_hash(w)
    capsys.readouterr()
    rc = ccam_main(argv)
    err = capsys.readouterr().err
    # ccam's own errors, or click's usage errors ("Error: Invalid value for '--manifest' ...")
    errors = [ln for ln in err.splitlines() if ln.startswith(("ccam: error:", "Error: "))]
    assert rc == 2, f"{name}: exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, err[-2000:]
    assert any(e in errors[0] for e in expect), f"{name}: {errors[0]!r} names none of {expect}"
    assert tree_hash(w) == before, f"{name}: the work directory changed"
    if os.environ.get("CCAM_SHOW_ERRORS"):
        print(f"\n{name}: {errors[0]}")


def test_battery_size():
    assert len(BAD) >= 60 and len({b[0] for b in BAD}) == len(BAD)


def test_hostile_ids_never_write_outside(base, phantom_manifest, tmp_path, capsys):
    """Manifest ids with '..' or an absolute path, for prepare and for predict --input: nothing appears
    outside the work directory or --output (the whole parent folder is scanned before and after)."""
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    w = root / "deep" / "er" / "w"
    shutil.copytree(base, w)
    ctx = {"w": w, "tmp": root / "in", "manifest": phantom_manifest}
    outside = Path("/tmp/evil")
    shutil.rmtree(outside, ignore_errors=True)
    for cid in ("../../../x/evil", "/tmp/evil", "../evil", "..", "a/../../evil"):
        before = tree_hash(root)
        names_before = {str(p) for p in root.rglob("*")}
        rc = ccam_main([str(a) for a in _prepare(ctx, _manifest(ctx, case0={"id": cid}))])
        rc2 = ccam_main([str(a) for a in _predict_hostile(ctx, cid)])
        capsys.readouterr()
        assert rc == 2 and rc2 == 2, cid
        new = {str(p) for p in root.rglob("*")} - names_before
        # only the bad inputs this test itself wrote into root/in
        assert all(p.startswith(str(root / "in")) for p in new), sorted(new)
        assert {k: v for k, v in tree_hash(root).items() if not k.startswith("in/")} == \
            {k: v for k, v in before.items() if not k.startswith("in/")}
        assert not outside.exists() and not (root / "x").exists()


def test_failed_command_saves_no_settings(base, tmp_path, cli):
    w = tmp_path / "w"
    shutil.copytree(base, w)
    before = (w / "config.yaml").read_bytes()
    rc, _, _ = cli("train-ccam", "--workdir", w, "--force", "--set", "runtime.device=banana")
    assert rc == 2 and (w / "config.yaml").read_bytes() == before
    rc, out, _ = cli("status", "--workdir", w)
    status = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.strip()}
    assert rc == 0 and all(status[s] == "done" for s in ("prepare", "train-pcam", "sample", "train-ccam", "pseudo-masks"))


def test_crash_of_a_rerun_brings_the_previous_outputs_back(base, tmp_path, cli, monkeypatch):
    """An error that is not a user error, in a re-run with new settings, leaves the previous outputs in place."""
    import ccam.stages.sample as sample_mod

    w = tmp_path / "w"
    shutil.copytree(base, w)
    before = tree_hash(w / "sample")

    def boom(*a, **k):
        raise RuntimeError("simulated crash in the middle of the stage")

    monkeypatch.setattr(sample_mod, "cams_for_slices", boom)
    with pytest.raises(RuntimeError):
        ccam_main(["--debug", "sample", "--workdir", str(w), "--set", "cam.tau=0.3"])
    assert tree_hash(w / "sample") == before
    assert not (w / ".previous-sample").exists()


def test_relative_manifest_is_stored_resolved(phantom_manifest, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(Path(phantom_manifest).parent)
    rc, _, err = cli("prepare", "--manifest", Path(phantom_manifest).name, "--workdir", tmp_path / "w", "--set", "data.slice_size=32")
    assert rc == 0, err
    rec = json.loads((tmp_path / "w" / "prepare" / "_stage.json").read_text())
    assert Path(rec["options"]["manifest"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    rc, out, _ = cli("status", "--workdir", tmp_path / "w")
    assert rc == 0 and out.splitlines()[1].split()[1] == "done"


def test_disk_full_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch, phantom_manifest, cli):
    """A full disk while writing (here: fallocate of the memory-mapped slice stack, and a checkpoint
    write) ends in one line naming the folder; no temp file stays behind."""
    import errno
    import os

    import ccam.io.atomic as atomic

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    rc, _, err = cli("prepare", "--manifest", phantom_manifest, "--workdir", tmp_path / "w", "--set", "data.slice_size=32")
    assert rc == 2 and "no space left" in err and "slices" in err.splitlines()[-1], err[-1500:]
    assert not list((tmp_path / "w").rglob("*.part*"))
    monkeypatch.undo()

    with pytest.raises(Exception) as e:
        with atomic.atomic_path(tmp_path / "ck" / "checkpoint_last.pt") as tmp:
            tmp.write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "no space left" in str(e.value) and "ck" in str(e.value)
    assert not list((tmp_path / "ck").iterdir())


def test_temp_files_of_a_killed_run_are_removed(base, tmp_path, cli):
    """A run killed mid-write leaves a temp file and no record; the resumed run removes the temp file."""
    from ccam import config as config_mod
    from ccam.io.atomic import write_json
    from ccam.stages.base import STARTED, StageContext, get_stage, input_key

    w = tmp_path / "w"
    shutil.copytree(base, w)
    key, _ = input_key(StageContext(w, config_mod.resolve(w), get_stage("sample"), {}))
    (w / "sample" / "_stage.json").unlink()
    write_json(w / "sample" / STARTED, {"key": key})
    left = w / "sample" / "cams" / ".case000.abc123.part.npy"
    left.write_bytes(b"half")
    rc, _, err = cli("sample", "--workdir", w)
    assert rc == 0, err[-1500:]
    assert not left.exists() and "temp file" in err


def test_outputs_follow_the_umask(base, tmp_path):
    import os
    import stat

    from ccam.io.atomic import UMASK, write_text

    write_text(tmp_path / "x.txt", "hi")
    assert stat.S_IMODE(os.stat(tmp_path / "x.txt").st_mode) == 0o666 & ~UMASK


def test_gzip_bomb_free_nifti_header_mismatch(tmp_path, cli):
    """A .nii.gz that is not gzip at all names the file (kept apart from the list above: it needs no work dir)."""
    p = tmp_path / "img.nii.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(b"\x00" * 100)
    man = tmp_path / "m.json"
    man.write_text(json.dumps({"name": "x", "modality": "MR", "classes": ["liver"],
                               "cases": [{"id": "c1", "image": "img.nii.gz", "tags": {"liver": [[0, 0]]}}]}))
    rc, _, err = cli("prepare", "--manifest", man, "--workdir", tmp_path / "w")
    assert rc == 2 and "img.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_tags_csv_with_blank_first_line_is_read(phantom_manifest, tmp_path, cli):
    """Spreadsheet exports often start with an empty line: it is skipped, not an error (was a traceback)."""
    ctx = {"tmp": tmp_path, "manifest": phantom_manifest, "w": tmp_path / "w"}
    n = nib.load(str(Path(phantom_manifest).parent / json.loads(Path(phantom_manifest).read_text())["cases"][0]["image"])).shape[2]
    rows = "\n".join(f"{i},{int(2 <= i <= 4)},0,0,0" for i in range(n))
    argv = _tags_csv(ctx, "\n\nslice,liver,right_kidney,left_kidney,spleen\n" + rows + "\n")
    rc, _, err = cli(*argv, "--set", "data.slice_size=32")
    assert rc == 0, err[-1500:]
    tags = Cohort(tmp_path / "w").case(_case0(ctx)).tags()
    assert tags[:, 0].sum() == 3 and tags[2:5, 0].all()

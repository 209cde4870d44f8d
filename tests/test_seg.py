"""`ccam train-seg`: mask sources (--masks DIR > refined > pseudo), geometry of DIR masks, errors,
validation logging, checkpoints, staleness and determinism, on the tiny phantom cohort."""

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
from ccam.io.geometry import labels_from_source
from ccam.io.volume import read_volume

# a very small U-Net and two epochs: these tests check behaviour, not accuracy
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and a busy machine cannot stall it (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FAST = ["--set", "seg.channels=[8,16,32]", "--set", "seg.epochs=2", "--set", "seg.batch_size=16", "--set", "seg.augment=false"]


def _gt_stack(case) -> np.ndarray:
    """The case's ground truth as an (N, S, S) stack: stands in for masks a user provides."""
    return labels_from_source(case.geometry, read_volume(case.mask_path).array, 5)


def _fake_pipeline_masks(w: Path, folder: str, cases, outputs: dict | None = None) -> None:
    """Write a stage folder the way `pseudo-masks`/`refine` do (labels/<id>.npy + _stage.json).

    Its labels are a fixed box on every slice: clearly different from any DIR mask."""
    co = Cohort(w)
    for c in cases:
        lab = np.zeros((c.n_slices, co.slice_size, co.slice_size), np.uint8)
        lab[:, 8:16, 8:16] = 1
        save_npy(w / folder / "labels" / f"{c.id}.npy", lab)
    write_json(w / folder / "_stage.json", {"stage": folder, "key": "k", "outputs": outputs or {}})


def test_partial_masks_folder_falls_back_to_pseudo_masks(prepared, cli, phantom_manifest, tmp_path):
    w = prepared(32)
    co = Cohort(w)
    train, val = co.split("train"), co.split("val")
    _fake_pipeline_masks(w, "pseudo_masks", co.cases)
    masks = tmp_path / "corrected"
    masks.mkdir()
    chosen = [train[0].id, train[3].id, val[0].id]  # case003 is stored slice-first
    for cid in chosen:
        shutil.copy(Path(phantom_manifest).parent / "masks" / f"{cid}.nii.gz", masks / f"{cid}.nii.gz")

    rc, _, err = cli("train-seg", "--workdir", w, "--masks", masks, *FAST)
    assert rc == 0, err
    sources = json.loads((w / "seg" / "mask_sources.json").read_text())
    assert {cid for cid, s in sources.items() if s["source"] == "masks_dir"} == set(chosen)
    assert {cid for cid, s in sources.items() if s["source"] == "pseudo_masks"} == {c.id for c in train + val} - set(chosen)
    assert "masks from masks_dir: 3 case(s)" in err and "masks from pseudo_masks: 4 case(s)" in err
    for cid in chosen:  # DIR masks went through the prepare geometry, whatever the storage order
        got = np.load(w / "seg" / "masks_from_dir" / f"{cid}.npy")
        assert np.array_equal(got, _gt_stack(co.case(cid)))
        assert got.max() > 0
    log = [json.loads(line) for line in (w / "seg" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(0.0 <= r["val_dice"] <= 1.0 and np.isfinite(r["loss"]) for r in log)
    assert {"val_dice_liver", "val_dice_spleen"} <= set(log[0])
    for name in ("checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_last.pt", "progress.png", "model.json", "_stage.json"):
        assert (w / "seg" / name).exists(), name
    ck = torch.load(w / "seg" / "checkpoint_best.pt", weights_only=True)
    assert "model" in ck
    rec = json.loads((w / "seg" / "_stage.json").read_text())
    assert rec["outputs"]["mask_sources"] == {"masks_dir": 3, "pseudo_masks": 4}

    # same inputs: skipped; an edited mask in DIR: stale, trained again
    rc, _, err = cli("train-seg", "--workdir", w, "--masks", masks)
    assert rc == 0 and "up to date, skipped" in err
    img = nib.load(masks / f"{chosen[0]}.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[data == 4] = 0  # the reviewer erased the spleen
    nib.save(nib.Nifti1Image(data, img.affine, img.header), masks / f"{chosen[0]}.nii.gz")
    rc, _, err = cli("train-seg", "--workdir", w, "--masks", masks)
    assert rc == 0 and "train-seg: running" in err
    assert not (np.load(w / "seg" / "masks_from_dir" / f"{chosen[0]}.npy") == 4).any()


def test_refined_masks_preferred_only_when_enabled(prepared, cli):
    w = prepared(32)
    co = Cohort(w)
    _fake_pipeline_masks(w, "pseudo_masks", co.cases)
    _fake_pipeline_masks(w, "refined_masks", co.cases, {"enabled": False})
    rc, _, err = cli("train-seg", "--workdir", w, *FAST)
    assert rc == 0, err
    assert {s["source"] for s in json.loads((w / "seg" / "mask_sources.json").read_text()).values()} == {"pseudo_masks"}
    _fake_pipeline_masks(w, "refined_masks", co.cases, {"enabled": True})  # a new refine record: train-seg is stale
    rc, _, err = cli("train-seg", "--workdir", w, *FAST)
    assert rc == 0 and "train-seg: running" in err
    assert {s["source"] for s in json.loads((w / "seg" / "mask_sources.json").read_text()).values()} == {"refined_masks"}


def test_no_masks_and_bad_masks_are_user_errors(prepared, cli, phantom_manifest, tmp_path):
    w = prepared(32)
    rc, _, err = cli("train-seg", "--workdir", w, *FAST)
    assert rc == 2 and "no mask for training case" in err and "pseudo-masks" in err and "--masks" in err
    assert not (w / "seg" / "_stage.json").exists()

    co = Cohort(w)
    masks = tmp_path / "m"
    masks.mkdir()
    src = Path(phantom_manifest).parent / "masks"
    for c in co.split("train"):
        shutil.copy(src / f"{c.id}.nii.gz", masks / f"{c.id}.nii.gz")
    victim = co.split("train")[1].id
    shutil.copy(src / f"{co.split('test')[0].id}.nii.gz", masks / f"{victim}.nii.gz")  # another patient's grid
    rc, _, err = cli("train-seg", "--workdir", w, "--masks", masks, *FAST)
    assert rc == 2 and f"case {victim}" in err and "source grid" in err
    assert len(err.strip().splitlines()[-1]) > 0 and "Traceback" not in err

    shutil.copy(src / f"{victim}.nii.gz", masks / f"{victim}.nii.gz")
    img = nib.load(masks / f"{victim}.nii.gz")
    bad = np.asarray(img.dataobj).copy()
    bad[0, 0, 0] = 9  # no class 9
    nib.save(nib.Nifti1Image(bad, img.affine, img.header), masks / f"{victim}.nii.gz")
    rc, _, err = cli("train-seg", "--workdir", w, "--masks", masks, *FAST)
    assert rc == 2 and f"case {victim}" in err and "0..4" in err

    rc, _, err = cli("train-seg", "--workdir", w, "--masks", tmp_path / "nowhere", *FAST)
    assert rc == 2 and "--masks folder not found" in err


def test_same_seed_same_weights(prepared, cli, phantom_manifest, tmp_path):
    src = Path(phantom_manifest).parent / "masks"
    weights = []
    for i in range(2):
        w = prepared(32)
        rc, _, err = cli("train-seg", "--workdir", w, "--masks", src, *FAST[:-2], "--set", "seg.augment=true")
        assert rc == 0, err
        weights.append(torch.load(w / "seg" / "checkpoint_final.pt", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

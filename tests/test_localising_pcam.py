"""The localising P-CAM (issue 13): local trunk, top-k / exclusive pooling, position maps, laterality prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccam.cam import multiscale_cams
from ccam.data.cohort import Cohort
from ccam.models.ccam import CCAM
from ccam.models.pcam import PCAM, class_sides, pool_scores, restrict_to_side
from ccam.training import load_checkpoint

CLASSES = ["liver", "right_kidney", "left_kidney", "spleen"]
LOCAL = ("--set", "pcam.backbone=local", "--set", "pcam.output_stride=2", "--set", "pcam.width=0.125",
         "--set", "pcam.pooling=exclusive_topk", "--set", "pcam.topk_fraction=0.02", "--set", "pcam.positional=true",
         "--set", "pcam.epochs=1", "--set", "pcam.optimizer=adam", "--set", "pcam.lr=0.002", "--set", "pcam.head_lr_mult=1",
         "--set", "cam.scales=[1.0]", "--set", "ccam.epochs=1")


def test_sides_follow_the_twin_names():
    assert class_sides(CLASSES) == [0.0, -1.0, 1.0, 0.0]
    assert class_sides(["kidney_left", "kidney_right", "liver"]) == [1.0, -1.0, 0.0]
    assert class_sides(["prostate"]) == [0.0]


def test_restrict_to_side_keeps_each_twin_on_its_own_half():
    maps = torch.ones(1, 4, 8, 10)
    out = restrict_to_side(maps, torch.tensor(class_sides(CLASSES)), margin=0.0, fill=-5.0)
    # canonical view: columns run from the patient's right (left of the image) to the patient's left
    assert (out[0, 1, :, :5] == 1).all() and (out[0, 1, :, 5:] == -5).all()  # right kidney: image left half
    assert (out[0, 2, :, 5:] == 1).all() and (out[0, 2, :, :5] == -5).all()  # left kidney: image right half
    assert (out[0, [0, 3]] == 1).all()  # no twin: anywhere
    wide = restrict_to_side(maps, torch.tensor(class_sides(CLASSES)), margin=0.5, fill=0.0)
    assert int(wide[0, 1, 0].sum()) > int(out[0, 1, 0].clamp_min(0).sum())  # the margin lets a twin cross the centre


def test_topk_pooling_is_the_mean_of_the_highest_scores():
    maps = torch.zeros(1, 2, 10, 10)
    maps[0, 0, :2, :5] = 3.0  # 10 high pixels
    maps[0, 1, 0, 0] = 30.0  # one hot spot
    logits = pool_scores(maps, "topk", topk_fraction=0.1)
    assert torch.allclose(logits, torch.tensor([[3.0, 3.0]]))  # the spot is diluted over k = 10 pixels
    assert torch.allclose(pool_scores(maps, "gap"), maps.mean(dim=(2, 3)))


def test_exclusive_pooling_makes_classes_compete_for_a_pixel():
    maps = torch.full((1, 2, 10, 10), -5.0)
    maps[0, :, :2, :5] = 4.0  # both classes claim the same region
    shared = pool_scores(maps, "exclusive_topk", 0.1)
    maps[0, 1] = -5.0  # the second class lets go of it
    alone = pool_scores(maps, "exclusive_topk", 0.1)
    assert alone[0, 0] > shared[0, 0] + 0.5  # the first class is surer once it owns the region
    assert alone[0, 0] > 0 > alone[0, 1]  # two classes sharing one region are each at best a coin toss


def test_local_trunk_keeps_resolution_and_ccam_starts_as_pcam():
    torch.manual_seed(0)
    pcam = PCAM(4, "local", 2, width=0.125, pooling="exclusive_topk", topk_fraction=0.05, positional=True,
                sides=class_sides(CLASSES)).eval()
    x = torch.randn(2, 1, 32, 32)
    assert pcam.features(x).shape == (2, 8 * 4 + 5, 16, 16)
    ccam = CCAM(4, torch.rand(5, 32, 32), backbone=pcam.backbone, pooling="exclusive_topk", topk_fraction=0.05).eval()
    ccam.init_from_pcam(pcam.state_dict())
    assert torch.equal(ccam.sides, pcam.sides)
    coarse = torch.randint(0, 5, (2, 32, 32))
    with torch.no_grad():
        assert torch.allclose(ccam(x, coarse=coarse), pcam(x), atol=1e-5)
    cams = multiscale_cams(pcam, x, torch.ones(2, 4), (1.0, 0.5))
    assert float(cams[:, 1, :, 20:].abs().sum()) == 0.0 and float(cams[:, 2, :, :12].abs().sum()) == 0.0


def test_local_pipeline_through_the_cli(prepared, cli):
    w = prepared(32)
    for stage in ("train-pcam", "sample", "train-ccam", "pseudo-masks"):
        rc, _, err = cli(stage, "--workdir", w, *LOCAL)
        assert rc == 0, err[-2000:]
    ck = load_checkpoint(w / "pcam" / "checkpoint_final.pt")["model"]
    classes = Cohort(w).classes
    assert ck["sides"].tolist() == class_sides(classes)
    assert ck["classifier.weight"].shape[1] == 8 * 4 + 5  # local trunk (64 x 0.125 x 4 channels) + 5 position maps
    # every CAM of a twin is 0 beyond its margin on the other side (canonical view, S = 32)
    right, left = classes.index("right_kidney"), classes.index("left_kidney")
    for case in Cohort(w).split("train"):
        for folder in ("sample/cams", "pseudo_masks/cams"):
            cams = np.load(w / folder / f"{case.id}.npy")
            assert not cams[:, right, :, 19:].any() and not cams[:, left, :, :13].any()


def test_stride_must_fit_the_backbone(prepared, cli):
    w = prepared(32)
    rc, _, err = cli("train-pcam", "--workdir", w, "--set", "pcam.backbone=local", "--set", "pcam.output_stride=16")
    assert rc == 2 and "output_stride" in err


def test_on_off_switches_survive_yaml_booleans(prepared, cli):
    """`--set pcam.laterality=off` is YAML for False; it must still mean "off"."""
    w = prepared(32)
    rc, _, err = cli("train-pcam", "--workdir", w, *LOCAL, "--set", "pcam.laterality=off", "--set", "pcam.flip=off")
    assert rc == 0, err[-2000:]
    assert not load_checkpoint(w / "pcam" / "checkpoint_final.pt")["model"]["sides"].any()

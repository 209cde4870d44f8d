"""Localisation diagnostics (`ccam.localisation`): pointing game, CAM mass, occlusion on hand-made arrays,
the deterministic slice choice, and `ccam evaluate` writing the section and the contact sheets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccam.config import resolve
from ccam.data.cohort import Cohort
from ccam.io.atomic import save_npy, save_torch, write_json
from ccam.io.geometry import labels_from_source
from ccam.localisation import (cam_mass_inside, dilate, localisation_report, occlude, occlusion_test, pointing_hit_rate,
                               spread_picks, tally)
from ccam.metrics import read_ground_truth
from ccam.models.pcam import PCAM

S = 16


def _gt() -> np.ndarray:
    """(2, S, S): organ 1 at rows/cols 3..6 in both slices, organ 2 at rows/cols 10..13 in slice 0 only."""
    gt = np.zeros((2, S, S), np.uint8)
    gt[:, 3:7, 3:7] = 1
    gt[0, 10:14, 10:14] = 2
    return gt


def _blob(centre: tuple[int, int], width: float = 0.8) -> np.ndarray:
    r, c = np.mgrid[:S, :S]
    return np.exp(-((r - centre[0]) ** 2 + (c - centre[1]) ** 2) / (2 * width ** 2)).astype(np.float32)


def test_peak_inside_the_organ_hits_and_keeps_the_mass_inside():
    gt, tags = _gt(), np.ones((2, 2), np.uint8)
    cams = np.stack([np.stack([_blob((4, 5)), _blob((11, 12))])] * 2)  # (2, 2, S, S), both peaks inside
    assert pointing_hit_rate(cams, gt, tags).tolist() == [1.0, 1.0]
    mass = cam_mass_inside(cams, gt, tags)
    assert (mass > 0.8).all() and (mass <= 1.0).all()
    t = tally(cams, gt, tags)
    assert t.slices.tolist() == [2, 1]  # organ 2 is absent from slice 1: not measured there


def test_peak_outside_the_organ_misses():
    gt, tags = _gt(), np.ones((2, 2), np.uint8)
    cams = np.stack([np.stack([_blob((12, 2)), _blob((2, 12))])] * 2)  # far from both organs
    assert pointing_hit_rate(cams, gt, tags).tolist() == [0.0, 0.0]
    assert (cam_mass_inside(cams, gt, tags) < 0.05).all()
    # an all-zero map has no peak: a miss, not a hit at pixel (0, 0)
    assert pointing_hit_rate(np.zeros((2, 2, S, S), np.float32), gt, tags).tolist() == [0.0, 0.0]


def test_tolerance_and_untagged_slices():
    gt = _gt()
    cams = np.zeros((2, 2, S, S), np.float32)
    cams[:, 0, 7, 7] = 1.0  # diagonal neighbour of the organ's corner (6, 6)
    cams[:, 1, 0, 0] = 1.0
    tags = np.array([[1, 1], [0, 1]], np.uint8)  # organ 1 untagged in slice 1: left out
    assert pointing_hit_rate(cams, gt, tags, tolerance=1)[0] == 1.0
    assert pointing_hit_rate(cams, gt, tags, tolerance=0)[0] == 0.0
    assert tally(cams, gt, tags).slices.tolist() == [1, 1]
    assert np.isnan(pointing_hit_rate(cams, gt, np.zeros((2, 2), np.uint8))).all()  # nothing measured: NaN


def test_occlusion_paints_the_organ_with_its_ring_and_drops_the_probability():
    img = np.full((1, S, S), 0.2, np.float32)
    img[0, 3:7, 3:7] = 1.0  # bright organ on a dark background
    img[0, 14:, :] = 0.8  # far away: outside the ring, must stay
    organ = np.zeros((1, S, S), bool)
    organ[0, 3:7, 3:7] = True
    out = occlude(img, organ, organ_px=2, ring_px=6)
    painted = dilate(organ, 2)
    assert np.allclose(out[painted], 0.2) and np.array_equal(out[~painted], img[~painted])

    class Bright(torch.nn.Module):  # "organ present" = a bright pixel anywhere in rows 0..12
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Conv2d(1, 1, 1, bias=False)

        def forward(self, x):
            return 20 * (x[:, :, :13].amax(dim=(1, 2, 3))[:, None] - 0.6)

    gt = organ.astype(np.uint8)
    occ = occlusion_test(Bright(), img, gt, np.ones((1, 1), np.uint8))
    before, after, drop = occ.means()
    assert occ.slices.tolist() == [1] and before[0] > 0.99 and after[0] < 0.01 and drop[0] > 0.98


def test_spread_picks_is_deterministic_capped_and_spread():
    flags = [np.arange(40) % 2 == 0 for _ in range(5)]  # 5 cases, 20 flagged slices each
    picks = spread_picks(flags, 10)
    assert sum(len(p) for p in picks) == 10 and all(len(p) == 2 for p in picks)
    assert all(flags[i][p].all() for i, p in enumerate(picks))
    assert [p.tolist() for p in picks] == [p.tolist() for p in spread_picks(flags, 10)]
    assert len({int(p[0]) for p in picks}) > 1  # not always the same height
    assert [len(p) for p in spread_picks(flags[:1], 100)] == [20]  # fewer than the cap: all


def _tiny_pcam(w, sets):
    """A random P-CAM checkpoint in W/pcam as train-pcam leaves it (the occlusion test only needs weights)."""
    cfg = resolve(w, None, sets)
    co = Cohort(w)
    torch.manual_seed(0)
    model = PCAM.from_config(cfg.pcam, co.num_classes)
    save_torch(w / "pcam" / "checkpoint_best.pt", {"model": model.state_dict(), "epoch": 1})
    write_json(w / "pcam" / "_stage.json", {"stage": "train-pcam", "key": "hand-made", "outputs": {}})


def test_evaluate_writes_localisation_section_and_contact_sheets(prepared, cli):
    w = prepared(32)
    sets = ("pcam.backbone=resnet10", "pcam.width=0.25", "evaluate.surface_distances=false")
    _tiny_pcam(w, sets)
    co = Cohort(w)
    k = co.num_classes
    for case in co.cases:  # coarse CAMs = the organ itself (peak inside); pseudo CAMs = the corner pixel (outside)
        small = labels_from_source(case.geometry, read_ground_truth(case).array, k + 1)
        tags = case.tags()
        inside = np.stack([(small == c + 1) for c in range(k)], axis=1).astype(np.float16) * tags[:, :, None, None]
        corner = np.zeros_like(inside)
        corner[:, :, 0, 0] = tags
        save_npy(w / "sample" / "cams" / f"{case.id}.npy", inside)
        save_npy(w / "pseudo_masks" / "cams" / f"{case.id}.npy", corner)
    write_json(w / "sample" / "_stage.json", {"stage": "sample", "key": "hand-made", "outputs": {}})
    write_json(w / "pseudo_masks" / "_stage.json", {"stage": "pseudo-masks", "key": "hand-made", "outputs": {}})

    rc, out, err = cli("evaluate", "--workdir", w, *[x for s in sets for x in ("--set", s)])
    assert rc == 0, err[-2000:]
    loc = json.loads((w / "reports" / "evaluation.json").read_text())["localisation"]
    assert "ground-truth" in loc["note"] and loc["splits"] == ["train"]
    assert set(loc["sources"]) == {"coarse", "pseudo"}
    for name, src in loc["sources"].items():
        for cls in co.classes:
            e = src["classes"][cls]
            assert e["slices"] > 0
            for v in (e["pointing_hit_rate"], e["cam_mass_inside"], e["cam_mass_inside_mean"]):
                assert 0.0 <= v <= 1.0
            want = 1.0 if name == "coarse" else 0.0
            assert e["pointing_hit_rate"] == want and e["cam_mass_inside"] == pytest.approx(want)
            o = e["occlusion"]
            if name == "coarse":  # P-CAM's probabilities: in [0, 1]; the drop is their difference
                assert 0 < o["slices"] <= e["slices"]
                assert 0.0 <= o["prob_before"] <= 1.0 and 0.0 <= o["prob_after"] <= 1.0
                assert o["drop"] == pytest.approx(o["prob_before"] - o["prob_after"], abs=1e-5)
            else:
                assert o is None
            png = w / loc["contact_sheets"][name][cls]
            assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert png.parent == w / "reports" / "localisation" and png.name == f"{name}_{cls}.png"
    assert "## Localisation (against ground truth)" in out and "| coarse (sample/cams) | liver |" in out

    # the library entry point gives the same numbers without the stage (e.g. for a benchmark)
    direct = localisation_report(w, resolve(w, None, sets), co, sheet_dir=w / "sheets", progress=False, occlusion_slices=0)
    for cls in co.classes:
        assert direct["sources"]["coarse"]["classes"][cls]["pointing_hit_rate"] == 1.0
        assert direct["sources"]["coarse"]["classes"][cls]["occlusion"] is None
    assert (w / "sheets" / "pseudo_liver.png").exists()

    rc, out, err = cli("evaluate", "--workdir", w, "--set", "evaluate.localisation=false")
    assert rc == 0, err[-2000:]
    assert "localisation" not in json.loads((w / "reports" / "evaluation.json").read_text())
    assert not list((w / "reports" / "localisation").glob("*.png"))  # no stale sheets left behind

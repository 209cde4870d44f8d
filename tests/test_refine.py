"""Affinity refinement: seeds, affinity labels, random walk, AffinityNet training resume, stage."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccam.affinity import (IGNORE, affinity_labels, background_score, confident_seeds, half_disk_offsets, random_walk,
                           seeds_to_grid, shift, transition, walk_scores)
from ccam.config import RefineConfig
from ccam.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here: on a shared 2-core machine two threads wait on each other (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# affinity labels
# ---------------------------------------------------------------------------------------------
def test_half_disk_has_the_recipes_34_offsets():
    offs = half_disk_offsets(5)
    assert len(offs) == 34 and len(set(offs)) == 34
    assert all(dy * dy + dx * dx < 25 and (dy > 0 or (dy == 0 and dx > 0)) for dy, dx in offs)


def test_affinity_labels_by_hand_and_ignore_band_excluded():
    # one row: bg bg IGNORE fg1 fg1 fg2, radius 2 -> offsets (0,1) and three that leave a 1-row grid
    grid = torch.tensor([[[0, 0, IGNORE, 1, 1, 2]]])
    offs = half_disk_offsets(2)
    bg, fg, neg = affinity_labels(grid, offs)
    right = offs.index((0, 1))
    assert bg[0, right, 0].tolist() == [1, 0, 0, 0, 0, 0]  # (0,1): bg-bg
    assert fg[0, right, 0].tolist() == [0, 0, 0, 1, 0, 0]  # (3,4): fg1-fg1
    assert neg[0, right, 0].tolist() == [0, 0, 0, 0, 1, 0]  # (4,5): fg1-fg2; (1,2), (2,3) touch the band
    others = [i for i in range(len(offs)) if i != right]
    assert (bg[0, others] + fg[0, others] + neg[0, others]).sum() == 0  # partners off the grid


def test_affinity_labels_match_brute_force_pair_enumeration():
    g = torch.Generator().manual_seed(3)
    grid = torch.randint(0, 3, (2, 7, 9), generator=g)
    grid[torch.rand(grid.shape, generator=g) < 0.25] = IGNORE
    offs = half_disk_offsets(3)
    bg, fg, neg = affinity_labels(grid, offs)
    exp = np.zeros((3,) + tuple(bg.shape))
    for b in range(2):
        for i, (dy, dx) in enumerate(offs):
            for y in range(7):
                for x in range(9):
                    y2, x2 = y + dy, x + dx
                    if not (0 <= y2 < 7 and 0 <= x2 < 9):
                        continue
                    u, v = int(grid[b, y, x]), int(grid[b, y2, x2])
                    if IGNORE in (u, v):
                        continue
                    kind = 2 if u != v else (0 if u == 0 else 1)
                    exp[kind, b, i, y, x] = 1
    for got, want in zip((bg, fg, neg), exp):
        assert np.array_equal(got.numpy(), want)
    assert (bg + fg + neg).max() == 1  # each pair in at most one set


def test_seeds_to_grid_takes_cell_centres():
    seeds = torch.zeros(1, 16, 16, dtype=torch.uint8)
    seeds[0, 4:8, 4:8] = 1  # fills the centre of cell (0, 0)..(1, 1) only where the centre pixel lies
    grid = seeds_to_grid(seeds, (2, 2))
    assert grid.tolist() == [[[1, 0], [0, 0]]]


# ---------------------------------------------------------------------------------------------
# seeds with the dense CRF
# ---------------------------------------------------------------------------------------------
def _organ_slice(s: int = 64):
    yy, xx = np.mgrid[:s, :s]
    organ = (yy - 28) ** 2 / 14 ** 2 + (xx - 30) ** 2 / 18 ** 2 <= 1
    image = np.where(organ, 0.8, 0.2).astype(np.float32)
    # a CAM that peaks inside the organ and bleeds out past its edge, as CAMs do
    cam = np.exp(-((yy - 28) ** 2 + (xx - 30) ** 2) / (2 * 12.0 ** 2)).astype(np.float32)
    return image, organ, cam[None]


def test_confident_seeds_fg_inside_bg_outside_and_an_ignore_band():
    image, organ, cams = _organ_slice()
    seeds = confident_seeds(image, cams, 4.0, 32.0, crf_iters=10, gaussian_sxy=1.0, bilateral_sxy=10.0)
    assert seeds.dtype == np.uint8 and seeds.shape == organ.shape
    assert seeds[28, 30] == 1 and seeds[0, 0] == 0 and seeds[63, 63] == 0 and seeds[63, 0] == 0
    band = seeds == IGNORE
    assert band.any()  # the two alphas disagree somewhere...
    assert (seeds == 1).sum() > 0.3 * organ.sum()  # ...but not over most of the organ
    assert ((seeds == 1) & ~organ).sum() < 0.05 * organ.sum()  # confident foreground stays in the organ
    # an untagged slice (all CAMs 0) is all background, without a CRF
    assert not confident_seeds(image, np.zeros_like(cams), 4.0, 32.0).any()


def test_missing_crf_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, _, cams = _organ_slice(16)
    with pytest.raises(UserError, match="pip install pydensecrf2"):
        confident_seeds(image, cams, 4.0, 32.0)


# ---------------------------------------------------------------------------------------------
# random walk
# ---------------------------------------------------------------------------------------------
def _mask_and_perfect_affinities(s: int = 128, radius: int = 5):
    """A label map aligned with 8 x 8 cells, its stride-8 grid, and affinities 1 within a label, 0 across."""
    mask = torch.zeros(1, s, s, dtype=torch.long)
    mask[0, 16:64, 24:80] = 1
    mask[0, 72:112, 40:104] = 2
    mask[0, 80:96, 56:72] = 0  # a hole of background inside organ 2
    grid = seeds_to_grid(mask, (s // 8, s // 8))
    aff = torch.stack([(grid == shift(grid, dy, dx, fill=-1)).float() for dy, dx in half_disk_offsets(radius)], 1)
    return mask, grid, aff


def test_random_walk_preserves_a_perfect_mask_under_perfect_affinities():
    mask, grid, aff = _mask_and_perfect_affinities()
    scores = F.one_hot(grid, 3).permute(0, 3, 1, 2).float()  # (1, C, h, w), background first
    walked = random_walk(scores, transition(aff, 5, 8.0), 5, 2 ** 8)
    assert torch.allclose(walked, scores, atol=1e-5)  # perfect scores are a fixed point
    # through the whole walk at full resolution (CAMs -> grid -> walk -> bilinear -> argmax) only
    # the corners of the 8 x 8 cells may flip
    cams = F.one_hot(mask, 3).permute(0, 3, 1, 2)[:, 1:].float() * 0.9
    full = walk_scores(cams, aff, radius=5, beta=8.0, t=8, background=background_score(cams, 16.0)).argmax(1)
    assert full.shape == mask.shape and (full == mask).float().mean() > 0.99


def test_random_walk_fills_holes_inside_a_region_of_high_affinity():
    mask, grid, aff = _mask_and_perfect_affinities()
    torch.manual_seed(0)
    onehot = F.one_hot(grid, 3).permute(0, 3, 1, 2).float()
    cams = onehot[:, 1:] * (torch.rand_like(onehot[:, 1:]) * 0.6 + 0.1)  # weak, patchy CAMs
    scores = torch.cat([torch.full_like(cams[:, :1], 0.25), cams], 1)
    assert (scores.argmax(1) != grid).float().mean() > 0.05  # many organ cells below tau before the walk
    walked = random_walk(scores, transition(aff, 5, 8.0), 5, 2 ** 8)
    assert torch.equal(walked.argmax(1), grid)
    # with uninformative affinities (all equal) the same walk smears the organs into each other
    blurred = random_walk(scores, transition(torch.ones_like(aff), 5, 8.0), 5, 2 ** 8)
    assert not torch.equal(blurred.argmax(1), grid)


# ---------------------------------------------------------------------------------------------
# AffinityNet training: resume after a crash gives the same weights
# ---------------------------------------------------------------------------------------------
class _Slices(torch.utils.data.Dataset):
    def __init__(self, n: int = 6, s: int = 48):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            img = torch.rand(1, s, s, generator=g) * 0.2
            seeds = torch.zeros(s, s, dtype=torch.long)
            y, x = 8 + 4 * i, 10 + 3 * i
            img[0, y:y + 24, x:x + 24] += 0.7
            seeds[y + 4:y + 20, x + 4:x + 20] = 1
            seeds[y:y + 24, x:x + 24][seeds[y:y + 24, x:x + 24] == 0] = IGNORE
            self.items.append({"image": img, "seeds": seeds})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_affinity_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from ccam.stages.refine import train_affinity
    from ccam.training import EpochLoop

    rc = RefineConfig(enabled=True, epochs=2, batch_size=3, lr=0.01)
    ds, dev = _Slices(), torch.device("cpu")
    full, hist = train_affinity(tmp_path / "full", ds, rc, seed=0, device=dev)
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)

    real_save = EpochLoop._save

    def crash_after_first_epoch(self, epoch, improved):
        real_save(self, epoch, improved)
        if epoch == 0:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(EpochLoop, "_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_affinity(tmp_path / "resumed", ds, rc, seed=0, device=dev)
    monkeypatch.setattr(EpochLoop, "_save", real_save)
    assert not (tmp_path / "resumed" / "checkpoint_final.pt").exists()
    resumed, hist2 = train_affinity(tmp_path / "resumed", ds, rc, seed=0, device=dev)
    assert [h["epoch"] for h in hist2] == [0, 1]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the weights did move: training is not a no-op
    from ccam.training import seed_everything

    seed_everything(0)
    fresh = type(full)(rc.backbone, rc.width).state_dict()
    assert not torch.equal(fresh["mix.weight"], a["mix.weight"])


# ---------------------------------------------------------------------------------------------
# the stage, end to end on a tiny prepared cohort
# ---------------------------------------------------------------------------------------------
FAST_UPSTREAM = ("pcam.epochs=1", "pcam.batch_size=8", "pcam.width=0.25", "ccam.epochs=1", "ccam.batch_size=8", "cam.scales=[1.0]")
FAST_REFINE = ("refine.enabled=true", "refine.epochs=1", "refine.batch_size=8", "refine.t=4")


@pytest.fixture(scope="module")
def pseudo_masked(tmp_path_factory, phantom_manifest):
    """A work dir of the 8-case phantom at S = 32 with every stage up to `pseudo-masks` done."""
    from ccam.cli import main as ccam_main

    wd = tmp_path_factory.mktemp("refine") / "w"
    sets = [x for s in FAST_UPSTREAM + ("data.slice_size=32",) for x in ("--set", s)]
    assert ccam_main(["prepare", "--manifest", str(phantom_manifest), "--workdir", str(wd), *sets]) == 0
    for stage in ("train-pcam", "sample", "train-ccam", "pseudo-masks"):
        assert ccam_main([stage, "--workdir", str(wd)]) == 0, stage
    # the stage must never read ground truth: point every case's mask at nothing
    meta = json.loads((wd / "prepare" / "cases.json").read_text())
    for c in meta["cases"]:
        c["mask"] = str(wd / "no_such_mask.nii.gz")
    (wd / "prepare" / "cases.json").write_text(json.dumps(meta))
    return wd


def _fresh(src, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(src, dst)
    return dst


def test_refine_disabled_does_no_work(pseudo_masked, tmp_path, cli):
    wd = _fresh(pseudo_masked, tmp_path)
    rc, _, err = cli("refine", "--workdir", wd)
    assert rc == 0, err
    rec = json.loads((wd / "refined_masks" / "_stage.json").read_text())
    assert rec["outputs"] == {"enabled": False}
    assert not list((wd / "refined_masks").glob("*.nii.gz")) and not (wd / "refined_masks" / "affinity").exists()


def test_refine_stage_end_to_end(pseudo_masked, tmp_path, cli):
    import nibabel as nib

    from ccam.data.cohort import Cohort

    wd = _fresh(pseudo_masked, tmp_path)
    rc, _, err = cli("refine", "--workdir", wd, *[x for s in FAST_REFINE for x in ("--set", s)])
    assert rc == 0, err
    out = wd / "refined_masks"
    rec = json.loads((out / "_stage.json").read_text())["outputs"]
    assert rec["enabled"] is True and rec["cases"] == 8 and rec["train_slices"] > 0
    assert abs(sum(rec["seed_fraction"].values()) - 1) < 1e-3
    assert (out / "affinity" / "checkpoint_final.pt").exists() and (out / "affinity" / "log.jsonl").exists()
    cohort = Cohort(wd)
    m_s = np.load(wd / "sample" / "m_s.npy")
    for case in cohort.cases:
        labels = np.load(out / "labels" / f"{case.id}.npy")
        assert labels.shape == (case.n_slices, 32, 32) and labels.dtype == np.uint8
        assert labels.max() <= cohort.num_classes
        cams = np.load(wd / "pseudo_masks" / "cams" / f"{case.id}.npy")
        assert not labels[~cams.any(axis=(1, 2, 3))].any()  # slices without CAMs stay background
        for k in range(1, cohort.num_classes + 1):  # M_s still applied after the walk
            assert not (labels == k)[:, m_s[k] == 0].any()
        img = nib.load(str(out / f"{case.id}.nii.gz"))
        src = nib.load(case.image_path)
        assert img.shape == src.shape[:3] and np.allclose(img.affine, src.affine, atol=1e-4)
        assert img.get_data_dtype() == np.uint8
    # a second run with the same settings is skipped
    rc, _, err = cli("refine", "--workdir", wd, *[x for s in FAST_REFINE for x in ("--set", s)])
    assert rc == 0 and "up to date" in err


def test_refine_without_the_crf_package_says_how_to_install(pseudo_masked, tmp_path, cli, monkeypatch):
    wd = _fresh(pseudo_masked, tmp_path)
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    rc, _, err = cli("refine", "--workdir", wd, "--set", "refine.enabled=true")
    assert rc == 2 and "pip install pydensecrf2" in err and "Traceback" not in err

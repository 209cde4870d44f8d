"""CAM extraction and `ccam sample`: untagged classes are zero, coarse masks, M_GC, M_s, resume."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import ccam.stages.sample
from ccam import cam as cam_mod
from ccam.cam import cams_for_slices, coarse_labels, gradient_cams, gradient_explainer, multiscale_cams
from ccam.data.cohort import Cohort
from ccam.models.pcam import PCAM

TRAIN = ("--set", "pcam.epochs=1", "--set", "pcam.batch_size=16", "--set", "pcam.optimizer=adam",
         "--set", "pcam.lr=0.001", "--set", "pcam.head_lr_mult=1", "--set", "pcam.width=0.25")
SAMPLE = ("--set", "cam.scales=[1.0,0.5]", "--set", "cam.tau=0.3")
_TRAINED: dict = {}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 32 px batches are per-op-overhead bound: one thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def trained(prepared, cli, tmp_path):
    """A work dir whose prepare and train-pcam stages are done (trained once per session, then copied)."""
    if "w" not in _TRAINED:
        w = prepared(32)
        rc, _, err = cli("train-pcam", "--workdir", w, *TRAIN)
        assert rc == 0, err
        _TRAINED["w"] = w
    dst = tmp_path / "trained"
    shutil.copytree(_TRAINED["w"], dst)
    return dst


def _model(k: int = 3, seed: int = 0) -> PCAM:
    torch.manual_seed(seed)
    m = PCAM(k, "resnet18", 16).eval()
    with torch.no_grad():  # a random head gives both signs; keep CAMs non-trivial
        m.classifier.weight.normal_()
    return m


def test_cams_are_zero_for_untagged_classes_and_normalised():
    model = _model(3)
    x = torch.rand(4, 1, 32, 32)
    tags = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.float32)
    cams = multiscale_cams(model, x, tags, (1.0, 0.5, 1.5))
    assert cams.shape == (4, 3, 32, 32)
    for b in range(4):
        for k in range(3):
            if tags[b, k] == 0:
                assert torch.count_nonzero(cams[b, k]) == 0
            else:
                assert float(cams[b, k].min()) >= 0
                assert float(cams[b, k].max()) == pytest.approx(1.0, abs=1e-5) or float(cams[b, k].max()) == 0
    assert coarse_labels(cams, 0.2)[1].max() == 0  # an untagged slice is all background


def test_cams_for_slices_batches_and_skips_negatives():
    model = _model(3)
    slices = np.random.default_rng(0).random((7, 32, 32), dtype=np.float32)
    tags = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)
    seen = []
    out = cams_for_slices(model, slices, tags, scales=(1.0, 0.5), batch_size=2, progress=seen.append)
    assert out.dtype == torch.float16 and out.shape == (7, 3, 32, 32)
    assert sum(seen) == 5  # the two untagged slices never reach the network
    assert torch.count_nonzero(out[[1, 4]]) == 0
    ref = multiscale_cams(model, torch.from_numpy(slices)[:, None], torch.from_numpy(tags).float(), (1.0, 0.5))
    assert torch.allclose(out.float(), ref, atol=2e-3)


def test_gradcam_matches_cam_for_a_gap_linear_head_and_methods_zero_untagged():
    # with GAP + linear head, Grad-CAM's channel weights are w_k / (h w): normalised, it equals CAM
    model = _model(2, seed=1)
    x = torch.rand(3, 1, 32, 32)
    tags = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.float32)
    cam = multiscale_cams(model, x, tags, (1.0,))
    grad = gradient_cams(gradient_explainer(model, "gradcam"), x, tags, 2, (1.0,))
    assert torch.allclose(cam, grad, atol=1e-4)
    for method in ("gradcampp", "layercam"):
        out = gradient_cams(gradient_explainer(_model(2, seed=1), method), x, tags, 2, (1.0, 0.5))
        assert out.shape == (3, 2, 32, 32)
        assert torch.count_nonzero(out[1, 1]) == 0 and torch.count_nonzero(out[2, 0]) == 0
        assert float(out[0, 0].max()) == pytest.approx(1.0, abs=1e-5)


def test_sample_writes_cams_coarse_masks_and_global_maps(trained, cli):
    w = trained
    rc, _, err = cli("sample", "--workdir", w, *SAMPLE)
    assert rc == 0, err
    cohort = Cohort(w)
    k, s, out = cohort.num_classes, cohort.slice_size, w / "sample"
    for case in cohort.cases:  # every case of every split
        cams = np.load(out / "cams" / f"{case.id}.npy")
        coarse = np.load(out / "coarse" / f"{case.id}.npy")
        tags = case.tags()
        assert cams.dtype == np.float16 and cams.shape == (case.n_slices, k, s, s)
        assert coarse.dtype == np.uint8 and coarse.shape == (case.n_slices, s, s)
        assert not cams[tags == 0].any()  # untagged classes are exactly zero
        assert np.array_equal(coarse, coarse_labels(torch.from_numpy(cams).float(), 0.3).numpy())
        img = nib.load(case.image_path)
        lab = nib.load(out / "coarse_masks" / f"{case.id}.nii.gz")
        assert lab.shape == img.shape and np.allclose(lab.affine, img.affine, atol=1e-4)
        assert np.asarray(lab.dataobj).dtype == np.uint8
        # labels on the source grid only hold classes that the slice is tagged with
        vol = case.geometry.canonical_view(np.asarray(lab.dataobj))
        for n in range(case.n_slices):
            present = set(np.unique(vol[n]).tolist()) - {0}
            assert present <= {c + 1 for c in np.flatnonzero(tags[n])}
    m_gc, m_s = np.load(out / "m_gc.npy"), np.load(out / "m_s.npy")
    assert m_gc.dtype == np.float32 and m_gc.shape == (k + 1, s, s)
    assert m_s.dtype == np.uint8 and m_s.shape == (k + 1, s, s)
    train = np.concatenate([np.load(out / "coarse" / f"{c.id}.npy") for c in cohort.split("train")])
    expected = np.stack([(train == c).mean(0) for c in range(k + 1)]).astype(np.float32)
    assert np.allclose(m_gc, expected, atol=1e-6)
    assert np.allclose(m_gc.sum(0), 1.0, atol=1e-5)
    ever = np.stack([(train == c).any(0) for c in range(k + 1)])
    assert np.array_equal(m_s.astype(bool), ever)  # M_s is 0 exactly where no coarse mask put the class
    assert ever[1:].any()  # the trained P-CAM found something, so the test above is not vacuous
    for name in ["background"] + cohort.classes:
        assert (out / f"m_gc_{name}.png").is_file() and (out / f"m_s_{name}.png").is_file()


def test_sample_eps_reruns_and_narrows_positional_indicator(trained, cli):
    w = trained
    assert cli("sample", "--workdir", w, *SAMPLE)[0] == 0
    m_gc = np.load(w / "sample" / "m_gc.npy")
    assert cli("sample", "--workdir", w, *SAMPLE, "--set", "anatomy.eps=0.05")[0] == 0
    m_s = np.load(w / "sample" / "m_s.npy")
    assert np.array_equal(m_s, (m_gc > 0.05).astype(np.uint8))
    # anatomy.enabled belongs to later stages: changing it must not make sample stale
    from ccam.config import resolve
    from ccam.stages.base import stage_status

    assert stage_status(w, resolve(w, sets=["anatomy.enabled=false"]), "sample") == "done"


def test_sample_resumes_after_a_crash_without_redoing_cases(trained, cli, monkeypatch):
    w = trained
    real = cam_mod.cams_for_slices
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in the third case")
        return real(*a, **kw)

    monkeypatch.setattr(ccam.stages.sample, "cams_for_slices", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli("sample", "--workdir", w, *SAMPLE)
    done = sorted((w / "sample" / "cams").glob("*.npy"))
    assert len(done) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    monkeypatch.setattr(ccam.stages.sample, "cams_for_slices", real)
    rc, _, err = cli("sample", "--workdir", w, *SAMPLE)
    assert rc == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps
    assert len(list((w / "sample" / "cams").glob("*.npy"))) == len(Cohort(w).cases)


def test_sample_with_gradcam_method(trained, cli):
    rc, _, err = cli("sample", "--workdir", trained, "--set", "cam.method=gradcam", "--set", "cam.scales=[1.0]")
    assert rc == 0, err
    cohort = Cohort(trained)
    case = cohort.cases[0]
    cams = np.load(trained / "sample" / "cams" / f"{case.id}.npy")
    assert not cams[case.tags() == 0].any() and cams.max() == pytest.approx(1.0, abs=1e-3)


def test_sample_needs_train_pcam(prepared, cli):
    rc, _, err = cli("sample", "--workdir", prepared(32))
    assert rc == 2 and "train-pcam" in err

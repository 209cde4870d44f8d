"""train-pcam: artifacts, tag-only validation metrics, bitwise resume, augmentation, pretrained weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ccam.data.augment import SliceAugment, random_affines, warp
from ccam.data.cohort import Cohort
from ccam.errors import UserError
from ccam.models.pcam import PCAM
from ccam.data.augment import use_flip
from ccam.stages.train_pcam import tag_metrics
from ccam.training import EpochLoop, load_checkpoint

FAST = ("--set", "pcam.epochs=2", "--set", "pcam.batch_size=16", "--set", "pcam.optimizer=adam",
        "--set", "pcam.lr=0.001", "--set", "pcam.head_lr_mult=1", "--set", "pcam.width=0.25")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 32 px batches are per-op-overhead bound: one thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_STRAIGHT: dict = {}


def _straight_run(prepared, cli):
    """An uninterrupted 2-epoch run (made once per session; read-only for the tests)."""
    if "w" not in _STRAIGHT:
        w = prepared(32)
        rc, _, err = cli("train-pcam", "--workdir", w, *FAST)
        assert rc == 0, err
        _STRAIGHT["w"] = w
    return _STRAIGHT["w"]


def test_train_pcam_artifacts_and_tag_metrics(prepared, cli):
    w = _straight_run(prepared, cli)
    d = w / "pcam"
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_final.pt", "log.jsonl", "progress.png", "_stage.json"):
        assert (d / name).is_file(), name
    lines = [json.loads(s) for s in (d / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    classes = Cohort(w).classes
    for r in lines:
        assert np.isfinite(r["loss"]) and 0 <= r["val_f1"] <= 1
        assert set(r["val_f1_class"]) == set(classes) == set(r["val_auc_class"])
    ck = load_checkpoint(d / "checkpoint_last.pt")
    assert ck["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng"} <= set(ck)
    best = load_checkpoint(d / "checkpoint_best.pt")
    assert best["val_f1"] == max(r["val_f1"] for r in lines)
    # the phantom's classes include left/right kidneys: flips must be off
    assert json.loads((d / "_stage.json").read_text())["outputs"]["flip"] is False
    # threads do not change the weights, so they do not make the stage stale; the seed and pcam settings do
    from ccam.config import resolve
    from ccam.stages.base import stage_status

    assert stage_status(w, resolve(w, sets=["runtime.num_threads=1"]), "train-pcam") == "done"
    assert stage_status(w, resolve(w, sets=["runtime.seed=1"]), "train-pcam") == "stale"
    assert stage_status(w, resolve(w, sets=["pcam.epochs=3"]), "train-pcam") == "stale"


def test_resume_after_crash_gives_bitwise_equal_weights(prepared, cli, monkeypatch):
    straight, crashed = _straight_run(prepared, cli), prepared(32)

    original = EpochLoop._save

    def save_then_die(self, epoch, improved):
        original(self, epoch, improved)
        if epoch == 0:
            raise RuntimeError("simulated crash after the first checkpoint")

    monkeypatch.setattr(EpochLoop, "_save", save_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli("train-pcam", "--workdir", crashed, *FAST)
    assert load_checkpoint(crashed / "pcam" / "checkpoint_last.pt")["epoch"] == 0
    assert not (crashed / "pcam" / "checkpoint_final.pt").exists()
    monkeypatch.setattr(EpochLoop, "_save", original)
    rc, _, err = cli("train-pcam", "--workdir", crashed, *FAST)
    assert rc == 0, err
    a = load_checkpoint(straight / "pcam" / "checkpoint_final.pt")["model"]
    b = load_checkpoint(crashed / "pcam" / "checkpoint_final.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len((crashed / "pcam" / "log.jsonl").read_text().splitlines()) == 2


def test_tag_metrics_f1_and_auc_per_class():
    tags = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.float32)
    logits = torch.tensor([[2.0, -1.0], [1.0, -2.0], [-1.0, 3.0], [0.5, -3.0]])
    m = tag_metrics(logits, tags, ["a", "b"])
    # class a: tp 2, fp 1, fn 0 -> F1 0.8; class b: tp 1, fn 1 -> F1 2/3
    f1, auc = m["val_f1_class"], m["val_auc_class"]
    assert f1["a"] == pytest.approx(0.8) and f1["b"] == pytest.approx(2 / 3)
    assert m["val_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["val_f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # tp 3, fp 1, fn 1
    assert auc["a"] == pytest.approx(1.0)  # both positives score above both negatives
    assert auc["b"] == pytest.approx(0.75)
    one_valued = tag_metrics(logits, torch.tensor([[1.0, 0]] * 4), ["a", "b"])
    assert np.isnan(one_valued["val_auc_class"]["a"])


def test_flip_follows_left_right_pair(prepared):
    cohort = Cohort(prepared(32))
    assert cohort.left_right_pair
    assert use_flip("auto", cohort.classes) is False and use_flip("on", cohort.classes) is True
    assert use_flip("auto", ["liver", "spleen"]) is True and use_flip("off", ["liver", "spleen"]) is False


def test_augment_warps_image_and_label_maps_alike():
    torch.manual_seed(0)
    labels = torch.zeros(6, 40, 40, dtype=torch.uint8)
    labels[:, 8:20, 5:18] = 1
    labels[:, 22:35, 20:36] = 2
    image = labels[:, None].float() / 2
    aug = SliceAugment(scale=(0.8, 1.2), rotate_deg=20, flip=True, intensity=0.0, translate=0.1)
    img2, lab2 = aug(image, labels, generator=torch.Generator().manual_seed(3))
    assert lab2.dtype == torch.uint8 and set(lab2.unique().tolist()) <= {0, 1, 2}
    # nearest-warped labels agree with the bilinear-warped image away from edges
    agree = (torch.round(img2[:, 0] * 2).to(torch.uint8) == lab2).float().mean()
    assert agree > 0.97
    assert not torch.equal(lab2, labels)
    # without flips every slice keeps its handedness: label 1 (left in the image) stays left of label 2
    aug_nf = SliceAugment(scale=(0.9, 1.1), rotate_deg=10, flip=False, intensity=0.0)
    _, lab3 = aug_nf(image, labels, generator=torch.Generator().manual_seed(4))
    cols = torch.arange(40).float()
    for b in range(6):
        c1 = cols[(lab3[b] == 1).nonzero()[:, 1]].mean()
        c2 = cols[(lab3[b] == 2).nonzero()[:, 1]].mean()
        assert c1 < c2


def test_flip_only_augmentation_mirrors_or_keeps_each_slice():
    x = torch.rand(16, 1, 12, 12)
    theta = random_affines(16, (1.0, 1.0), 0.0, flip=True, generator=torch.Generator().manual_seed(0))
    y = warp(x, theta)
    flipped = [torch.allclose(y[i], x[i].flip(-1), atol=1e-5) for i in range(16)]
    kept = [torch.allclose(y[i], x[i], atol=1e-5) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_intensity_jitter_changes_image_only():
    image = torch.rand(4, 1, 16, 16)
    mask = (image[:, 0] > 0.5).long()
    aug = SliceAugment(scale=(1.0, 1.0), rotate_deg=0.0, flip=False, intensity=0.2)
    out, mask2 = aug(image, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask2) and not torch.allclose(out, image)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_pretrained_weights_load_and_errors(tmp_path, prepared, cli):
    src = PCAM(3, "resnet18", 16)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pt")
    dst = PCAM(4, "resnet18", 16)  # another class count: the head is skipped, the backbone loads
    n = dst.load_pretrained(tmp_path / "w.pt")
    assert n == len(dst.backbone.state_dict())
    for k, v in dst.backbone.state_dict().items():
        assert torch.equal(v, src.backbone.state_dict()[k])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        dst.load_pretrained(tmp_path / "junk.pt")
    w = prepared(32)
    rc, _, err = cli("train-pcam", "--workdir", w, "--set", f"pcam.pretrained={tmp_path / 'missing.pt'}")
    assert rc == 2 and "pretrained weights file not found" in err

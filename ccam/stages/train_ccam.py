"""`ccam train-ccam`: the category-causality chain, C-CAM fine-tuned from P-CAM (DESIGN section 2).

Reads the prepared slices and tags, P-CAM's best checkpoint (`pcam/`), and from `sample/` the
coarse masks Coarse_i (N, S, S) of every case and the global context M_GC (C, S, S). The C-CAM
model (`ccam.models.ccam.CCAM`) starts as P-CAM with a zero weight on the location prior M_c,
and is trained with multi-label BCE on the slice tags: on positive slices (paper) or on all
(`ccam.train_on`). Geometric augmentation (random scale / rotation, never flips) warps the image
and M_c with the same affine, or is off (`ccam.augment`). Checkpoints, `log.jsonl`,
`progress.png` and resume come from `ccam.training.EpochLoop`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ccam.data.augment import random_affines, warp as warp_maps
from ccam.data.cohort import Cohort, PreparedCase, SliceDataset
from ccam.errors import UserError
from ccam.models.ccam import CCAM, resolve_coarse_encoding
from ccam.models.pcam import PCAM
from ccam.runner import Stage, StageContext, register
from ccam.training import EpochLoop, best_or_final, load_checkpoint, poly_lambda, seed_everything, select_device

log = logging.getLogger("ccam")


# -- artifacts of stage `sample` -------------------------------------------------------------
def read_global_context(sample_dir: Path, cohort: Cohort) -> np.ndarray:
    """M_GC (C, S, S) float32 from ``sample/m_gc.npy``, checked against the cohort."""
    return _read_map(Path(sample_dir) / "m_gc.npy", cohort, np.float32)


def read_positional_indicator(sample_dir: Path, cohort: Cohort) -> np.ndarray:
    """M_s (C, S, S) uint8 0/1 from ``sample/m_s.npy``, checked against the cohort."""
    return (_read_map(Path(sample_dir) / "m_s.npy", cohort, np.float32) > 0).astype(np.uint8)


def _read_map(path: Path, cohort: Cohort, dtype) -> np.ndarray:
    want = (cohort.num_classes + 1, cohort.slice_size, cohort.slice_size)
    if not path.exists():
        raise UserError("missing output of stage sample", path=str(path), fix="run `ccam sample --workdir W` first")
    try:
        arr = np.load(path).astype(dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read ({e})", path=str(path), fix="re-run `ccam sample --workdir W --force`")
    if arr.shape != want:
        raise UserError(f"shape {arr.shape}, expected (C, S, S) = {want}", path=str(path), fix="re-run `ccam sample --workdir W --force`")
    return arr


def read_coarse(sample_dir: Path, case: PreparedCase) -> np.ndarray:
    """Coarse_i of one case: (N, S, S) uint8 label map in 0..K from ``sample/coarse/<id>.npy``."""
    path = Path(sample_dir) / "coarse" / f"{case.id}.npy"
    if not path.exists():
        raise UserError("no coarse mask for this case", case=case.id, path=str(path), fix="re-run `ccam sample --workdir W --force`")
    arr = np.load(path, mmap_mode="r")
    s = case.geometry.size
    if arr.shape != (case.n_slices, s, s):
        raise UserError(f"coarse mask is {arr.shape}, expected (N, S, S) = {(case.n_slices, s, s)}", case=case.id,
                        path=str(path), fix="re-run `ccam sample --workdir W --force`")
    return arr


class CoarseSliceDataset(SliceDataset):
    """SliceDataset items plus ``coarse`` (S, S) int64: the slice's coarse mask from stage `sample`."""

    def __init__(self, cases: list[PreparedCase], sample_dir: Path, positives_only: bool = False):
        super().__init__(cases, positives_only)
        self._coarse = [read_coarse(sample_dir, c) for c in cases]

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        ci, s = self.index[i]
        item["coarse"] = torch.from_numpy(np.array(self._coarse[ci][s], dtype=np.int64))
        return item


# -- model ---------------------------------------------------------------------------------
def build_ccam(cfg, cohort: Cohort, global_context: np.ndarray) -> CCAM:
    """C-CAM on a trunk built exactly as P-CAM's (``pcam`` settings); M_GC (C, S, S) as its buffer."""
    enc = resolve_coarse_encoding(cfg.ccam.coarse_encoding, cohort.num_classes)
    trunk = PCAM.from_config(cfg.pcam, cohort.num_classes).backbone
    return CCAM(cohort.num_classes, torch.from_numpy(np.asarray(global_context, dtype=np.float32)),
                backbone=trunk, coarse_encoding=enc, pooling=cfg.pcam.pooling, topk_fraction=cfg.pcam.topk_fraction)


def load_trained_ccam(workdir: Path, cfg, cohort: Cohort, device: torch.device) -> CCAM:
    """The trained C-CAM of ``W/ccam`` (best checkpoint), in eval mode on ``device``."""
    from ccam.runner import get_stage

    sample_dir = Path(workdir) / get_stage("sample").folder
    model = build_ccam(cfg, cohort, read_global_context(sample_dir, cohort))
    path = best_or_final(Path(workdir) / STAGE.folder)
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"checkpoint does not fit the configured C-CAM ({str(e).splitlines()[0][:120]})", path=str(path),
                        fix="re-run `ccam train-ccam --workdir W --force` with the same settings")
    return model.to(device).eval()


# -- stage ---------------------------------------------------------------------------------
def run(ctx: StageContext) -> dict:
    cfg, cc = ctx.cfg, ctx.cfg.ccam
    cohort = Cohort(ctx.workdir)
    device = select_device(cfg)
    seed_everything(cfg.runtime.seed)
    sample_dir = ctx.stage_dir("sample")
    m_gc = read_global_context(sample_dir, cohort)
    positives = cc.train_on == "positives"
    train_set = CoarseSliceDataset(cohort.split("train"), sample_dir, positives)
    val_set = CoarseSliceDataset(cohort.split("val"), sample_dir, positives)
    if len(train_set) < 2:
        raise UserError(f"only {len(train_set)} {'positive ' if positives else ''}training slice(s); C-CAM needs at least 2",
                        path=str(ctx.workdir), fix="tag more slices in the manifest, or --set ccam.train_on=all")

    model = build_ccam(cfg, cohort, m_gc)
    pcam_path = best_or_final(ctx.stage_dir("train-pcam"))
    try:
        model.init_from_pcam(load_checkpoint(pcam_path)["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"P-CAM checkpoint does not fit pcam.backbone={cfg.pcam.backbone} ({str(e).splitlines()[0][:120]})",
                        path=str(pcam_path), fix="re-run `ccam train-pcam --workdir W --force` with the current settings")
    model.to(device)

    bs = min(cc.batch_size, len(train_set))
    drop_last = len(train_set) % bs == 1  # a last batch of one slice breaks batch norm
    steps = len(train_set) // bs if drop_last else math.ceil(len(train_set) / bs)
    optimizer = torch.optim.SGD(model.param_groups(cc.lr, cc.head_lr_mult), lr=cc.lr, momentum=cc.momentum, weight_decay=cc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(steps * cc.epochs, cc.poly_power))
    loop = EpochLoop(ctx.dir, model, optimizer, scheduler, epochs=cc.epochs, seed=cfg.runtime.seed,
                     select="val_loss" if len(val_set) else None, mode="min", title="train-ccam")
    criterion = torch.nn.BCEWithLogitsLoss()

    def train_epoch(epoch: int) -> dict:
        gen = torch.Generator().manual_seed(cfg.runtime.seed * 1000 + epoch)
        loader = DataLoader(train_set, batch_size=bs, shuffle=True, drop_last=drop_last, generator=gen,
                            num_workers=cfg.runtime.num_workers)
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"train-ccam {epoch + 1}/{cc.epochs}", unit="batch", dynamic_ncols=True, leave=False)
        for batch in bar:
            x, tags, coarse = batch["image"].to(device), batch["tags"].to(device), batch["coarse"].to(device)
            warp = None
            if cc.augment:
                # one affine per slice for the image and (inside the model) for M_c; never a flip
                warp = random_affines(x.shape[0], cc.aug_scale, cc.aug_rotate_deg, flip=False, generator=gen).to(device)
                x = warp_maps(x, warp)
            loss = criterion(model(x, coarse=coarse, warp=warp), tags)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * x.shape[0]
            n += x.shape[0]
            bar.set_postfix(loss=f"{total / n:.4f}")
        # how much the classifier leans on the location prior M_c (0 = still P-CAM)
        m_c_weight = float(model.classifier.weight.detach()[:, -1].abs().mean())
        return {"loss": total / max(1, n), "lr": optimizer.param_groups[0]["lr"], "m_c_weight": m_c_weight}

    def validate(epoch: int) -> dict:
        loader = DataLoader(val_set, batch_size=bs, shuffle=False, num_workers=cfg.runtime.num_workers)
        total, correct, n = 0.0, 0.0, 0
        for batch in loader:
            x, tags, coarse = batch["image"].to(device), batch["tags"].to(device), batch["coarse"].to(device)
            logits = model(x, coarse=coarse)
            total += float(criterion(logits, tags)) * x.shape[0]
            correct += float(((logits > 0).float() == tags).float().mean(1).sum())
            n += x.shape[0]
        return {"val_loss": total / max(1, n), "val_tag_accuracy": correct / max(1, n)}

    history = loop.run(train_epoch, validate if len(val_set) else None)
    last = history[-1] if history else {}
    log.info("train-ccam: %d %s training slices, coarse encoding %s, M_c weight %.4f", len(train_set),
             "positive" if positives else "", model.coarse_encoding, last.get("m_c_weight", float("nan")))
    return {"train_slices": len(train_set), "val_slices": len(val_set), "epochs": cc.epochs,
            "coarse_encoding": model.coarse_encoding, "init_from": str(pcam_path.name),
            "final_loss": last.get("loss"), "best_val_loss": loop.best, "m_c_weight": last.get("m_c_weight")}


def extra_inputs(ctx: StageContext) -> dict:
    """The ccam settings C-CAM's training uses: ``ccam.enabled`` only picks the CAMs of later stages,
    so switching it for an ablation row never retrains C-CAM."""
    return {"ccam": ctx.cfg.ccam.model_dump(mode="json", exclude={"enabled"})}


STAGE = register(Stage(
    name="train-ccam", folder="ccam", sections=("runtime", "pcam"), needs=("prepare", "train-pcam", "sample"),
    run=run, extra_inputs=extra_inputs,
    help="Train C-CAM (category-causality chain): P-CAM's backbone plus the attention-mixed location prior M_c.",
    examples="ccam train-ccam --workdir runs/demo\n"
             "ccam train-ccam --workdir runs/demo --set ccam.epochs=10 --set ccam.train_on=all",
))

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

import numpy as np
import torch
from torch.utils.data import DataLoader

from ccam import artifacts
from ccam.data.augment import random_affines, warp as warp_maps
from ccam.data.cohort import Cohort, PreparedCase, SliceDataset
from ccam.errors import UserError
from ccam.models.ccam import build_ccam
from ccam import distributed
from ccam.stages import base
from ccam.training import EpochLoop, load_checkpoint, loader_options, poly_lambda, seed_everything, select_device, shuffled_epoch

log = logging.getLogger("ccam")


# -- data ----------------------------------------------------------------------------------
class CoarseSliceDataset(SliceDataset):
    """SliceDataset items plus ``coarse`` (S, S) int64: the slice's coarse mask from stage `sample`."""

    def __init__(self, cases: list[PreparedCase], workdir, positives_only: bool = False):
        super().__init__(cases, positives_only)
        self._coarse = [artifacts.coarse(workdir, c) for c in cases]

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        ci, s = self.index[i]
        item["coarse"] = torch.from_numpy(np.array(self._coarse[ci][s], dtype=np.int64))
        return item


# -- stage ---------------------------------------------------------------------------------
def run(ctx: base.StageContext) -> dict:
    cfg, cc = ctx.cfg, ctx.cfg.ccam
    cohort = Cohort(ctx.workdir)
    device = select_device(cfg)
    seed_everything(cfg.runtime.seed)
    m_gc = artifacts.global_context(ctx.workdir, cohort)
    positives = cc.train_on == "positives"
    train_set = CoarseSliceDataset(cohort.split("train"), ctx.workdir, positives)
    val_set = CoarseSliceDataset(cohort.split("val"), ctx.workdir, positives)
    if len(train_set) < 2:
        raise UserError(f"only {len(train_set)} {'positive ' if positives else ''}training slice(s); C-CAM needs at least 2",
                        path=str(ctx.workdir), fix="tag more slices in the manifest, or --set ccam.train_on=all")

    model = build_ccam(cfg, cohort, m_gc)
    pcam_path = artifacts.checkpoint(ctx.workdir, "train-pcam")
    try:
        pcam_state = load_checkpoint(pcam_path)["model"]
    except Exception as e:  # a damaged or foreign file
        raise UserError(f"cannot read the P-CAM checkpoint ({type(e).__name__})", path=str(pcam_path),
                        fix=f"re-run `ccam train-pcam --workdir {ctx.workdir} --force`")
    try:
        model.init_from_pcam(pcam_state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
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

    net = distributed.wrap(model, device)  # DDP under torchrun; checkpoints keep the plain model

    def loss_of(batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, int]:
        x, tags, coarse = (batch[k].to(device, non_blocking=True) for k in ("image", "tags", "coarse"))
        warp = None
        if cc.augment:
            # one affine per slice for the image and (inside the model) for M_c; never a flip
            warp = random_affines(x.shape[0], cc.aug_scale, cc.aug_rotate_deg, flip=False, generator=gen).to(device)
            x = warp_maps(x, warp)
        return criterion(net(x, coarse=coarse, warp=warp), tags), x.shape[0]

    def train_epoch(epoch: int) -> dict:
        loss = shuffled_epoch(train_set, epoch=epoch, seed=cfg.runtime.seed, batch_size=bs, drop_last=drop_last,
                              **loader_options(cfg, device), desc=f"train-ccam {epoch + 1}/{cc.epochs}",
                              optimizer=optimizer, scheduler=scheduler, loss_of=loss_of)
        # how much the classifier leans on the location prior M_c (0 = still P-CAM)
        m_c_weight = float(model.classifier.weight.detach()[:, -1].abs().mean())
        return {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "m_c_weight": m_c_weight}

    def validate(epoch: int) -> dict:
        loader = DataLoader(val_set, batch_size=bs, shuffle=False, **loader_options(cfg, device))
        total, correct, n = 0.0, 0.0, 0
        for batch in loader:
            x, tags, coarse = (batch[k].to(device, non_blocking=True) for k in ("image", "tags", "coarse"))
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


STAGE = base.register(base.stage(
    "train-ccam", run,
    help="Train C-CAM (category-causality chain): P-CAM's backbone plus the attention-mixed location prior M_c.",
    examples="ccam train-ccam --workdir runs/demo\n"
             "ccam train-ccam --workdir runs/demo --set ccam.epochs=10 --set ccam.train_on=all",
))

"""`ccam train-pcam`: the P-CAM slice classifier (DESIGN section 2, "P-CAM").

Multi-label BCE on the slice tags of *all* training slices (positive and negative), MONAI ResNet
backbone at output stride 16 (`ccam.models.pcam`), SGD with the paper's lr 0.1 (head 10x) and
poly decay by default. Augmentation (`ccam.data.augment`): random scale, small rotation,
intensity jitter, and left-right flips only when no class has a left/right twin. Each epoch
logs the training loss and, on the validation split, slice-classification F1 and AUC per class
(from tags, never masks); `ccam.training.EpochLoop` checkpoints every epoch and resumes.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix
from torch.utils.data import DataLoader

from ccam.data.augment import SliceAugment, use_flip
from ccam.data.cohort import Cohort, SliceDataset
from ccam.errors import UserError
from ccam.models.pcam import PCAM
from ccam import distributed
from ccam.stages import base
from ccam.training import EpochLoop, loader_options, poly_lambda, seed_everything, select_device, shuffled_epoch

log = logging.getLogger("ccam")


def build_optimizer(model: PCAM, pc) -> torch.optim.Optimizer:
    groups = model.param_groups(pc.lr, pc.head_lr_mult)
    if pc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=pc.lr, momentum=pc.momentum, weight_decay=pc.weight_decay)
    return torch.optim.Adam(groups, lr=pc.lr, weight_decay=pc.weight_decay)


def tag_metrics(logits: torch.Tensor, tags: torch.Tensor, classes: list[str]) -> dict:
    """Slice-classification metrics from logits (N, K) and tags (N, K): F1 and ROC AUC per class.

    F1 is pooled over slices at probability 0.5; ``val_f1`` is the mean over classes (macro),
    ``val_f1_micro`` pools all (slice, class) decisions; ``val_f1_class`` / ``val_auc_class``
    map class name -> value. AUC is NaN for a class whose validation tags are all 0 or all 1.
    """
    pred = (logits > 0).float()
    cm = get_confusion_matrix(pred, tags, include_background=True)  # (N, K, 4): tp, fp, tn, fn
    per_class = cm.sum(0)
    f1 = compute_confusion_matrix_metric("f1 score", per_class).flatten()
    micro = compute_confusion_matrix_metric("f1 score", per_class.sum(0, keepdim=True)).flatten()
    with warnings.catch_warnings():  # MONAI warns for a class with one tag value; it gives NaN
        warnings.simplefilter("ignore")
        auc = compute_roc_auc(torch.sigmoid(logits), tags, average="none")
    auc = [float(a) for a in np.atleast_1d(np.asarray(auc, dtype=np.float64))]
    # per-class values go in nested dicts: log.jsonl keeps them, progress.png plots the means
    return {"val_f1": float(np.nanmean(f1.numpy())) if torch.isfinite(f1).any() else float("nan"),
            "val_f1_micro": float(micro[0]),
            "val_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
            "val_f1_class": {name: float(f) for name, f in zip(classes, f1.tolist())},
            "val_auc_class": {name: float(a) for name, a in zip(classes, auc)}}


def run(ctx: base.StageContext) -> dict:
    cfg, pc = ctx.cfg, ctx.cfg.pcam
    cohort = Cohort(ctx.workdir)
    train_cases, val_cases = cohort.split("train"), cohort.split("val")
    if not train_cases:
        raise UserError("the prepared cohort has no training case", path=str(cohort.root), fix="mark cases 'train' in the manifest and re-run `ccam prepare`")
    train_set, val_set = SliceDataset(train_cases), SliceDataset(val_cases)
    device = select_device(cfg)
    seed_everything(cfg.runtime.seed)  # the initial weights depend on the seed only
    model = PCAM.from_config(pc, cohort.num_classes, cohort.classes)
    if pc.pretrained:
        n = model.load_pretrained(pc.pretrained)
        log.info("train-pcam: %d backbone tensors from %s", n, pc.pretrained)
    model.to(device)
    flip = use_flip(pc.flip, cohort.classes)
    augment = SliceAugment.from_pcam(pc, flip)
    bs = min(pc.batch_size, len(train_set))
    # a last batch of one slice would break batch norm; dropping it loses < 1 batch per epoch
    drop_last = len(train_set) > bs and len(train_set) % bs == 1
    steps = len(train_set) // bs if drop_last else math.ceil(len(train_set) / bs)
    optimizer = build_optimizer(model, pc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(steps * pc.epochs, pc.poly_power))
    loop = EpochLoop(ctx.dir, model, optimizer, scheduler, epochs=pc.epochs, seed=cfg.runtime.seed,
                     select="val_f1" if len(val_set) else None, mode="max", title="train-pcam")
    log.info("train-pcam: %d training slices (%d positive), %d validation slices, %s %s OS%d, flip %s, device %s",
             len(train_set), sum(int(c.tags().any(1).sum()) for c in train_cases), len(val_set), pc.backbone,
             pc.optimizer, pc.stride, "on" if flip else "off", device)
    if not len(val_set):
        log.warning("train-pcam: no validation cases; checkpoint_best is the final model")

    net = distributed.wrap(model, device)  # DDP under torchrun; checkpoints keep the plain model

    def loss_of(batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, int]:
        x = augment(batch["image"].to(device, non_blocking=True), generator=gen)
        return F.binary_cross_entropy_with_logits(net(x), batch["tags"].to(device, non_blocking=True)), x.shape[0]

    def train_epoch(epoch: int) -> dict:
        loss = shuffled_epoch(train_set, epoch=epoch, seed=cfg.runtime.seed, batch_size=bs, drop_last=drop_last,
                              **loader_options(cfg, device), desc=f"train-pcam {epoch + 1}/{pc.epochs}",
                              optimizer=optimizer, scheduler=scheduler, loss_of=loss_of)
        return {"loss": loss, "lr": optimizer.param_groups[0]["lr"]}

    def validate(epoch: int) -> dict:
        loader = DataLoader(val_set, batch_size=max(bs, 32), shuffle=False, **loader_options(cfg, device))
        logits, tags = [], []
        for batch in loader:
            logits.append(model(batch["image"].to(device, non_blocking=True)).float().cpu())
            tags.append(batch["tags"])
        lg, tg = torch.cat(logits), torch.cat(tags)
        rec = {"val_loss": float(F.binary_cross_entropy_with_logits(lg, tg))}
        rec.update(tag_metrics(lg, tg, cohort.classes))
        return rec

    history = loop.run(train_epoch, validate if len(val_set) else None)
    last = history[-1] if history else {}
    return {"train_slices": len(train_set), "val_slices": len(val_set), "epochs": pc.epochs, "flip": flip,
            "final_loss": last.get("loss"), "final_val_f1": last.get("val_f1"), "final_val_auc": last.get("val_auc"),
            "best_val_f1": loop.best}


STAGE = base.register(base.stage(
    "train-pcam", run,
    help="Train P-CAM, the multi-label slice classifier whose CAMs give the coarse masks. "
         "Checkpoints every epoch; re-running resumes after the last complete epoch.",
    examples="ccam train-pcam --workdir runs/demo\n"
             "ccam train-pcam --workdir runs/demo --set pcam.epochs=20 --set pcam.backbone=resnet34\n"
             "ccam train-pcam --workdir runs/demo --set pcam.pretrained=weights/resnet18_mr.pt",
))

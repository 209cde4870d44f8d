"""`ccam train-seg`: a 2D U-Net trained on the pipeline's masks (or on a folder of corrected masks).

Masks per case, first found wins: ``--masks DIR/<case_id>.nii.gz`` (any label maps on the
source grids, e.g. masks a clinician corrected in `labels/final` of an export), then the refined
masks (when the `refine` stage ran and is enabled), then the pseudo-masks. Masks from DIR go
through the same geometry as `prepare` (``labels_from_source``); pipeline masks are read as the
(N, S, S) stacks their stage wrote. Every slice of the training cases is used, negative slices
included. Loss Dice + cross-entropy (MONAI ``DiceCELoss``), Adam lr 5e-4 (paper). Each epoch is
validated by Dice against the validation cases' masks from the same sources (never ground truth).
Review decisions (``W/review/decisions.json``, `ccam review --record/--decide`) apply on top:
rejected cases are left out, edited cases train on their mask in labels/final.

Writes ``seg/``: ``model.json`` (architecture and preprocessing, read by `predict`),
``mask_sources.json`` (case -> where its mask came from), ``masks_from_dir/<id>.npy``
(converted DIR masks), checkpoints, ``log.jsonl`` and ``progress.png`` (via `EpochLoop`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import click
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.utils import convert_to_tensor
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandScaleIntensityd, RandShiftIntensityd
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ccam import artifacts
from ccam.data.cohort import Cohort, PreparedCase, label_stack_from_file
from ccam.errors import UserError
from ccam.io.atomic import save_npy, write_json
from ccam.io.hashing import sha256_file
from ccam.io.volume import MASK_SUFFIXES, mask_file
from ccam.metrics import DiceAccumulator
from ccam.models.segmenter import Segmenter, segmenter_spec
from ccam.review.decisions import apply_decisions, decisions_hash, mask_sources_table
from ccam.progress import tqdm
from ccam import distributed
from ccam.stages import base
from ccam.training import EpochLoop, loader_options, seed_everything, select_device

log = logging.getLogger("ccam")



# -- where each case's mask comes from ---------------------------------------------------------

def extra_inputs(ctx: base.StageContext) -> dict:
    """With --masks, every mask file's content hash (the pipeline masks' records are hashed as ``uses``)."""
    out: dict = {"pipeline_masks": artifacts.pipeline_masks(ctx.workdir)}
    masks = ctx.options.get("masks")
    decided = decisions_hash(ctx.workdir, Path(masks) if masks else None)
    if decided is not None:  # review decisions (ccam review --record/--decide): a changed one re-runs the stage
        out["review_decisions"] = decided
    if masks is not None:
        d = Path(masks)
        if not d.is_dir():
            raise UserError("--masks folder not found", path=str(d), fix="pass a folder of <case_id>.nii.gz label maps")
        out["masks_dir"] = {p.name: sha256_file(p) for p in sorted(d.iterdir())
                            if p.is_file() and p.name.endswith(MASK_SUFFIXES) and not p.name.startswith(".")}
    return out


def mask_from_dir(path: Path, case: PreparedCase, num_classes: int) -> np.ndarray:
    """A label NIfTI of --masks on the case's source grid -> (N, S, S) uint8 stack; UserError if it does not fit."""
    return label_stack_from_file(path, case, num_classes)


def resolve_masks(ctx: base.StageContext, cohort: Cohort, cases: list[PreparedCase]) -> dict[str, tuple[str, Path]]:
    """case id -> (source, path of its (N, S, S) uint8 label stack); cases without any mask are left out."""
    masks_dir = Path(ctx.options["masks"]) if ctx.options.get("masks") else None
    pipe = artifacts.pipeline_masks(ctx.workdir)
    if pipe is not None and base.stage_status(ctx.workdir, ctx.cfg, pipe) != "done":
        # not an error: masks edited or written by hand in that folder are a legitimate input
        log.warning("train-seg: the %s masks are out of date (an earlier stage or its settings changed); "
                    "`ccam %s --workdir %s` would remake them", pipe, pipe, ctx.workdir)
    out: dict[str, tuple[str, Path]] = {}
    for case in cases:
        f = mask_file(masks_dir, case.id)
        if f is not None:
            stack_path = ctx.dir / "masks_from_dir" / f"{case.id}.npy"
            if not stack_path.exists():  # converted once; a resumed run reuses it (same key = same files)
                save_npy(stack_path, mask_from_dir(f, case, cohort.num_classes))
            out[case.id] = ("masks_dir", stack_path)
        elif pipe is not None and (p := artifacts.label_stack_path(ctx.workdir, pipe, case.id)).exists():
            out[case.id] = (artifacts.stage_dir(ctx.workdir, pipe).name, p)
    for cid, (_, p) in out.items():
        shape = np.load(p, mmap_mode="r").shape
        want = (cohort.case(cid).n_slices, cohort.slice_size, cohort.slice_size)
        if tuple(shape) != want:
            raise UserError(f"label stack has shape {tuple(shape)}, expected {want} (written for another prepare run)",
                            case=cid, path=str(p), fix="re-run the stage that wrote it (or `ccam run`)")
    return out


# -- data -------------------------------------------------------------------------------------

class MaskedSliceDataset(Dataset):
    """Slices with their masks: item = dict(image (1, S, S) float32, label (1, S, S) int64).

    Both stacks are memory-mapped, so the cohort never has to fit in memory. Augmentation draws
    from a seed made of (epoch seed, item index), so it is reproducible with any worker count.
    """

    def __init__(self, cases: list[PreparedCase], label_paths: dict[str, Path], augment: Optional[Compose] = None):
        self.cases, self.augment = cases, augment
        self.label_paths = [label_paths[c.id] for c in cases]
        self.index = [(ci, s) for ci, c in enumerate(cases) for s in range(c.n_slices)]
        self.epoch_seed = 0
        self._img: dict[int, np.ndarray] = {}
        self._lab: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        ci, s = self.index[i]
        if ci not in self._img:
            self._img[ci] = self.cases[ci].slices()
            self._lab[ci] = np.load(self.label_paths[ci], mmap_mode="r")
        item = {"image": torch.from_numpy(np.array(self._img[ci][s], dtype=np.float32))[None],
                "label": torch.from_numpy(np.array(self._lab[ci][s], dtype=np.int64))[None]}
        if self.augment is not None:
            self.augment.set_random_state(seed=(self.epoch_seed * 1_000_003 + i) % (2**32))
            item = self.augment(item)
            # plain tensors: MONAI MetaTensors would route every op of the network through metadata tracking
            item = {"image": convert_to_tensor(item["image"], track_meta=False).float(),
                    "label": convert_to_tensor(item["label"], track_meta=False).round().long()}
        return item


def make_augment(cfg) -> Optional[Compose]:
    """Geometric (slice and mask together) and intensity augmentation; no flips (left/right organs)."""
    if not cfg.seg.augment:
        return None
    lo, hi = cfg.seg.aug_scale
    rot = math.radians(cfg.seg.aug_rotate_deg)
    a = cfg.seg.aug_intensity
    return Compose([
        # scale_range is added to 1 by MONAI; border padding for the image, background for the mask
        RandAffined(keys=["image", "label"], prob=0.8, rotate_range=(rot,), scale_range=((lo - 1, hi - 1),) * 2,
                    mode=("bilinear", "nearest"), padding_mode=("border", "zeros")),
        RandScaleIntensityd(keys=["image"], factors=a, prob=0.8),
        RandShiftIntensityd(keys=["image"], offsets=a, prob=0.8),
        RandAdjustContrastd(keys=["image"], gamma=(1 - 2 * a, 1 + 3 * a), prob=0.5),
    ])


# -- stage ------------------------------------------------------------------------------------

@torch.no_grad()
def predict_stack(model: torch.nn.Module, slices: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """(N, S, S) normalised slices -> (N, S, S) uint8 labels, ``batch_size`` slices at a time."""
    out = np.empty(slices.shape, dtype=np.uint8)
    for a in range(0, slices.shape[0], batch_size):
        x = torch.from_numpy(np.array(slices[a:a + batch_size], dtype=np.float32))[:, None].to(device)
        out[a:a + batch_size] = model(x).max(1).indices.cpu().numpy()  # = argmax(1), faster on CPU
    return out


def run(ctx: base.StageContext) -> dict:
    cfg = ctx.cfg
    sc = cfg.seg
    cohort = Cohort(ctx.workdir)
    train_cases, val_cases = cohort.split("train"), cohort.split("val")
    sources = resolve_masks(ctx, cohort, train_cases + val_cases)
    masks_dir = Path(ctx.options["masks"]) if ctx.options.get("masks") else None
    sources, decided = apply_decisions(ctx.workdir, sources, masks_dir, ctx.dir / "edited_masks", cohort)
    rejected = {cid for cid, d in decided.items() if d["decision"] == "reject"}
    train_cases = [c for c in train_cases if c.id not in rejected]
    val_cases = [c for c in val_cases if c.id not in rejected]
    if not train_cases:
        raise UserError("every training case was rejected in review; nothing to train on", path=str(ctx.workdir),
                        fix="accept or edit some cases (`ccam review --workdir W --decide CASE accept`)")
    missing = [c.id for c in train_cases if c.id not in sources]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"no mask for training case(s) {', '.join(missing[:5])}{more}", path=str(ctx.workdir),
                        fix=f"run `ccam pseudo-masks --workdir {ctx.workdir}` (or `ccam run`), or pass --masks DIR with <case_id>.nii.gz files")
    val_cases = [c for c in val_cases if c.id in sources]
    by_source: dict[str, list[str]] = {}
    for cid, (src, _) in sources.items():
        by_source.setdefault(src, []).append(cid)
    for src, ids in sorted(by_source.items()):
        log.info("train-seg: masks from %s: %d case(s): %s", src, len(ids), ", ".join(sorted(ids)))
    if not val_cases:
        log.info("train-seg: no validation case has a mask; the final epoch's weights are kept")
    write_json(ctx.dir / "mask_sources.json", mask_sources_table(sources, decided, cohort))

    K = cohort.num_classes
    spec = segmenter_spec(sc.network, sc.channels, K + 1, sc.dropout)
    write_json(ctx.dir / "model.json", {
        "spec": spec, "classes": cohort.classes, "slice_size": cohort.slice_size, "slice_axis": cohort.slice_axis,
        "modality": cohort.modality, "ct_window": list(cfg.data.ct_window), "mr_percentiles": list(cfg.data.mr_percentiles),
    })
    seed_everything(cfg.runtime.seed)  # the initial weights depend on the seed only
    try:
        model = Segmenter.from_spec(spec)
    except ValueError as e:
        raise UserError(f"invalid segmenter settings: {e}", fix="see the seg section of configs/default.yaml")
    if -(-cohort.slice_size // model.stride) < 2:  # instance norm needs more than one pixel at the deepest level
        raise UserError(f"slices of {cohort.slice_size} px are too small for {len(sc.channels)} U-Net levels",
                        fix="use fewer seg.channels levels or a larger data.slice_size")
    device = select_device(cfg)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)  # batch Dice: empty classes in a slice do not dominate

    dataset = MaskedSliceDataset(train_cases, {c: p for c, (_, p) in sources.items()}, make_augment(cfg))
    n_per_epoch = min(len(dataset), sc.slices_per_epoch) if sc.slices_per_epoch else len(dataset)
    log.info("train-seg: %d training slices (%d per epoch), %d validation case(s), %s on %s",
             len(dataset), n_per_epoch, len(val_cases), sc.network, device)

    net = distributed.wrap(model, device)  # DDP under torchrun; checkpoints keep the plain model

    def train_epoch(epoch: int) -> dict:
        dataset.epoch_seed = cfg.runtime.seed * 1000 + epoch
        bs = distributed.local_batch(sc.batch_size)
        sampler = distributed.sampler(dataset, seed=dataset.epoch_seed, drop_last=True)  # torchrun: this rank's share
        steps = None
        if sampler is None:
            sampler = RandomSampler(dataset, num_samples=n_per_epoch)  # draws from the RNG EpochLoop seeded
        else:
            steps = max(1, n_per_epoch // (bs * distributed.world()))  # the same slices per epoch as one process
        loader = DataLoader(dataset, batch_size=bs, sampler=sampler, **loader_options(cfg, device),
                            drop_last=n_per_epoch > sc.batch_size)  # every step sees a full batch
        total, n = 0.0, 0
        for step, batch in enumerate(tqdm(loader, desc=f"train-seg epoch {epoch + 1}/{sc.epochs}", unit="batch", leave=False,
                                          dynamic_ncols=True)):
            if steps is not None and step >= steps:
                break
            x, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().item() * x.shape[0]
            n += x.shape[0]
        total, n = distributed.mean_over_ranks(total, n)
        return {"loss": total / max(n, 1)}

    def validate(epoch: int) -> dict:
        acc = DiceAccumulator(K)
        for case in val_cases:
            acc.add(predict_stack(model, case.slices(), device, sc.batch_size), np.load(sources[case.id][1], mmap_mode="r"))
        d = acc.dice()
        rec = {"val_dice": float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")}
        rec.update({f"val_dice_{name}": float(v) for name, v in zip(cohort.classes, d)})
        return rec

    loop = EpochLoop(ctx.dir, model, optimizer, epochs=sc.epochs, seed=cfg.runtime.seed,
                     select="val_dice" if val_cases else None, mode="max", title="train-seg")
    history = loop.run(train_epoch, validate if val_cases else None)
    last = history[-1] if history else {}
    return {"checkpoint": "checkpoint_best.pt", "epochs": sc.epochs, "train_cases": len(train_cases),
            "val_cases": len(val_cases), "mask_sources": {k: len(v) for k, v in sorted(by_source.items())},
            "final_loss": last.get("loss"), "best_val_dice": loop.best}


STAGE = base.register(base.stage(
    "train-seg", run, extra_inputs=extra_inputs,
    help="Train the 2D U-Net segmenter on the refined masks, else the pseudo-masks (or on --masks DIR).",
    examples="ccam train-seg --workdir runs/demo\n"
             "ccam train-seg --workdir runs/demo --masks review/labels/final --set seg.epochs=40",
    options=[click.Option(["--masks"], type=click.Path(file_okay=False), required=False,
                          help="Folder of <case_id>.nii.gz label maps on the source grids (e.g. corrected masks); "
                               "cases without a file there use the pipeline's masks.")],
))

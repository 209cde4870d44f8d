"""`ccam refine`: affinity refinement of the pseudo-masks (AffinityNet + random walk, optional).

Reads the CAMs the pseudo-masks came from (``pseudo_masks/cams/<id>.npy``, (N, K, S, S)) and
the slices; never a ground-truth mask.

1. Seeds for the training cases' tagged slices: confident foreground / background from the CAMs
   at ``alpha_low`` / ``alpha_high``, each sharpened by a dense CRF; the band where they disagree
   is ignored (``seeds/<id>.npy``, (N, S, S) uint8, 255 = ignore).
2. AffinityNet trained on the pairs of those seeds (``affinity/``: checkpoints, log, plot;
   resumed after a crash by `ccam.training.EpochLoop`).
3. Every case: random walk of [background, CAM_1..CAM_K] with T = D^-1 A^beta, 2^t steps on the
   stride-8 grid, upsampled to S x S, the anatomy chain applied when ``anatomy.enabled``
   (`ccam.anatomy.anatomy_chain`, as in stage `pseudo-masks`), argmax; written as
   ``labels/<id>.npy`` (N, S, S) uint8 and ``<id>.nii.gz`` on the source grid.

With ``refine.enabled: false`` the stage does no work; its record says ``{"enabled": false}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ccam import artifacts
from ccam.affinity import (IGNORE, affinity_labels, affinity_loss, background_score, confident_seeds, half_disk_offsets,
                           require_densecrf, seeds_to_grid, walk_scores)
from ccam.data.cohort import Cohort, PreparedCase
from ccam.errors import UserError
from ccam.io.atomic import save_npy
from ccam.io.geometry import labels_to_source
from ccam.io.volume import write_label_map
from ccam.anatomy import anatomy_chain
from ccam.models.affinity import AffinityNet
from ccam.progress import tqdm
from ccam import distributed
from ccam.stages import base
from ccam.training import EpochLoop, loader_options, poly_lambda, seed_everything, select_device

log = logging.getLogger("ccam")


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------
def crf_params(rc, size: int) -> dict:
    """CRF settings for S x S slices: kernel widths are given at S = 512 and scaled with S."""
    scale = size / 512.0
    return {"crf_iters": rc.crf_iters, "gaussian_sxy": rc.crf_gaussian_sxy * scale,
            "bilateral_sxy": rc.crf_bilateral_sxy * scale, "bilateral_srgb": rc.crf_bilateral_srgb}


def case_seeds(slices: np.ndarray, cams: np.ndarray, rc) -> np.ndarray:
    """Seeds (N, S, S) uint8 of one case from slices (N, S, S) and CAMs (N, K, S, S); 255 = ignore."""
    params = crf_params(rc, slices.shape[-1])
    out = np.zeros(slices.shape, dtype=np.uint8)
    for n in range(slices.shape[0]):
        if cams[n].any():  # untagged slices stay background
            out[n] = confident_seeds(np.asarray(slices[n]), np.asarray(cams[n], dtype=np.float32),
                                     rc.alpha_low, rc.alpha_high, **params)
    return out


class SeedSliceDataset(Dataset):
    """Tagged slices with their seeds: item = dict(image (1, S, S) float32, seeds (S, S) int64)."""

    def __init__(self, cases: list[PreparedCase], seeds_dir: Path):
        self.cases, self.seeds_dir = cases, Path(seeds_dir)
        self.index = [(ci, int(s)) for ci, c in enumerate(cases) for s in np.flatnonzero(c.tags().any(1))]
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _arrays(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
        if ci not in self._maps:
            c = self.cases[ci]
            self._maps[ci] = (c.slices(), np.load(self.seeds_dir / f"{c.id}.npy", mmap_mode="r"))
        return self._maps[ci]

    def __getitem__(self, i: int) -> dict:
        ci, s = self.index[i]
        img, seeds = self._arrays(ci)
        return {"image": torch.from_numpy(np.array(img[s], dtype=np.float32))[None],
                "seeds": torch.from_numpy(np.array(seeds[s], dtype=np.int64))}


# --------------------------------------------------------------------------------------------
# AffinityNet training
# --------------------------------------------------------------------------------------------
class _AffinityForward(torch.nn.Module):
    """AffinityNet's affinities as ``forward``, so DistributedDataParallel can wrap the training step."""

    def __init__(self, net: AffinityNet, radius: int):
        super().__init__()
        self.net, self.radius = net, radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.affinities(x, self.radius)


def train_affinity(folder: Path, dataset: Dataset, rc, *, seed: int, device: torch.device,
                   num_workers: int = 0, pin_memory: bool = False) -> tuple[AffinityNet, list[dict]]:
    """Train AffinityNet on ``dataset`` items {image (1, S, S), seeds (S, S)}; checkpointed in ``folder``.

    Re-running with the same folder resumes after the last complete epoch (same final weights).
    """
    seed_everything(seed)
    model = AffinityNet(rc.backbone, rc.width).to(device)
    offsets = half_disk_offsets(rc.radius)
    batch = min(rc.batch_size, len(dataset))
    if batch < 2:
        raise UserError(f"affinity training needs at least 2 tagged training slices, found {len(dataset)}",
                        fix="add training cases with tagged slices, or set refine.enabled=false")
    # drop_last: a lone last slice would break batch norm
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=num_workers, pin_memory=pin_memory)
    net = distributed.wrap(_AffinityForward(model, rc.radius), device)  # DDP under torchrun; checkpoints keep the plain model

    def epoch_loader(epoch: int) -> DataLoader:
        sampler = distributed.sampler(dataset, seed=seed * 1000 + epoch, drop_last=True)  # torchrun: this rank's share
        if sampler is None:
            return loader
        return DataLoader(dataset, batch_size=max(2, distributed.local_batch(batch)), sampler=sampler, drop_last=True,
                          num_workers=num_workers, pin_memory=pin_memory)
    opt = torch.optim.SGD(model.param_groups(rc.lr, rc.head_lr_mult), lr=rc.lr, momentum=rc.momentum,
                          weight_decay=rc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(rc.epochs * len(loader), rc.poly_power))

    def train_epoch(epoch: int) -> dict:
        sums = {"loss": 0.0, "bg_loss": 0.0, "fg_loss": 0.0, "neg_loss": 0.0}
        batches = epoch_loader(epoch)
        for item in tqdm(batches, desc=f"affinity epoch {epoch + 1}/{rc.epochs}", unit="batch", leave=False, dynamic_ncols=True):
            x = item["image"].to(device, non_blocking=True)
            aff = net(x)
            grid = seeds_to_grid(item["seeds"].to(device), tuple(aff.shape[-2:]))
            loss, parts = affinity_loss(aff, *affinity_labels(grid, offsets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["loss"] += loss.detach().item()
            for k, v in parts.items():
                sums[k] += v
        return {k: v / max(1, len(batches)) for k, v in sums.items()} | {"lr": opt.param_groups[0]["lr"]}

    loop = EpochLoop(folder, model, opt, sched, epochs=rc.epochs, seed=seed, title="affinity")
    history = loop.run(train_epoch)
    model.eval()
    return model, history


# --------------------------------------------------------------------------------------------
# random walk
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def refine_stack(model: AffinityNet, slices: np.ndarray, cams: np.ndarray, rc, *, tau: float,
                 m_s: np.ndarray | None, device: torch.device, batch_size: int = 8) -> np.ndarray:
    """Refined labels (N, S, S) uint8 from slices (N, S, S) and CAMs (N, K, S, S) of one case.

    Slices without any CAM are background (as in the unrefined masks); the others go through the
    walk, then M_s (C, S, S) zeroes each class where it never occurs, then argmax.
    """
    n, s = slices.shape[0], slices.shape[-1]
    out = np.zeros((n, s, s), dtype=np.uint8)
    todo = [i for i in range(n) if np.asarray(cams[i]).any()]
    for a in range(0, len(todo), batch_size):
        idx = todo[a:a + batch_size]
        x = torch.from_numpy(np.array(slices[idx], dtype=np.float32))[:, None].to(device)
        cam = torch.from_numpy(np.array(cams[idx], dtype=np.float32)).to(device)
        bg = tau if rc.background == "tau" else background_score(cam, rc.bg_alpha)
        scores = walk_scores(cam, model.affinities(x, rc.radius), radius=rc.radius, beta=rc.beta, t=rc.t, background=bg)
        if m_s is not None:
            scores[:, 1:] = anatomy_chain(scores[:, 1:], m_s)  # a class stays 0 where it never occurs
        out[idx] = scores.max(1).indices.to(torch.uint8).cpu().numpy()  # = argmax(1), faster on CPU
    return out


# --------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------
def _seeds_and_affinity(ctx: base.StageContext, cohort: Cohort, device: torch.device):
    """Steps 1 and 2: seeds of the training cases and the trained AffinityNet; (model, history, dataset, seed counts).

    Held under an exclusive lock on ``refined_masks/.affinity.lock``: parallel parts (`--part i/n`)
    train it once, the others wait and then load it (`EpochLoop` resumes after the last epoch).
    """
    import fcntl

    cfg, rc = ctx.cfg, ctx.cfg.refine
    k = cohort.num_classes
    train = cohort.split("train")
    seeds_dir = ctx.dir / "seeds"
    ctx.dir.mkdir(parents=True, exist_ok=True)

    def make_seeds() -> None:  # 1. seeds for the training cases (cached per case: a resumed run skips the done ones)
        for case in tqdm(train, desc="refine seeds", unit="case", dynamic_ncols=True):
            path = seeds_dir / f"{case.id}.npy"
            if not path.exists():
                save_npy(path, case_seeds(case.slices(), artifacts.cam_stack(ctx.workdir, "pseudo-masks", case, k), rc))

    # torchrun: rank 0 makes the seeds, then every rank trains AffinityNet data-parallel (no file lock:
    # the ranks meet at barriers); parts (--part i/n): the first part makes them and trains, under the lock
    with open(ctx.dir / ".affinity.lock", "a+") as lock:
        if distributed.active():
            if distributed.is_main():
                make_seeds()
            distributed.barrier()
        else:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            make_seeds()
        counts = np.zeros(3)  # background, foreground, ignore pixels of tagged slices
        for case in train:
            seeds = np.load(seeds_dir / f"{case.id}.npy")[case.tags().any(1)]
            counts += [(seeds == 0).sum(), ((seeds > 0) & (seeds != IGNORE)).sum(), (seeds == IGNORE).sum()]
        # 2. AffinityNet on the seeds' pairs
        dataset = SeedSliceDataset(train, seeds_dir)
        model, history = train_affinity(ctx.dir / "affinity", dataset, rc, seed=cfg.runtime.seed, device=device,
                                        **loader_options(cfg, device))
    return model, history, dataset, counts


def _walk(ctx: base.StageContext, cohort: Cohort, model: AffinityNet, cases: list[PreparedCase], device: torch.device) -> None:
    """Step 3 for ``cases`` (those without labels and label map yet)."""
    cfg, rc = ctx.cfg, ctx.cfg.refine
    k = cohort.num_classes
    m_s = artifacts.positional_indicator(ctx.workdir, cohort) if cfg.anatomy.enabled else None
    todo = [c for c in cases if not (artifacts.label_stack_path(ctx.workdir, "refine", c.id).exists()
                                     and artifacts.mask_path(ctx.workdir, "refine", c.id).exists())]
    # slices per forward pass + walk: the walk's cost is mostly per step, so big batches pay off;
    # scaled with S so the trunk's activations stay ~ those of 32 slices at 128 x 128
    walk_batch = max(1, min(32, 32 * 128 * 128 // cohort.slice_size ** 2))
    for case in tqdm(todo, desc="refine walk", unit="case", dynamic_ncols=True):
        lab_path, nii_path = artifacts.label_stack_path(ctx.workdir, "refine", case.id), artifacts.mask_path(ctx.workdir, "refine", case.id)
        cams = artifacts.cam_stack(ctx.workdir, "pseudo-masks", case, k)
        labels = refine_stack(model, case.slices(), cams, rc, tau=cfg.cam.tau, m_s=m_s, device=device, batch_size=walk_batch)
        save_npy(lab_path, labels)
        g = case.geometry
        write_label_map(nii_path, labels_to_source(g, labels, k + 1), g.affine_array, n_labels=k,
                        qform_code=g.qform_code, sform_code=g.sform_code)


def part_cases(ctx: base.StageContext) -> list[PreparedCase]:
    """The cases of the walk, in a fixed order (`ccam.parts` gives part i/n every n-th from the i-th)."""
    return Cohort(ctx.workdir).cases


def run_part(ctx: base.StageContext, cases: list[PreparedCase]) -> None:
    """The random walk of ``cases``; the first part to get there makes the seeds and trains AffinityNet."""
    if not ctx.cfg.refine.enabled:
        return
    require_densecrf()
    cohort = Cohort(ctx.workdir)
    device = select_device(ctx.cfg)
    model = _seeds_and_affinity(ctx, cohort, device)[0]
    _walk(ctx, cohort, model, cases, device)


def run(ctx: base.StageContext) -> dict:
    cfg, rc = ctx.cfg, ctx.cfg.refine
    if not rc.enabled:
        log.info("refine: refine.enabled is false; nothing to do (train-seg uses the unrefined pseudo-masks)")
        return {"enabled": False}
    require_densecrf()  # fail before any work when the CRF package is missing
    cohort = Cohort(ctx.workdir)
    device = select_device(cfg)
    model, history, dataset, counts = _seeds_and_affinity(ctx, cohort, device)
    if distributed.active() and not distributed.is_main():
        return {}  # torchrun: rank 0 walks and writes the record

    # 3. random walk for every case
    _walk(ctx, cohort, model, cohort.cases, device)
    changed = total = 0
    for case in cohort.cases:
        labels = np.load(artifacts.label_stack_path(ctx.workdir, "refine", case.id))
        before = artifacts.label_stack_path(ctx.workdir, "pseudo-masks", case.id)
        if before.exists():
            changed += int((np.load(before) != labels).sum())
            total += labels.size
    frac = counts / max(1.0, counts.sum())
    return {"enabled": True, "cases": len(cohort.cases), "train_slices": len(dataset),
            "seed_fraction": {"background": round(float(frac[0]), 4), "foreground": round(float(frac[1]), 4),
                              "ignore": round(float(frac[2]), 4)},
            "final_loss": round(float(history[-1]["loss"]), 5) if history else None,
            "changed_fraction": round(changed / total, 5) if total else None}


STAGE = base.register(base.stage(
    "refine", run,
    help="Refine pseudo-masks with AffinityNet and a random walk (optional; refine.enabled). "
         "Writes refined_masks/<case>.nii.gz on the source grid and labels/<case>.npy.",
    examples="ccam refine --workdir runs/demo --set refine.enabled=true\n"
             "ccam refine --workdir runs/demo --set refine.enabled=true --set refine.t=6 --set refine.beta=10",
))

"""Shared machinery of the training stages: device, seeding, and a checkpointed epoch loop.

`EpochLoop` owns everything a crash must not lose: after every epoch it writes
``checkpoint_last.pt`` (model, optimiser, scheduler, RNG states, epoch, history) atomically,
``checkpoint_best.pt`` when the selection metric improves, ``log.jsonl`` and ``progress.png``.
Re-running resumes after the last complete epoch. Each epoch re-seeds every RNG from
(seed, epoch), so on CPU a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ccam.io.atomic import atomic_path, save_torch, write_text

log = logging.getLogger("ccam")


def select_device(cfg) -> torch.device:
    want = cfg.runtime.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def loader_options(cfg, device: torch.device) -> dict:
    """DataLoader keywords from ``runtime``: worker processes (`ccam.threads.resolve_workers`) and,
    on CUDA, pinned host memory so ``.to(device, non_blocking=True)`` copies overlap compute."""
    from ccam.threads import resolve_workers

    workers = resolve_workers(cfg.runtime.num_workers, torch.get_num_threads(), device.type)
    return {"num_workers": workers, "pin_memory": device.type == "cuda"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


AUGMENT_SEED = 1 << 40  # offsets the augmentation stream from the shuffle's


def shuffled_epoch(dataset, *, epoch: int, seed: int, batch_size: int, drop_last: bool, num_workers: int, desc: str,
                   optimizer: torch.optim.Optimizer, scheduler=None,
                   loss_of: Callable[[dict, torch.Generator], tuple[torch.Tensor, int]], pin_memory: bool = False) -> float:
    """One training epoch over ``dataset`` shuffled by a generator seeded with (seed, epoch); returns the mean loss.

    ``loss_of(batch, generator)`` gives (loss, slices in the batch); the generator passed on for
    augmentation is seeded by (seed, epoch) too, so an epoch is reproducible on its own (a resumed
    run draws what the uninterrupted one drew). It is not the one that shuffles: DataLoader
    workers read the shuffled order ahead of the training loop, so a shared generator would make
    the augmentation depend on the number of workers.
    """
    from torch.utils.data import DataLoader

    from ccam import distributed
    from ccam.progress import tqdm

    gen = torch.Generator().manual_seed(seed * 1000 + epoch)  # the shuffle
    augment_gen = torch.Generator().manual_seed(AUGMENT_SEED + seed * 1000 + epoch)
    dist_sampler = distributed.sampler(dataset, seed=seed * 1000 + epoch, drop_last=drop_last)  # torchrun: this rank's share
    if dist_sampler is not None:
        loader = DataLoader(dataset, batch_size=distributed.local_batch(batch_size), sampler=dist_sampler, drop_last=drop_last,
                            num_workers=num_workers, pin_memory=pin_memory)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=gen,
                            num_workers=num_workers, pin_memory=pin_memory)
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    for batch in bar:
        loss, size = loss_of(batch, augment_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * size
        n += size
        bar.set_postfix(loss=f"{total / n:.4f}")
    total, n = distributed.mean_over_ranks(total, n)
    return total / max(1, n)


def poly_lambda(total_steps: int, power: float) -> Callable[[int], float]:
    """Poly decay (1 - step / total) ** power, stepped once per iteration."""
    total = max(1, total_steps)
    return lambda step: max(0.0, 1.0 - step / total) ** power


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(model: torch.nn.Module, path: Path) -> dict:
    """Load ``checkpoint_best.pt``/``checkpoint_final.pt``/``checkpoint_last.pt`` into ``model``."""
    ck = load_checkpoint(path)
    model.load_state_dict(ck["model"])
    return ck


def best_or_final(folder: Path) -> Path:
    for name in ("checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_last.pt"):
        if (folder / name).exists():
            return folder / name
    from ccam.errors import UserError

    raise UserError("no checkpoint found", path=str(folder), fix="run the training stage first")


class EpochLoop:
    """Run ``epochs`` epochs of ``train_epoch(epoch) -> dict`` (+ optional ``validate(epoch) -> dict``)."""

    def __init__(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler=None, *, epochs: int, seed: int, select: Optional[str] = None,
                 mode: str = "max", title: str = ""):
        self.folder = Path(folder)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.epochs, self.seed, self.select, self.mode, self.title = epochs, seed, select, mode, title
        self.history: list[dict] = []
        self.best: Optional[float] = None
        self.start_epoch = 0

    # -- resume -----------------------------------------------------------------------------
    def resume(self) -> int:
        p = self.folder / "checkpoint_last.pt"
        if not p.exists():
            return 0
        try:
            ck = load_checkpoint(p)
        except Exception as e:  # a damaged file: start again rather than crash
            log.warning("%s: cannot read %s (%s); starting from scratch", self.title, p.name, e)
            return 0
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None and ck.get("scheduler") is not None:
            self.scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        self.history = list(ck.get("history", []))
        self.best = ck.get("best")
        self.start_epoch = int(ck["epoch"]) + 1
        log.info("%s: resuming after epoch %d of %d", self.title, self.start_epoch, self.epochs)
        return self.start_epoch

    # -- loop -------------------------------------------------------------------------------
    def run(self, train_epoch: Callable[[int], dict], validate: Optional[Callable[[int], dict]] = None) -> list[dict]:
        from ccam import distributed

        self.folder.mkdir(parents=True, exist_ok=True)
        distributed.barrier()  # rank 0 may still be writing the previous epoch's checkpoint
        self.resume()
        starts = distributed.gather_int(self.start_epoch)  # under torchrun: every rank read the same checkpoint
        if len(set(starts)) > 1:
            from ccam.errors import UserError

            raise UserError(f"the ranks would resume from different epochs ({starts}, in rank order)", path=str(self.folder),
                            fix="give every rank the same work directory (a shared file system), then re-run")
        if self.start_epoch and len(starts) > 1:
            log.info("%s: all %d ranks resume after epoch %d", self.title, len(starts), self.start_epoch)
        for epoch in range(self.start_epoch, self.epochs):
            seed_everything(self.seed * 1000 + epoch)
            t0 = time.time()
            self.model.train()
            rec = {"epoch": epoch}
            rec.update(train_epoch(epoch))
            if validate is not None:
                self.model.eval()
                with torch.no_grad():
                    rec.update(validate(epoch))
            rec["time_s"] = round(time.time() - t0, 2)
            self.history.append(rec)
            improved = False
            if self.select is not None and rec.get(self.select) is not None and not math.isnan(rec[self.select]):
                v = float(rec[self.select])
                if self.best is None or (v > self.best if self.mode == "max" else v < self.best):
                    self.best, improved = v, True
            self._save(epoch, improved)
            msg = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if not isinstance(v, (list, dict)))
            log.info("%s: %s", self.title, msg)
        from ccam import distributed

        if distributed.is_main():
            save_torch(self.folder / "checkpoint_final.pt", {"model": self.model.state_dict(), "epoch": self.epochs - 1})
            if not (self.folder / "checkpoint_best.pt").exists():
                save_torch(self.folder / "checkpoint_best.pt", {"model": self.model.state_dict(), "epoch": self.epochs - 1})
        distributed.barrier()  # every rank returns once the final weights are on disk
        return self.history

    def _save(self, epoch: int, improved: bool) -> None:
        from ccam import distributed

        if not distributed.is_main():  # under torchrun rank 0 alone writes
            return
        ck = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state()},
            "history": self.history,
            "best": self.best,
        }
        if improved:
            save_torch(self.folder / "checkpoint_best.pt", {"model": ck["model"], "epoch": epoch, self.select: self.best})
        save_torch(self.folder / "checkpoint_last.pt", ck)
        import json

        write_text(self.folder / "log.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        plot_progress(self.folder / "progress.png", self.history, self.title)


def plot_progress(path: Path, history: list[dict], title: str = "") -> None:
    """One panel per numeric metric against epoch (losses and validation metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("epoch", "time_s") and isinstance(history[0][k], (int, float))] if history else []
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    ep = [h["epoch"] for h in history]
    for ax, k in zip(axes.flat, keys):
        ax.plot(ep, [h.get(k, float("nan")) for h in history], marker="o")
        ax.set_title(k)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)

"""Data-parallel training on torch.distributed (issue 12): `torchrun --nproc_per_node N ccam train-pcam -w W`.

Under torchrun (``WORLD_SIZE`` > 1) a training stage runs DistributedDataParallel: gloo on CPU,
NCCL on CUDA; each rank draws a disjoint share of every epoch's shuffled slices
(`torch.utils.data.DistributedSampler`, seeded like the single-process loop) with the global batch
split over the ranks, gradients are averaged by DDP, and **rank 0 alone** writes checkpoints, logs
and the stage record. Every rank resumes from the same ``checkpoint_last.pt``. Without torchrun
nothing here does anything and the stage is the single-process one.

If one rank fails, torchrun ends the others and the failing rank's one-line error is the message.
"""

from __future__ import annotations

import datetime
import os

import torch

TRAINING_STAGES = ("train-pcam", "train-ccam", "train-seg", "refine")  # refine: the AffinityNet; rank 0 makes seeds and walks


def world() -> int:
    """Number of processes of this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def setup(device: torch.device) -> bool:
    """Join the process group under torchrun (once); True when running distributed."""
    if world() <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model to train with: DDP under torchrun (gradients averaged over ranks), else the model itself.
    Checkpoints and evaluation use the unwrapped model, so a checkpoint loads into a single-process model."""
    if not active():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def local_batch(batch_size: int) -> int:
    """This rank's share of a global batch."""
    return max(1, batch_size // world()) if active() else batch_size


def sampler(dataset, *, seed: int, drop_last: bool):
    """A shuffling DistributedSampler seeded with ``seed`` (None outside torchrun: the loader shuffles)."""
    if not active():
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world(), rank=rank(), shuffle=True, seed=seed, drop_last=drop_last)


def mean_over_ranks(total: float, count: int) -> tuple[float, int]:
    """(sum, count) summed over every rank, for a loss averaged over the global batch."""
    if not active():
        return total, count
    t = torch.tensor([float(total), float(count)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t[0]), int(t[1])


def gather_int(value: int) -> list[int]:
    """``value`` of every rank, in rank order (``[value]`` outside torchrun)."""
    if not active():
        return [value]
    t = torch.tensor([int(value)], dtype=torch.int64)
    out = [torch.zeros_like(t) for _ in range(world())]
    torch.distributed.all_gather(out, t)
    return [int(x) for x in out]

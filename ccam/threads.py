"""CPU threads: how many, and how idle OpenMP threads wait (issue 12).

Why a stage crawled on a busy machine: torch's CPU kernels run on an OpenMP team (GNU libgomp in
the pip wheels) of one thread per core. Between two parallel regions, and at the barrier that ends
each one, libgomp's idle threads *spin* (by default ~300 000 iterations, milliseconds) before they
sleep. With one other CPU-bound process on a 2-core machine there are three runnable threads for
two cores: the torch thread that shares a core with the competitor is often descheduled, and its
team mate burns its own time slice spinning at the barrier instead of letting the scheduler run
anybody useful. Every one of the thousands of small parallel regions of an epoch pays for that
(benchmarks/under_load.py: several times the idle wall time, the issue saw 17x).

The fix, in code: ``GOMP_SPINCOUNT=1000`` (idle OpenMP threads spin briefly, then sleep on a
futex) set in the environment *before torch loads libgomp* (libgomp reads it once, when it is
loaded), by `prepare_openmp`, which `ccam/__init__.py` calls. It changes no arithmetic, so results
stay bit-identical; an ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the user set wins.
``CCAM_OMP_WAIT=default`` leaves libgomp's own default in place (benchmarks measure the "before"
with it), ``CCAM_OMP_WAIT=passive`` sleeps at once.

The thread count does change floating-point reduction order (a model trained with 1 and 2 threads
differs), so it is *not* adapted to the load: ``runtime.num_threads: 0`` means the cores this
process may use (`os.sched_getaffinity`, capped by a cgroup CPU quota, by ``OMP_NUM_THREADS``
and by a thread count the host program set before calling ccam), fixed for the run, and the same
seed on the same machine gives the same weights whatever else runs.

This module imports nothing heavy: `prepare_openmp` must run before ``import torch``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("ccam")

SPINCOUNT = 1000  # iterations an idle OpenMP thread spins before it sleeps (libgomp's default is 300 000)
OPT_OUT = "CCAM_OMP_WAIT"  # "default": keep libgomp's spin-then-sleep default (benchmarks' "before")
_STATE: dict = {"openmp": None, "host": None}


def prepare_openmp(environ: Optional[dict] = None) -> str:
    """Choose how idle OpenMP threads wait; must run before torch is imported. Returns the policy in effect.

    Sets ``GOMP_SPINCOUNT=1000`` (idle threads spin ~1000 iterations, then sleep) unless the user set
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (theirs is kept) or ``CCAM_OMP_WAIT`` says otherwise:
    ``default`` keeps libgomp's default, ``passive`` sleeps at once (OMP_WAIT_POLICY=PASSIVE).
    The short spin was as fast alone as fully passive or faster, with the same gain under load;
    both are ~20 % slower than libgomp's default on an idle machine (benchmarks/under_load.py).
    """
    env = os.environ if environ is None else environ
    choice = env.get(OPT_OUT, "").lower()
    if "OMP_WAIT_POLICY" in env:
        policy = f"{env['OMP_WAIT_POLICY'].lower()} (set by the user)"
    elif "GOMP_SPINCOUNT" in env:
        policy = f"spin {env['GOMP_SPINCOUNT']} then sleep (set by the user)"
    elif choice == "default":
        policy = "libgomp default (spin, then sleep)"
    elif choice == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        policy = "passive"
    else:
        env["GOMP_SPINCOUNT"] = str(SPINCOUNT)
        policy = f"spin {SPINCOUNT} then sleep"
    if environ is None:
        _STATE["openmp"] = policy
    return policy


def openmp_policy() -> str:
    """The wait policy chosen by `prepare_openmp` in this process, or what the environment says."""
    if _STATE["openmp"] is not None:
        return _STATE["openmp"]
    v = os.environ.get("OMP_WAIT_POLICY")
    return f"{v.lower()} (environment)" if v else "libgomp default (spin, then sleep)"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``: "quota period"), or None without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(0.01, int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def resolve_threads(requested: int, host: Optional[int] = None) -> int:
    """``runtime.num_threads``: a number > 0 as asked; 0 = `available_cores`, or fewer when the host
    chose fewer: ``OMP_NUM_THREADS``, or ``host``, the torch thread count the process had before
    ccam first set it (a program that calls ccam after ``torch.set_num_threads(1)`` keeps 1)."""
    if requested > 0:
        return requested
    n = available_cores()
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    if host is not None and host > 0:
        n = min(n, host)
    return n


CUDA_WORKERS = 4  # auto on CUDA: at most this many (the loaders only read memory-mapped slices)


def resolve_workers(requested: "int | str", threads: Optional[int] = None, device: str = "cpu") -> int:
    """DataLoader worker processes for ``runtime.num_workers``.

    ``auto`` (the default) matches them to the compute threads. On CPU: the cores those threads
    leave free, so at the default thread count (every usable core) 0, loading in the main
    process: the datasets only read memory-mapped slices and the augmentation runs by batch on
    the compute threads, so a worker would compete with them for the same cores (train-pcam on 2
    cores: 5.7 s without a worker, 7.6 s with one; ``benchmarks/workers.py``). With
    ``runtime.num_threads: 1`` on 2 cores, auto gives the free core 1 worker. On CUDA the compute
    runs on the GPU: ``min(4, cores - 1)`` workers keep the next batches coming. Under torchrun the
    ranks of one machine share its cores.
    0 keeps loading in the main process; a number > 0 is used as given (e.g. slow network
    storage), capped at the cores this process may use minus one.
    """
    cores = available_cores()
    if requested == "auto":
        # torchrun: the ranks of this machine share its cores (LOCAL_WORLD_SIZE processes)
        local = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
        ranks = max(1, int(local)) if local.isdigit() else 1
        if str(device).startswith("cuda"):
            return max(0, min(CUDA_WORKERS, cores // ranks - 1))
        used = resolve_threads(0, _STATE.get("host")) if threads is None else threads
        return max(0, (cores - used * ranks) // ranks)
    if int(requested) <= 0:
        return 0
    return max(1, min(int(requested), cores - 1))


def apply(num_threads: int, num_workers: "int | str" = "auto", device: str = "cpu") -> dict:
    """Set torch's intra-op threads (and one inter-op thread) for this process and log the choice.

    Returns what was chosen: ``threads``, ``interop_threads``, ``cores``, ``workers``, ``openmp_wait``.
    """
    import torch

    if _STATE.get("host") is None:
        _STATE["host"] = torch.get_num_threads()
    threads = resolve_threads(num_threads, _STATE["host"])
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        # ccam never runs independent ops concurrently (no torch.jit.fork): one inter-op thread is
        # enough and keeps the process from owning two pools of threads per core
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work has started: keep it
        pass
    chosen = {"threads": threads, "interop_threads": torch.get_num_interop_threads(), "cores": available_cores(),
              "workers": resolve_workers(num_workers, threads, device), "openmp_wait": openmp_policy(), "device": device}
    log.info("runtime: %d compute thread(s) on %d usable core(s)%s, OpenMP wait %s, %d DataLoader worker(s)%s, device %s",
             threads, chosen["cores"], "" if num_threads <= 0 else " (runtime.num_threads)", chosen["openmp_wait"],
             chosen["workers"], " (auto)" if num_workers == "auto" else "", device)
    return chosen

"""``--part i/n`` for the per-case stages (nnU-Net's convention): n processes split the cases.

``ccam sample -w W --part i/n`` (also ``pseudo-masks``, ``refine``, ``predict``) does the per-case
work of every n-th case from the i-th (0-based), e.g. one job of a SLURM array each. When the last
part ends, the stage is finished as usual: `ccam.runner.run_stage` runs it once more, finds every
case done, computes what needs all cases (M_GC from the summed integer one-hot counts, divided
once, so it is bit-identical to one process) and writes the one stage record. ``--merge`` does
that step by hand (e.g. as the SLURM job that depends on the array).

How parts share the work directory:

- each part computes the stage key (`ccam.stages.base.input_key`) and keeps or writes
  ``_started.json`` with it, so the final `run_stage` resumes rather than clearing the folder; a
  folder of other inputs is moved aside (complete outputs, restored by the runner on failure) or
  removed (partial ones) by the first part, under ``W/.ccam.parts.lock``;
- parts hold a *shared* lock on ``W/.ccam.lock``: they run together, while a command holding the
  exclusive lock (a normal stage command, ``ccam run``) excludes them and is excluded by them;
- a part writes ``<folder>/_parts/<i>-of-<n>.json`` (with the key) when its cases are done; the
  part that finds all n markers takes the exclusive lock and finishes the stage.

The per-case stage modules provide ``part_cases(ctx)`` (the cases in a fixed order) and
``run_part(ctx, cases)`` (the per-case work, skipping cases already done); their ``run(ctx)``
calls ``run_part`` on all cases, so one process and n parts run the same code per case.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from ccam.errors import UserError
from ccam.runner import WorkdirLock, run_stage
from ccam.io.atomic import read_json, write_json
from ccam.io.inputs import parse_part
from ccam.stages.base import RECORD, STARTED, StageContext, get_stage, input_key, read_record, stage_status
from ccam.training import seed_everything

log = logging.getLogger("ccam")

# stage -> module with part_cases / run_part
PER_CASE = {"sample": "ccam.stages.sample", "pseudo-masks": "ccam.stages.pseudo_masks", "refine": "ccam.stages.refine",
            "predict": "ccam.stages.predict", "evaluate": "ccam.stages.evaluate"}
MARKERS = "_parts"
MERGE_WAIT_S = 120.0  # how long the last part waits for the others to let go of the shared lock


class SharedWorkdirLock(WorkdirLock):
    """A shared flock on ``W/.ccam.lock``: parts run together; an exclusive holder (`ccam.runner.WorkdirLock`) excludes them."""

    def __init__(self, workdir: Path):
        super().__init__(workdir, shared=True)


def _module(name: str):
    if name not in PER_CASE:
        raise UserError(f"--part and --merge are for the per-case stages, not '{name}'", fix=f"use them with: {', '.join(PER_CASE)}")
    return importlib.import_module(PER_CASE[name])


def _check_needs(workdir: Path, cfg, name: str) -> None:
    memo: dict = {}
    for up in get_stage(name).needs:
        if (s := stage_status(workdir, cfg, up, memo)) != "done":
            raise UserError(f"stage '{name}' needs '{up}', which is {s} in {workdir}",
                            fix=f"run `ccam {up} --workdir {workdir}` (or `ccam run`) first")


def _marker(folder: Path, i: int, n: int) -> Path:
    return folder / MARKERS / f"{i}-of-{n}.json"


def missing_parts(folder: Path, key: str, n: int) -> list[int]:
    """The parts of n whose marker with ``key`` is not in ``folder``."""
    return [i for i in range(n) if (read_json(_marker(folder, i, n)) or {}).get("key") != key]


def _prepare_folder(ctx: StageContext, key: str, n: int, force: bool) -> None:
    """Keep the folder of a run with this key (resume), else set it up for one: under ``W/.ccam.parts.lock``."""
    folder = ctx.dir
    with open(ctx.workdir / ".ccam.parts.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        started = read_json(folder / STARTED) or {}
        if started.get("key") == key and not (folder / RECORD).exists():
            return  # another part (or an interrupted run with the same inputs) started it
        previous = ctx.workdir / f".previous-{ctx.stage.folder}"
        if folder.exists():
            if (folder / RECORD).exists():  # complete outputs (other inputs, or --force): aside, as run_stage does
                shutil.rmtree(previous, ignore_errors=True)
                folder.rename(previous)
            else:
                shutil.rmtree(folder)  # a partial run of other inputs
        folder.mkdir(parents=True)
        write_json(folder / STARTED, {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": n})


def run_part(workdir: Path, cfg, name: str, part: str, options: Optional[dict] = None, force: bool = False) -> Optional[dict]:
    """Part ``part`` ("i/n") of stage ``name``; the part that completes the set finishes the stage (returns its record)."""
    i, n = parse_part(part)
    mod = _module(name)
    workdir = Path(workdir)
    st = get_stage(name)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    with SharedWorkdirLock(workdir):
        _check_needs(workdir, cfg, name)
        ctx = StageContext(workdir, cfg, st, opts)
        key, _ = input_key(ctx)
        rec = read_record(workdir, st)
        if rec is not None and rec.get("key") == key and not force:
            log.info("%s: up to date, skipped (part %d/%d)", name, i, n)
            return rec
        _prepare_folder(ctx, key, n, force)
        seed_everything(cfg.runtime.seed)
        cases = mod.part_cases(ctx)
        mine = cases[i::n]
        log.info("%s: part %d/%d: %d of %d case(s)", name, i, n, len(mine), len(cases))
        t0 = time.time()
        mod.run_part(ctx, mine)
        write_json(_marker(ctx.dir, i, n), {"key": key, "part": f"{i}/{n}", "cases": [c.id for c in mine],
                                            "duration_s": round(time.time() - t0, 2),
                                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        left = missing_parts(ctx.dir, key, n)
    if left:
        log.info("%s: part %d/%d done; waiting for part(s) %s (the last one to end merges, or run --merge)",
                 name, i, n, ", ".join(map(str, left)))
        return None
    return merge(workdir, cfg, name, options, wait_s=MERGE_WAIT_S)


def merge(workdir: Path, cfg, name: str, options: Optional[dict] = None, wait_s: float = 0.0) -> dict:
    """Finish a stage done in parts: under the exclusive lock, `run_stage` finds every case done and writes the record."""

    _module(name)
    workdir = Path(workdir)
    deadline = time.time() + wait_s
    while True:
        try:
            lock = WorkdirLock(workdir).__enter__()
            break
        except UserError:
            if time.time() >= deadline:
                raise
            time.sleep(0.5)  # a part that just finished still holds its shared lock
    try:
        st = get_stage(name)
        ctx = StageContext(workdir, cfg, st, {k: v for k, v in (options or {}).items() if v is not None})
        key, _ = input_key(ctx)
        rec = read_record(workdir, st)
        if rec is None or rec.get("key") != key:
            started = read_json(ctx.dir / STARTED) or {}
            n = started.get("parts")
            if started.get("key") != key or not n:
                raise UserError(f"no parts of '{name}' with the current settings to merge", path=str(ctx.dir),
                                fix=f"run `ccam {name} --workdir {workdir} --part i/n` for every i first")
            left = missing_parts(ctx.dir, key, int(n))
            if left:
                raise UserError(f"part(s) {', '.join(f'{i}/{n}' for i in left)} of '{name}' have not finished", path=str(ctx.dir),
                                fix="run them (or run the stage without --part to do the rest here), then --merge")
        record = run_stage(workdir, cfg, name, options, save_config=True)
        shutil.rmtree(ctx.dir / MARKERS, ignore_errors=True)
        return record
    finally:
        lock.__exit__(None, None, None)

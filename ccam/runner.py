"""Stage runner (DESIGN section 4): skip/resume, pipelines, work-directory lock.

What a stage is, its record, key and status live in `ccam.stages.base`; this module runs them.
A stage whose record matches is skipped; a changed key makes it, and everything downstream,
stale. A stage whose run crashed keeps its folder when it is started again with the same key,
so training resumes from its last checkpoint; with a different key the folder is cleared first.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import yaml

import ccam.stages
from ccam import __version__
from ccam import config as config_mod
from ccam.config import Config
from ccam.errors import UserError
from ccam.io.atomic import read_json, remove_temp_files, write_json
from ccam.stages.base import RECORD, STARTED, StageContext, get_stage, input_key, read_record, stage_status
from ccam.training import seed_everything

log = logging.getLogger("ccam")
ccam.stages.load_all()  # registers every stage
REPO_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def _run_distributed(workdir: Path, cfg: Config, name: str, options: Optional[dict], force: bool, save_config: bool) -> dict:
    """A training stage under torchrun: rank 0 prepares the folder and writes the record, every rank trains."""
    from ccam import distributed
    from ccam.training import select_device

    if name not in distributed.TRAINING_STAGES:
        raise UserError(f"stage '{name}' does not run under torchrun (only {', '.join(distributed.TRAINING_STAGES)} do)",
                        fix=f"run `ccam {name} --workdir {workdir}` as one process (per-case stages split with --part i/n)")
    distributed.setup(select_device(cfg))
    st = get_stage(name)
    ctx = StageContext(workdir, cfg, st, {k: v for k, v in (options or {}).items() if v is not None})
    key, _ = input_key(ctx)
    rec = read_record(workdir, st)
    distributed.barrier()  # every rank has decided on the same record before rank 0 touches the folder
    if rec is not None and rec.get("key") == key and not force:
        log.info("%s: up to date, skipped", name)
        return rec
    if distributed.is_main():
        return run_stage(workdir, cfg, name, options, force, save_config, _rank0_of_many=True)
    seed_everything(cfg.runtime.seed)
    distributed.barrier()  # rank 0 has set the folder up (previous outputs aside, resume marker)
    st.run(ctx)
    distributed.barrier()  # rank 0 writes the record after this
    return read_record(workdir, st) or {}


def run_stage(workdir: Path, cfg: Config, name: str, options: Optional[dict] = None, force: bool = False,
              save_config: bool = False, _rank0_of_many: bool = False) -> dict:
    """Run one stage unless its record is current; returns the record.

    Every stage starts from the same RNG state (``runtime.seed``), so its results do not depend on
    what ran before it in the process. A run with new inputs keeps the previous complete outputs
    aside (``W/.previous-<folder>``) until it succeeds: on any failure they come back. A run of a
    stage that had no complete outputs keeps its partial state for resume. ``save_config``: write
    ``W/config.yaml`` once the stage is done (a command that fails saves nothing).
    """
    from ccam import distributed

    if distributed.world() > 1 and not _rank0_of_many:
        return _run_distributed(workdir, cfg, name, options, force, save_config)
    st = get_stage(name)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    memo: dict = {}  # one status pass over the upstream graph
    for up in st.needs:
        if (up_status := stage_status(workdir, cfg, up, memo)) != "done":
            raise UserError(
                f"stage '{name}' needs '{up}', which is {up_status} in {workdir}",
                fix=f"run `ccam {up} --workdir {workdir}` (or `ccam run`) first",
            )
    ctx = StageContext(workdir, cfg, st, opts)
    key, inputs = input_key(ctx)
    folder = ctx.dir
    previous = workdir / f".previous-{st.folder}"
    _recover(folder, previous, key)
    rec = read_record(workdir, st)
    # upstream is done (checked above), so a matching key means this stage is done
    if rec is not None and rec.get("key") == key and not force:
        log.info("%s: up to date, skipped", name)
        if save_config:
            config_mod.save(cfg, workdir)
        return rec
    started = folder / STARTED
    resume = (read_json(started) or {}).get("key") == key and not force
    kept = False
    if folder.exists() and not resume:
        folder.rename(previous)  # aside until this run succeeds
        kept = True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD).unlink(missing_ok=True)
    removed = remove_temp_files(folder)
    if removed:
        log.info("%s: removed %d temp file(s) left by an interrupted run", name, removed)
    write_json(started, {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    log.info("%s: %s", name, "resuming" if resume else "running")
    t0 = time.time()
    seed_everything(cfg.runtime.seed)
    if _rank0_of_many:
        distributed.barrier()  # the other ranks start training in the folder set up above
    try:
        outputs = st.run(ctx) or {}
    except Exception:
        if kept:  # an error: the previous complete outputs come back; this run's partial state goes
            shutil.rmtree(folder, ignore_errors=True)
            previous.rename(folder)
        elif not any(p.name != STARTED for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)  # failed before writing anything: no folder left behind
        raise
    # Ctrl-C (like kill -9) keeps the partial state for resume and the previous outputs aside;
    # the next run resumes with the same inputs, or brings the previous outputs back (`_recover`)
    if _rank0_of_many:
        distributed.barrier()
    shutil.rmtree(previous, ignore_errors=True)
    record = {
        "stage": name,
        "key": key,
        "inputs": inputs,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()},
        "code_version": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "duration_s": round(time.time() - t0, 2),
        "outputs": outputs,
    }
    write_json(folder / RECORD, record)
    started.unlink(missing_ok=True)
    if save_config:
        config_mod.save(cfg, workdir)
    log.info("%s: done in %.1f s", name, record["duration_s"])
    return record


def _recover(folder: Path, previous: Path, key: str) -> None:
    """After a process was killed mid-run: previous complete outputs aside in ``previous`` come back,
    unless the partial run in ``folder`` is the one about to resume (same key)."""
    if not previous.exists():
        return
    if (folder / RECORD).exists():
        shutil.rmtree(previous, ignore_errors=True)  # the new run finished; the old outputs were left over
        return
    if (read_json(folder / STARTED) or {}).get("key") == key:
        return  # resume the partial run; the old outputs stay aside until it succeeds
    shutil.rmtree(folder, ignore_errors=True)
    previous.rename(folder)


def load_pipeline(path: Optional[str | Path] = None) -> dict:
    path = Path(path) if path else REPO_PIPELINES / "ccam.yaml"
    if not path.is_file():
        raise UserError("pipeline file not found", path=str(path), fix="use pipelines/ccam.yaml or a file like it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise UserError(f"pipeline is not a readable YAML file ({type(e).__name__})", path=str(path), fix="see pipelines/ccam.yaml")
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list) or not stages:
        raise UserError("pipeline has no 'stages' list", path=str(path), fix="see pipelines/ccam.yaml")
    for s in stages:
        name = s if isinstance(s, str) else s.get("stage", "") if isinstance(s, dict) else ""
        if not isinstance(name, str) or not name:
            raise UserError(f"pipeline entry {s!r} is not a stage name", path=str(path), fix="list stage names, see pipelines/ccam.yaml")
        get_stage(name)
    return data


def run_pipeline(workdir: Path, cfg: Config, pipeline: Optional[str | Path] = None, *, manifest: Optional[str] = None,
                 until: Optional[str] = None, from_: Optional[str] = None, options: Optional[dict] = None,
                 save_config: bool = False) -> list[str]:
    """Run the stages of a pipeline in order with skip/resume; returns the names of stages that ran.

    ``from_`` forces that stage (and so everything after it) to run again; ``until`` stops after
    it. ``options`` are offered to every stage that declares an option of that name.
    """
    pipe = load_pipeline(pipeline)
    names = [s if isinstance(s, str) else s["stage"] for s in pipe["stages"]]
    for flag, val in (("--until", until), ("--from", from_)):
        if val is not None and val not in names:
            raise UserError(f"{flag} {val}: not a stage of this pipeline", fix=f"choose one of: {', '.join(names)}")
    run_opts = dict(options or {})
    run_opts["manifest"] = manifest
    if manifest is None:
        rec = read_record(workdir, get_stage("prepare"))
        if rec is None:
            raise UserError("no manifest given and no prepared cohort in the work directory", path=str(workdir), fix="pass --manifest")
        run_opts["manifest"] = rec["options"].get("manifest")
    ran = []
    for name in names:
        st = get_stage(name)
        before = read_record(workdir, st)
        # options given to the stage's own command earlier (e.g. train-seg --masks) carry over
        opts = dict((before or {}).get("options", {}))
        opts.update({p.name: run_opts[p.name] for p in st.options if run_opts.get(p.name) is not None})
        after = run_stage(workdir, cfg, name, opts, force=name == from_, save_config=save_config)
        if before is None or before.get("finished") != after.get("finished"):
            ran.append(name)
        if name == until:
            break
    return ran


_HELD_LOCKS: set[int] = set()  # file descriptors of the work-directory locks this process holds


def _drop_locks_in_child() -> None:
    """After a fork (DataLoader workers, process pools): the child lets go of the parent's locks.

    A flock belongs to the open file, which a forked child shares; a worker that outlives a parent
    killed with SIGKILL would keep the work directory locked. The child's copy of each lock's file
    descriptor is pointed at /dev/null instead (the number stays valid for the file object)."""
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD_LOCKS:
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


class WorkdirLock:
    """Exclusive lock on a work directory so two ccam processes never write it at once.

    ``shared=True`` (parts of one per-case stage, `ccam.parts`): a shared flock on the same file,
    so parts run together while an exclusive holder excludes them; the directory must exist."""

    def __init__(self, workdir: Path, shared: bool = False):
        self.workdir = Path(workdir)
        self.shared = shared
        self.fh = None
        self.created = False

    def __enter__(self) -> "WorkdirLock":
        if self.shared and not self.workdir.is_dir():
            raise UserError("work directory does not exist", path=str(self.workdir), fix="run the earlier stages first")
        try:
            self.created = not self.workdir.exists()
            self.workdir.mkdir(parents=True, exist_ok=True)
            probe = self.workdir / ".ccam_write_test"
            probe.write_text("ok")
            probe.unlink()
            self.fh = open(self.workdir / ".ccam.lock", "a+")
        except OSError as e:
            raise UserError(f"cannot write to the work directory ({e.strerror})", path=str(self.workdir), fix="choose a writable --workdir")
        try:
            fcntl.flock(self.fh.fileno(), (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            other = ""
            for _ in range(20):  # the holder writes its pid right after taking the lock
                self.fh.seek(0)
                other = self.fh.read().strip()
                if other:
                    break
                time.sleep(0.05)
            self.fh.close()
            who = f"another ccam process (pid {other})" if other.isdigit() else "another ccam process"
            raise UserError(f"work directory is in use by {who}", path=str(self.workdir),
                            fix="wait for it to finish; parts (--part i/n) of one stage can run together" if self.shared
                            else "wait for it to finish or use another --workdir")
        _HELD_LOCKS.add(self.fh.fileno())
        if self.shared:
            return self
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            _HELD_LOCKS.discard(self.fh.fileno())
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
        if self.created and exc[0] is not None:
            # a command that failed in a work directory it created leaves nothing behind
            left = [p.name for p in self.workdir.iterdir()] if self.workdir.is_dir() else []
            if set(left) <= {".ccam.lock"}:
                shutil.rmtree(self.workdir, ignore_errors=True)

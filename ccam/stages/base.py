"""What a stage is, and the one table of the pipeline's stages (DESIGN section 4).

``SPECS`` is the only place that says, per stage: its folder in the work directory, the stages
whose outputs it must have (``needs``), the stages whose outputs it reads when they exist
(``uses``), and the config keys its results depend on (``keys``: a section, or one
``section.key``; ``ignore`` drops keys of a listed section; ``if_changed``: ``section.key`` that
enter the key only when not at their default, so switching them on leaves older work directories
current, e.g. ``runtime.precision``). Keys that do not change results
(``runtime.num_threads``, ``runtime.device``, ``runtime.num_workers``) are listed nowhere, so
they never make a stage stale.

A stage module registers its implementation with ``register(stage("name", run, ...))``; it reads
earlier stages' outputs through `ccam.artifacts`, never by importing another stage.

The record: every stage folder gets ``_stage.json`` written last and atomically. Its ``key``
hashes the stage's config keys, the records of its needs (and of its uses that exist) and its
extra inputs (manifest bytes, a masks folder...). A stage is ``done`` when its record's key is
current and everything it needs or uses is done; ``stale`` otherwise; ``missing`` without a
record. Staleness so propagates to everything downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ccam.errors import UserError
from ccam.io.atomic import read_json
from ccam.io.hashing import sha256_if_exists, sha256_json

RECORD = "_stage.json"
STARTED = "_started.json"


@dataclass(frozen=True)
class Spec:
    folder: str
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    if_changed: tuple[str, ...] = ()


# bf16 changes CAMs and masks; fp32, the default, keeps the keys every earlier run has
PRECISION = ("runtime.precision",)

# pipeline order; ``runtime.seed`` is listed where it changes weights or splits
SPECS: dict[str, Spec] = {
    "prepare": Spec("prepare", keys=("data", "runtime.seed")),
    "train-pcam": Spec("pcam", needs=("prepare",), keys=("pcam", "runtime.seed")),
    "sample": Spec("sample", needs=("prepare", "train-pcam"), keys=("cam", "anatomy.eps"), if_changed=PRECISION),
    # ccam.enabled only picks the CAMs of later stages: switching it for an ablation row never retrains
    "train-ccam": Spec("ccam", needs=("prepare", "train-pcam", "sample"), keys=("pcam", "ccam", "runtime.seed"),
                       ignore=("ccam.enabled",)),
    "pseudo-masks": Spec("pseudo_masks", needs=("prepare", "sample", "train-ccam"), keys=("pcam", "cam", "anatomy", "ccam"),
                         if_changed=PRECISION),
    "refine": Spec("refined_masks", needs=("prepare", "sample", "pseudo-masks"), keys=("refine", "cam", "anatomy", "runtime.seed")),
    "train-seg": Spec("seg", needs=("prepare",), uses=("pseudo-masks", "refine"), keys=("seg", "runtime.seed")),
    "predict": Spec("predictions", needs=("prepare", "train-seg"), keys=("predict",), if_changed=PRECISION),
    "evaluate": Spec("evaluation", needs=("prepare",), uses=("train-pcam", "sample", "pseudo-masks", "refine", "predict"),
                     keys=("evaluate",)),
    "ablation": Spec("ablation", needs=("prepare", "sample", "train-ccam"), uses=("refine",),
                     keys=("pcam", "cam", "ccam", "evaluate"), ignore=("ccam.enabled",)),
}


@dataclass
class Stage:
    """A pipeline stage: ``run(ctx)`` reads earlier stages' outputs and writes its own folder."""

    name: str  # CLI command, e.g. "train-pcam"
    folder: str  # folder in the work directory, e.g. "pcam"
    keys: tuple[str, ...]  # config keys its results depend on (sections or section.key)
    needs: tuple[str, ...]  # stages whose outputs it must have
    run: Callable[["StageContext"], Optional[dict]]
    help: str = ""
    examples: str = ""
    extra_inputs: Optional[Callable[["StageContext"], dict]] = None  # more things hashed into the key
    options: list = field(default_factory=list)  # extra click.Option objects for its command
    uses: tuple[str, ...] = ()  # stages whose outputs it reads when present
    ignore: tuple[str, ...] = ()  # keys of listed sections that do not matter
    if_changed: tuple[str, ...] = ()  # section.key hashed only when not at the default


STAGES: dict[str, Stage] = {}


def stage(name: str, run: Callable[["StageContext"], Optional[dict]], **kw) -> Stage:
    """The Stage of ``name`` with folder, needs, uses and keys from ``SPECS``."""
    s = SPECS[name]
    return Stage(name, s.folder, s.keys, s.needs, run, uses=s.uses, ignore=s.ignore, if_changed=s.if_changed, **kw)


def register(st: Stage) -> Stage:
    STAGES[st.name] = st
    return st


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}'", fix=f"choose one of: {', '.join(STAGES or SPECS)}")
    return STAGES[name]


def folder_of(name: str) -> str:
    """The work-directory folder of a stage (from the registry, else from ``SPECS``)."""
    if name in STAGES:
        return STAGES[name].folder
    if name in SPECS:
        return SPECS[name].folder
    raise UserError(f"unknown stage '{name}'", fix=f"choose one of: {', '.join(SPECS)}")


@dataclass
class StageContext:
    workdir: Path
    cfg: Any  # ccam.config.Config
    stage: Stage
    options: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.workdir / self.stage.folder

    def stage_dir(self, name: str) -> Path:
        """Folder of another (upstream) stage."""
        return self.workdir / folder_of(name)


# -- the record --------------------------------------------------------------------------------

def read_record_in(folder: Path) -> Optional[dict]:
    """The `_stage.json` of a stage folder, or None when absent or unreadable."""
    rec = read_json(Path(folder) / RECORD)
    return rec if isinstance(rec, dict) else None


def read_record(workdir: Path, st: Stage | str) -> Optional[dict]:
    return read_record_in(Path(workdir) / (folder_of(st) if isinstance(st, str) else st.folder))


def record_digest(workdir: Path, name: str) -> Optional[str]:
    return sha256_if_exists(Path(workdir) / folder_of(name) / RECORD)


def input_key(ctx: StageContext) -> tuple[str, dict]:
    st = ctx.stage
    inputs: dict[str, Any] = {"config": ctx.cfg.keys_hash(st.keys, st.ignore)}
    for up in st.needs:
        inputs[up] = record_digest(ctx.workdir, up)
    for up in st.uses:
        inputs[f"uses:{up}"] = record_digest(ctx.workdir, up)
    if st.extra_inputs is not None:
        inputs.update(st.extra_inputs(ctx))
    inputs.update(ctx.cfg.changed_keys(st.if_changed))
    return sha256_json(inputs), inputs


def stage_status(workdir: Path, cfg, name: str, _memo: Optional[dict] = None) -> str:
    """'done', 'stale' or 'missing'. Stale: its key changed, or something it needs or uses is not done."""
    memo = {} if _memo is None else _memo
    if name in memo:
        return memo[name]
    st = get_stage(name)
    rec = read_record(workdir, st)
    if rec is None:
        memo[name] = "missing"
        return "missing"
    status = "done"
    for up in st.needs:
        if stage_status(workdir, cfg, up, memo) != "done":
            status = "stale"
    for up in st.uses:
        if up in STAGES and read_record(workdir, up) is not None and stage_status(workdir, cfg, up, memo) != "done":
            status = "stale"
    if status == "done":
        try:
            key, _ = input_key(StageContext(Path(workdir), cfg, st, dict(rec.get("options", {}))))
        except UserError:
            key = None
        if key != rec.get("key"):
            status = "stale"
    memo[name] = status
    return status

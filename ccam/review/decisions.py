"""Review decisions per case (accept / needs edit / reject) in ``W/review/decisions.json``, and how
`train-seg` applies them.

A decision comes from the review report (its pages save a ``decisions.json`` download that
``ccam review --record FILE`` records) or from ``ccam review --decide CASE accept|edit|reject``.
``W/review/decisions.json``::

    {"version": 1,
     "decisions": {"<case>": {"decision": "accept|edit|reject", "comment": "...", "stage": "...",
                              "final_dir": "<folder where the edited mask is saved>", "time": "...",
                              "source": "<file or command it was recorded from>"}},
     "history": [{"case": ..., "decision": ..., "time": ..., "source": ...}, ...]}

In `train-seg`: accepted cases train on the pipeline's mask (whatever the stage resolved),
edited cases on ``<final_dir>/<case>.nii.gz`` (the `--masks` folder when one is given, else the
folder the decision names), rejected cases are left out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ccam import artifacts
from ccam.errors import UserError
from ccam.io.atomic import save_npy, write_json
from ccam.io.volume import mask_file

log = logging.getLogger("ccam")

DECISIONS = ("accept", "edit", "reject")
ALIASES = {"accept": "accept", "accepted": "accept", "ok": "accept", "edit": "edit", "edited": "edit",
           "needs edit": "edit", "needs-edit": "edit", "needs_edit": "edit", "reject": "reject", "rejected": "reject"}


def decisions_path(workdir: Path) -> Path:
    return Path(workdir) / "review" / "decisions.json"


def normalise_decision(value: str, case: str, where: str) -> str:
    d = ALIASES.get(str(value).strip().lower())
    if d is None:
        raise UserError(f"unknown decision '{value}'", case=case, path=where, fix="use accept, edit or reject")
    return d


def read_store(workdir: Path) -> dict:
    """The whole ``W/review/decisions.json`` ({"version", "decisions", "history"}); empty when absent."""
    p = decisions_path(workdir)
    if not p.exists():
        return {"version": 1, "decisions": {}, "history": []}
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"recorded decisions are unreadable ({e})", path=str(p),
                        fix="restore the file or delete it and record the decisions again with `ccam review --record`")
    if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
        raise UserError("recorded decisions have no 'decisions' table", path=str(p),
                        fix="delete the file and record the decisions again with `ccam review --record`")
    data.setdefault("history", [])
    return data


def load_decisions(workdir: Path) -> dict[str, dict]:
    """case id -> {"decision", "comment", "final_dir", ...} as recorded; {} when nothing was recorded."""
    return read_store(workdir)["decisions"]


def parse_decisions_file(path: Path) -> tuple[dict[str, dict], dict]:
    """Read a report's ``decisions.json`` download (or a plain ``{case: decision}`` table).

    Returns (case -> {"decision", "comment"}, file-level fields such as final_dir, stage, workdir)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("decisions file not found", path=str(path), fix="pass the decisions.json the review page saved")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"decisions file is not valid JSON ({e})", path=str(path), fix="save it again from the review page")
    if not isinstance(data, dict):
        raise UserError("decisions file must hold a JSON object", path=str(path), fix="save it again from the review page")
    table = data.get("decisions", data) if isinstance(data.get("decisions"), dict) else data
    meta = {k: data.get(k) for k in ("final_dir", "stage", "workdir", "report") if isinstance(data.get(k), str)}
    out: dict[str, dict] = {}
    for cid, d in table.items():
        if cid in ("ccam_review", "final_dir", "stage", "workdir", "report", "version"):
            continue
        if isinstance(d, str):
            d = {"decision": d}
        if not isinstance(d, dict) or "decision" not in d:
            raise UserError("entry has no 'decision'", case=cid, path=str(path), fix="use {\"decision\": \"accept|edit|reject\"}")
        if not d["decision"]:  # the page lists cases nobody decided yet
            continue
        out[cid] = {"decision": normalise_decision(d["decision"], cid, str(path)), "comment": str(d.get("comment") or "")}
    return out, meta


def record_decisions(workdir: Path, decisions: dict[str, dict], *, source: str, stage: Optional[str] = None,
                     final_dir: Optional[Path] = None, case_ids: Optional[Iterable[str]] = None) -> dict:
    """Merge ``decisions`` (case -> {"decision", "comment"}) into ``W/review/decisions.json``, atomically.

    Unknown cases (not in ``case_ids``, default: the prepared cohort) are a UserError naming them.
    Returns the stored table."""
    workdir = Path(workdir)
    if case_ids is None:
        from ccam.data.cohort import Cohort

        case_ids = [c.id for c in Cohort(workdir).cases]
    known = set(case_ids)
    unknown = sorted(set(decisions) - known)
    if unknown:
        raise UserError(f"decision for case(s) not in this run's cohort: {', '.join(unknown[:5])}", path=source,
                        fix="check --workdir (the decisions belong to another run?) or the case ids")
    store = read_store(workdir)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for cid, d in sorted(decisions.items()):
        entry = {"decision": normalise_decision(d["decision"], cid, source), "comment": d.get("comment", ""),
                 "stage": stage, "final_dir": str(Path(final_dir).resolve()) if final_dir else None,
                 "time": now, "source": source}
        old = store["decisions"].get(cid, {})
        if entry["final_dir"] is None and old.get("final_dir"):  # a re-decision from the CLI keeps where the edit lives
            entry["final_dir"] = old["final_dir"]
        store["decisions"][cid] = entry
        store["history"].append({"case": cid, "decision": entry["decision"], "time": now, "source": source})
    write_json(decisions_path(workdir), store)
    return store["decisions"]


def edited_mask_file(case_id: str, folder: Optional[Path]) -> Optional[Path]:
    return mask_file(folder, case_id)


def _final_dir(entry: dict, override: Optional[Path]) -> Optional[Path]:
    if override is not None:
        return Path(override)
    return Path(entry["final_dir"]) if entry.get("final_dir") else None


def require_edited_mask(workdir: Path, case_id: str, entry: dict, override: Optional[Path]) -> Path:
    """The edited mask of a case marked 'edit', or a UserError saying where to save it."""
    folder = _final_dir(entry, override)
    f = edited_mask_file(case_id, folder)
    if f is None:
        where = f"{folder}/{case_id}.nii.gz" if folder else "a labels/final folder (none is known for it)"
        raise UserError(f"marked 'needs edit' in the review decisions but no edited mask is at {where}", case=case_id,
                        path=str(decisions_path(workdir)),
                        fix=f"save the corrected mask there (or pass --masks DIR holding {case_id}.nii.gz), "
                            f"or record another decision: `ccam review --workdir {workdir} --decide {case_id} accept|reject`")
    return f


def decisions_hash(workdir: Path, final_dir: Optional[Path] = None) -> Optional[str]:
    """A hash of what the decisions mean for training (decision per case, bytes of each edited mask);
    None without recorded decisions. Comments and times do not count."""
    decisions = load_decisions(workdir)
    if not decisions:
        return None
    items = {}
    for cid, d in sorted(decisions.items()):
        f = edited_mask_file(cid, _final_dir(d, final_dir)) if d["decision"] == "edit" else None
        items[cid] = [d["decision"], sha256_file(f) if f is not None else None]
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def edited_stack(path: Path, case, num_classes: int) -> np.ndarray:
    """An edited label NIfTI on the case's source grid -> (N, S, S) uint8 stack; UserError if it does not fit."""
    from ccam.data.cohort import label_stack_from_file

    return label_stack_from_file(path, case, num_classes, what="edited mask")


def apply_decisions(workdir: Path, sources: dict[str, tuple[str, Path]], final_dir: Optional[Path] = None,
                    stack_dir: Optional[Path] = None, cohort=None,
                    splits: tuple[str, ...] = ("train", "val")) -> tuple[dict[str, tuple[str, Path]], dict[str, dict]]:
    """Apply the recorded decisions to the mask sources `train-seg` resolved.

    ``sources``: case id -> (source name, path of its (N, S, S) uint8 label stack). Rejected cases
    are dropped; edited cases switch to ``("edited", stack_dir/<id>.npy)`` converted from
    ``<final_dir>/<id>.nii.gz`` (``final_dir`` = train-seg's ``--masks`` if given, else the folder
    the decision names; UserError if the file is missing); accepted and undecided cases keep their
    source. Only cases of ``splits`` are touched. Returns (new sources, case -> {"decision",
    "source", "file"} for every decided case of those splits).
    """
    workdir = Path(workdir)
    decisions = load_decisions(workdir)
    out = dict(sources)
    if not decisions:
        return out, {}
    if cohort is None:
        from ccam.data.cohort import Cohort

        cohort = Cohort(workdir)
    ids = {c.id: c for c in cohort.cases}
    stack_dir = Path(stack_dir) if stack_dir is not None else artifacts.stage_dir(workdir, "train-seg") / "edited_masks"
    used: dict[str, dict] = {}
    for cid, d in sorted(decisions.items()):
        case = ids.get(cid)
        if case is None:
            log.warning("review decisions: case %s is not in the cohort; its decision is ignored", cid)
            continue
        if case.split not in splits:
            continue
        if d["decision"] == "reject":
            out.pop(cid, None)
            used[cid] = {"decision": "reject", "source": None, "file": None}
        elif d["decision"] == "edit":
            f = require_edited_mask(workdir, cid, d, final_dir)
            stack = stack_dir / f"{cid}.npy"
            save_npy(stack, edited_stack(f, case, cohort.num_classes))
            out[cid] = ("edited", stack)
            used[cid] = {"decision": "edit", "source": "edited", "file": str(f)}
        else:
            used[cid] = {"decision": "accept", "source": out[cid][0] if cid in out else None, "file": None}
            if cid not in out:
                log.warning("review decisions: case %s is accepted but has no mask to train on", cid)
    by = {k: sorted(c for c, u in used.items() if u["decision"] == k) for k in DECISIONS}
    log.info("train-seg: review decisions: %d accepted, %d edited%s, %d rejected and left out%s", len(by["accept"]), len(by["edit"]),
             f" ({', '.join(by['edit'])} from the edited masks)" if by["edit"] else "", len(by["reject"]),
             f" ({', '.join(by['reject'])})" if by["reject"] else "")
    return out, used


def mask_sources_table(sources: dict[str, tuple[str, Path]], decided: dict[str, dict], cohort) -> dict[str, dict]:
    """``seg/mask_sources.json``: case -> {"source", "split"} plus, for decided cases, "decision" and the
    edited "file"; rejected cases are listed with source None (they were left out)."""
    table: dict[str, dict] = {}
    for cid in sorted(set(sources) | set(decided)):
        entry = {"source": sources[cid][0] if cid in sources else None, "split": cohort.case(cid).split}
        if cid in decided:
            entry["decision"] = decided[cid]["decision"]
            if decided[cid].get("file"):
                entry["file"] = decided[cid]["file"]
        table[cid] = entry
    return table


def reviewed_mask_files(workdir: Path, stage: str, final_dir: Optional[Path] = None) -> list[tuple[str, Path, str]]:
    """The masks of ``stage`` after review: [(case id, mask NIfTI on the source grid, origin)], origin
    "stage" (accepted or undecided), "edited" (``<final_dir>/<id>.nii.gz``); rejected cases left out."""
    from ccam.data.cohort import Cohort
    from ccam.export.review import stage_masks

    name, folder, _ = stage_masks(workdir, stage)
    ids = {c.id for c in Cohort(workdir).cases}
    decisions = load_decisions(workdir)
    out = []
    for f in sorted(folder.glob("*.nii.gz")):
        cid = f.name[:-7]
        if cid not in ids:
            continue
        d = decisions.get(cid, {}).get("decision")
        if d == "reject":
            continue
        if d == "edit":
            out.append((cid, require_edited_mask(workdir, cid, decisions[cid], final_dir), "edited"))
        else:
            out.append((cid, f, "stage"))
    if not out:
        raise UserError(f"no masks of stage '{name}' to export (none written, or every case rejected)", path=str(folder),
                        fix=f"re-run `ccam {name} --workdir {workdir}` or review the decisions")
    return out

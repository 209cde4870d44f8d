"""Case ids that are safe as file names, and output paths that stay inside their folder."""

from __future__ import annotations

import re
from pathlib import Path

from ccam.errors import UserError

CASE_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"  # letters, digits, . _ -; not starting with '.'
_CASE_ID = re.compile(CASE_ID_PATTERN)
CASE_ID_RULE = "use letters, digits, '.', '_' and '-' only, not starting with '.' (at most 128 characters)"


def is_case_id(cid) -> bool:
    return isinstance(cid, str) and bool(_CASE_ID.match(cid))


def check_case_id(cid, path=None) -> str:
    """``cid`` when it is a safe case id (it names files such as ``<id>.nii.gz``), else a UserError."""
    if not is_case_id(cid):
        raise UserError(f"case id {cid!r} cannot name a file", path=None if path is None else str(path), fix=CASE_ID_RULE)
    return cid


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name``, checked to resolve inside ``folder`` (no '..', no absolute name, no link out)."""
    base = Path(folder).resolve()
    p = (base / name).resolve()
    if p != base and base not in p.parents:
        raise UserError(f"output {name!r} would be written outside {base}", path=str(base), fix=CASE_ID_RULE)
    return base / name


def check_output_folder(out: str | Path, workdir: str | Path, stage_folders, marker: str | None = None) -> Path:
    """An output folder for an export: not a stage folder of the work directory (nor inside one), and
    either new, empty, or holding ``marker`` (an earlier export of ours), so a user's files are never overwritten."""
    out_r, wd = Path(out).resolve(), Path(workdir).resolve()
    for f in stage_folders:
        sf = (wd / f).resolve()
        if out_r == sf or sf in out_r.parents or out_r == wd:
            raise UserError("the output folder is inside the work directory's stage outputs", path=str(out),
                            fix=f"choose another --out (default: {wd / 'export'}/<stage>)")
    if marker is not None and out_r.is_dir() and any(out_r.iterdir()) and not (out_r / marker).exists():
        raise UserError(f"the output folder is not empty and holds no earlier export ({marker})", path=str(out),
                        fix="choose a new or empty folder for --out")
    return Path(out)

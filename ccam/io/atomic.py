"""Atomic writes: every artifact goes to a temp name in the same folder, is fsynced, then renamed.

No file is ever half-written under its final name, so a crash at any moment leaves either the
old artifact or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_MARK = ".part"  # temp files are ``.<name>.<random>.part<suffix>`` beside their final name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def no_space(folder: Path, needed: int | None = None):
    """The UserError for a full disk: names the folder and the space needed (when known) and what is free."""
    from ccam.errors import UserError

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"about {needed / 2**20:.0f} MiB needed, " if needed else ""
    have = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
    return UserError(f"no space left on the device ({need}{have})", path=str(folder),
                     fix="free disk space or move the work directory, then run the same command again")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success fsync it and rename it to ``final``.

    ``suffix`` keeps the extension libraries look at (``.nii.gz``, ``.npy``); by default the
    final name's full suffix is kept. The file gets the usual permissions (0666 less the umask),
    not mkstemp's 0600. A full disk ends in a `UserError` naming the folder, and the temp file is
    removed; a temp file left by a killed process is removed by `remove_temp_files`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=TEMP_MARK + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~UMASK)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        size = tmp_path.stat().st_size if tmp_path.exists() else None
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if _is_disk_full(e, final.parent):
            raise no_space(final.parent, size) from None
        raise


def _is_disk_full(e: BaseException, folder: Path) -> bool:
    """ENOSPC, or a library's wrapped write error (torch raises RuntimeError) while the disk is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, (RuntimeError, OSError)):
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False


def reserve(path: str | os.PathLike, size: int) -> None:
    """Allocate ``size`` bytes of a file now, so a memory-mapped write cannot hit a full disk later
    (that would be SIGBUS, not an error); a full disk raises ENOSPC here instead."""
    fd = os.open(str(path), os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # file systems without fallocate: nothing to reserve
            return
        raise
    finally:
        os.close(fd)


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete temp files that a killed or failed writer left below ``folder``; returns how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.rglob(f".*{TEMP_MARK}*"):
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | os.PathLike, obj: Any) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON value of a file, or ``default`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return default


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_npy(final: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(final, suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (logs); the line is written in one call and flushed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_torch(final: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(final, suffix=".pt") as tmp:
        torch.save(obj, tmp)

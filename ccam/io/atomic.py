"""Atomic writes: every artifact goes to a temp name in the same folder, is fsynced, then renamed.

No file is ever half-written under its final name, so a crash at any moment leaves either the
old artifact or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success fsync it and rename it to ``final``.

    ``suffix`` keeps the extension libraries look at (``.nii.gz``, ``.npy``); by default the
    final name's full suffix is kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=".part" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


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

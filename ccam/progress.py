"""Progress reporting for long loops: a tqdm bar on a terminal, a few log lines otherwise (issue 12).

Redirected to a file, a tqdm bar is thousands of carriage-return redraws per stage. When stderr
is not a terminal, `bar` returns a `LineProgress` instead, with the same interface (iterate,
``update``, ``set_postfix``, ``close``, context manager) and the same figures (count, total,
rate, ETA, postfix), written through the ``ccam`` logger:

- a bar that is kept (``leave=True``, e.g. cases of a stage) logs a line every ``every`` percent
  of its total (default 10: at most 11 lines) and one when it ends;
- a transient bar (``leave=False``, e.g. the batches of one training epoch) logs one line when
  it ends: one line per epoch.

``CCAM_PROGRESS=bars`` or ``=lines`` forces either. ``ccam -q`` (warnings only) hides the lines,
as it hides every other info message.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Optional

log = logging.getLogger("ccam")
ENV = "CCAM_PROGRESS"


def use_bars(stream=None) -> bool:
    """tqdm bars when ``stream`` (default stderr) is a terminal, unless ``CCAM_PROGRESS`` says otherwise."""
    forced = os.environ.get(ENV, "").lower()
    if forced in ("bars", "lines"):
        return forced == "bars"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or unusual streams
        return False


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LineProgress:
    """tqdm's interface, written as occasional log lines (see the module docstring)."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", leave: bool = True, every: float = 10.0, disable: bool = False, **_ignored):
        self.iterable, self.desc, self.unit, self.leave, self.disable = iterable, desc or "", unit, leave, disable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.n, self.every = total, 0, max(0.1, float(every))
        self.postfix: dict = {}
        self.start = time.time()
        self._next_pct = self.every
        self.closed = False

    # -- tqdm's interface -------------------------------------------------------------------
    def __iter__(self):
        try:
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable or not self.leave or not self.total:
            return
        pct = 100.0 * self.n / self.total
        if pct >= self._next_pct and self.n < self.total:
            self._next_pct = (int(pct // self.every) + 1) * self.every
            self._emit()

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kw) -> None:
        self.postfix = {**(ordered_dict or {}), **kw}

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:  # nothing is redrawn
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and (self.n or self.total):
            self._emit(final=True)

    # -- the line -----------------------------------------------------------------------------
    def line(self, final: bool = False) -> str:
        elapsed = time.time() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:g}/{self.total:g} {self.unit}" if self.total else f"{self.n:g} {self.unit}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if not final and self.total and rate > 0:
            eta = f", ETA {_clock((self.total - self.n) / rate)}"
        post = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {count}{pct} in {_clock(elapsed)}, {rate:.3g} {self.unit}/s{eta}{post}"

    def _emit(self, final: bool = False) -> None:
        log.info("%s", self.line(final))


def bar(iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "", unit: str = "it",
        leave: bool = True, disable: bool = False, every: float = 10.0, **kw):
    """A tqdm bar on a terminal, else a `LineProgress` (same calls). Extra keywords go to tqdm."""
    if use_bars():
        from tqdm import tqdm as _tqdm

        kw.setdefault("dynamic_ncols", True)
        return _tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, **kw)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, every=every)


tqdm = bar  # drop-in: `from ccam.progress import tqdm`

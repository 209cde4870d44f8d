"""The prepared cohort: what `prepare` wrote, read back by every later stage.

Layout of ``W/prepare/``::

    cases.json               classes, modality, slice axis, and per case: split, paths, geometry
    slices/<case_id>.npy     (N, S, S) float32 normalised slices, read by memory map
    tags/<case_id>.npy       (N, K) uint8 slice tags (1 = class present in the slice)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ccam.errors import UserError
from ccam.io.paths import check_case_id
from ccam.io.geometry import SliceGeometry

LEFT_RIGHT_PREFIXES = (("left_", "right_"), ("l_", "r_"), ("left", "right"))


def has_left_right_pair(classes: list[str]) -> bool:
    """True when the class list holds a left/right twin (e.g. left_kidney / right_kidney)."""
    return bool(left_right_pairs(classes))


def left_right_pairs(classes: list[str]) -> list[tuple[int, int]]:
    """(left label, right label) for every left/right twin among ``classes`` (labels are index + 1)."""
    names = [c.lower() for c in classes]
    pairs = []
    for i, n in enumerate(names):
        for left, right in LEFT_RIGHT_PREFIXES:
            if n.startswith(left) and (right + n[len(left):]) in names:
                pairs.append((i + 1, names.index(right + n[len(left):]) + 1))
                break
        else:
            for left, right in (("_left", "_right"), ("_l", "_r")):
                if n.endswith(left) and (n[: -len(left)] + right) in names:
                    pairs.append((i + 1, names.index(n[: -len(left)] + right) + 1))
                    break
    return pairs


@dataclass
class PreparedCase:
    id: str
    split: str
    image_path: str  # source image
    mask_path: Optional[str]  # ground truth: evaluation only
    geometry: SliceGeometry
    root: Path

    @property
    def n_slices(self) -> int:
        return self.geometry.n_slices

    def slices(self) -> np.ndarray:
        """(N, S, S) float32, memory-mapped."""
        s = self.geometry.size
        return self._load("slices", (self.n_slices, s, s), mmap=True)

    def tags(self) -> np.ndarray:
        """(N, K) uint8."""
        return self._load("tags", None, mmap=False)

    def _load(self, kind: str, shape, mmap: bool) -> np.ndarray:
        p = self.root / kind / f"{self.id}.npy"
        fix = f"re-run `ccam prepare --workdir {self.root.parent} --force`"
        if not p.exists():
            raise UserError(f"prepared {kind} missing", case=self.id, path=str(p), fix=fix)
        try:
            arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"prepared {kind} are damaged ({str(e).splitlines()[0][:80]})", case=self.id, path=str(p), fix=fix)
        if (shape is not None and tuple(arr.shape) != tuple(shape)) or (shape is None and (arr.ndim != 2 or arr.shape[0] != self.n_slices)):
            raise UserError(f"prepared {kind} have shape {tuple(arr.shape)}, not what prepare recorded", case=self.id, path=str(p), fix=fix)
        return arr


class Cohort:
    """Read-only view of ``W/prepare``."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir) / "prepare"
        p = self.root / "cases.json"
        if not p.exists():
            raise UserError("no prepared cohort", path=str(self.root), fix=f"run `ccam prepare --manifest M --workdir {workdir}` first")
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
            self.meta = meta
            self.classes: list[str] = list(meta["classes"])
            self.modality: str = meta["modality"]
            self.slice_axis: str = meta["slice_axis"]
            self.slice_size: int = int(meta["slice_size"])
            self.cases: list[PreparedCase] = [
                PreparedCase(c["id"], c["split"], c["image"], c.get("mask"), SliceGeometry.from_dict(c["geometry"]), self.root)
                for c in meta["cases"]
            ]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"the prepared cohort's cases.json is damaged ({type(e).__name__})", path=str(p),
                            fix=f"re-run `ccam prepare --workdir {workdir} --force`")
        for c in self.cases:
            check_case_id(c.id, p)

    @property
    def num_classes(self) -> int:
        """K foreground classes (C = K + 1 with background)."""
        return len(self.classes)

    @cached_property
    def left_right_pair(self) -> bool:
        return has_left_right_pair(self.classes)

    def split(self, *names: str) -> list[PreparedCase]:
        return [c for c in self.cases if c.split in names]

    def case(self, case_id: str) -> PreparedCase:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise UserError(f"case '{case_id}' is not in the prepared cohort", path=str(self.root), fix="check the case id")


class SliceDataset(Dataset):
    """All slices of some cases: item = dict(image (1, S, S) float32, tags (K,) float32, case, index).

    ``positives_only`` keeps the slices with at least one tag (C-CAM's training set).
    Slices are read from memory maps on access, so the cohort never has to fit in memory.
    """

    def __init__(self, cases: list[PreparedCase], positives_only: bool = False):
        self.cases = cases
        self.index: list[tuple[int, int]] = []
        self._tags = [c.tags() for c in cases]
        self._maps: dict[int, np.ndarray] = {}
        for ci, t in enumerate(self._tags):
            for s in range(t.shape[0]):
                if not positives_only or t[s].any():
                    self.index.append((ci, s))

    def __len__(self) -> int:
        return len(self.index)

    def _slices(self, ci: int) -> np.ndarray:
        if ci not in self._maps:
            self._maps[ci] = self.cases[ci].slices()
        return self._maps[ci]

    def __getitem__(self, i: int) -> dict:
        ci, s = self.index[i]
        img = torch.from_numpy(np.array(self._slices(ci)[s], dtype=np.float32))[None]
        return {"image": img, "tags": torch.from_numpy(self._tags[ci][s].astype(np.float32)),
                "case": self.cases[ci].id, "index": s}


def label_stack_from_file(path, case: PreparedCase, num_classes: int, what: str = "mask") -> np.ndarray:
    """A label map file on the case's source grid (e.g. a mask a reviewer corrected) -> (N, S, S) uint8 stack.

    A UserError naming the case and file when it is not on the image's grid, not integer, or has
    labels outside 0..K."""
    from ccam.io.geometry import labels_from_source
    from ccam.io.volume import read_volume

    vol = read_volume(path, case=case.id)
    geom = case.geometry
    if tuple(vol.array.shape) != tuple(geom.shape):
        raise UserError(f"{what} is not on the case's source grid (shape {tuple(vol.array.shape)}, the image {tuple(geom.shape)})", case=case.id, path=str(path),
                        fix="save the mask on the image's grid (in ITK-SNAP/Slicer: a segmentation of the exported image)")
    if not np.allclose(vol.affine, geom.affine_array, atol=1e-3):
        raise UserError(f"{what} is not on the case's source grid (the image's shape, but another position or orientation)", case=case.id, path=str(path),
                        fix="save the mask on the image's grid (same affine), or resample it onto the image")
    arr = np.asarray(vol.array)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded):
            raise UserError(f"{what} has non-integer values", case=case.id, path=str(path), fix="save it as an integer label map")
        arr = rounded
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > num_classes:
        raise UserError(f"{what} has label values {lo}..{hi}, expected 0..{num_classes}", case=case.id, path=str(path),
                        fix="use 0 for background and k for the k-th class of the manifest (see labels.json)")
    return labels_from_source(geom, arr.astype(np.int64), num_classes + 1)


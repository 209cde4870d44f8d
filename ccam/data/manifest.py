"""Data manifests (DESIGN section 3): parse, validate everything at once, resolve tags.

A bad manifest is rejected before any work with every problem listed, each naming the case and
the field. Ground-truth masks are only opened here for their header (grid check) or, with
``tags_from_masks``, to derive slice tags; their voxels never reach a training step.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccam.errors import ManifestError, UserError
from ccam.io.paths import CASE_ID_PATTERN, CASE_ID_RULE, is_case_id
from ccam.io.volume import read_header, read_volume, slice_axis_of

SPLITS = ("train", "val", "test")


class CaseEntry(BaseModel):
    """One patient's volume."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="Case id, unique in the cohort; outputs are named <id>.nii.gz, so: letters, digits, "
                                "'.', '_' and '-', not starting with '.'.", json_schema_extra={"pattern": CASE_ID_PATTERN})
    image: str = Field(description="Volume path relative to the manifest's folder: NIfTI (.nii, .nii.gz), MHA/MHD, "
                                   "NRRD, or a folder holding one DICOM series.")
    tags: Union[dict[str, list[list[int]]], str, None] = Field(
        None, description="Slice-level tags. Either per class a list of inclusive [start, end] ranges of 0-based slice "
                          "indices along slice_axis in the file's own voxel order (what a viewer shows), or the path of "
                          "a CSV file with a header 'slice,<class>,...' and one 0/1 row per slice. Omit with "
                          "tags_from_masks.")
    mask: Optional[str] = Field(None, description="Ground-truth label map on the image's grid (label = class index + 1). "
                                                  "Used only for evaluation (and by tags_from_masks); never for training.")
    split: str = Field("train", description="train, val or test; splits are by patient, never by slice.")


class ManifestModel(BaseModel):
    """A ccam data manifest: a cohort of volumes with slice-level tags (DESIGN section 3)."""

    model_config = ConfigDict(extra="forbid", title="ccam data manifest")
    name: str = Field(description="Name of the cohort (shown in reports).")
    modality: Literal["CT", "MR"] = Field(description="CT: HU windowing (data.ct_window); MR: percentile normalisation.")
    slice_axis: Literal["axial", "coronal", "sagittal"] = Field(
        "axial", description="Anatomical axis the tags run along, resolved from each file's affine whatever its storage order.")
    classes: list[str] = Field(description="Foreground classes; label value in every mask = index + 1, 0 = background. "
                                           "Name left/right twins left_<x> / right_<x> so laterality is handled.")
    tags_from_masks: bool = Field(False, description="Derive the tags from each case's mask (benchmarks only); still no "
                                                     "training step reads the mask's voxels.")
    cases: list[CaseEntry]


def manifest_schema() -> dict:
    """The JSON Schema of a manifest, generated from `ManifestModel` (``data_manifests/manifest.schema.json``)."""
    schema = ManifestModel.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


@dataclass
class Case:
    """One resolved case: absolute paths, (N, K) uint8 slice tags along the file's slice axis."""

    id: str
    image: str
    mask: Optional[str]
    split: str
    shape: tuple
    affine: np.ndarray
    tags: np.ndarray = field(repr=False)


@dataclass
class Manifest:
    path: str
    name: str
    modality: str
    slice_axis: str
    classes: list[str]
    cases: list[Case]
    sha256: str

    def split(self, name: str) -> list[Case]:
        return [c for c in self.cases if c.split == name]


def _ranges_problems(cid: str, cls: str, ranges, n: int) -> list[str]:
    probs = []
    prev_end = None
    for r in sorted(ranges, key=lambda r: r[0] if len(r) == 2 else 0):
        if len(r) != 2:
            probs.append(f"case {cid}: tags.{cls}: range {r} must be [start, end]")
            continue
        a, b = r
        if a > b:
            probs.append(f"case {cid}: tags.{cls}: range [{a}, {b}] is reversed")
        if a < 0 or b >= n:
            probs.append(f"case {cid}: tags.{cls}: range [{a}, {b}] is outside the volume's {n} slices (0..{n - 1})")
        if prev_end is not None and a <= prev_end:
            probs.append(f"case {cid}: tags.{cls}: ranges overlap at slice {a}")
        prev_end = b if prev_end is None else max(prev_end, b)
    return probs


def _read_tags_csv(path: Path, cid: str, classes: list[str], n: int, probs: list[str]) -> np.ndarray | None:
    tags = np.zeros((n, len(classes)), np.uint8)
    if not path.is_file():
        probs.append(f"case {cid}: tags: file not found: {path}" if not path.exists() else f"case {cid}: tags: not a file: {path}")
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh)]
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        probs.append(f"case {cid}: tags: {path.name} is not a readable UTF-8 CSV file ({type(e).__name__})")
        return None
    while rows and not any(v.strip() for v in rows[0]):
        rows.pop(0)  # blank lines before the header
    if not rows or rows[0][0].strip() != "slice":
        probs.append(f"case {cid}: tags: {path} must start with a header row 'slice,<class>,...'")
        return None
    header = [h.strip() for h in rows[0][1:]]
    unknown = [h for h in header if h not in classes]
    if unknown:
        probs.append(f"case {cid}: tags: unknown class(es) {unknown} in {path.name} (classes: {classes})")
        return None
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            s = int(row[0])
            vals = [int(v) for v in row[1:]]
        except ValueError:
            probs.append(f"case {cid}: tags: {path.name} line {line_no} is not integers")
            return None
        if not 0 <= s < n:
            probs.append(f"case {cid}: tags: {path.name} line {line_no}: slice {s} outside the volume's {n} slices")
            continue
        if any(v not in (0, 1) for v in vals) or len(vals) != len(header):
            probs.append(f"case {cid}: tags: {path.name} line {line_no}: values must be one 0/1 per class")
            continue
        for h, v in zip(header, vals):
            tags[s, classes.index(h)] = v
    return tags


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate a manifest; raise ManifestError listing every problem found."""
    path = Path(path)
    if not path.exists():
        raise UserError("manifest not found", path=str(path), fix="check the --manifest path")
    if not path.is_file():
        raise UserError("manifest is not a file", path=str(path), fix="pass the manifest's JSON file to --manifest")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError("manifest is not UTF-8 text", path=str(path), fix="save the manifest as UTF-8 JSON")
    except json.JSONDecodeError as e:
        raise UserError(f"manifest is not valid JSON (line {e.lineno}: {e.msg})", path=str(path), fix="fix the JSON syntax")
    except RecursionError:
        raise UserError("manifest JSON is nested too deeply", path=str(path), fix="see data_manifests/ for the manifest format")
    if not isinstance(data, dict):
        raise UserError("manifest must be a JSON object with name, modality, classes and cases", path=str(path),
                        fix="see data_manifests/ for examples")
    try:
        m = ManifestModel.model_validate(data)
    except ValidationError as e:
        probs = []
        for err in e.errors():
            loc = list(err["loc"])
            where = ""
            if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
                cases = data.get("cases") or []
                cid = cases[loc[1]].get("id", f"#{loc[1]}") if loc[1] < len(cases) and isinstance(cases[loc[1]], dict) else f"#{loc[1]}"
                where = f"case {cid}: "
                loc = loc[2:]
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            probs.append(f"{where}{'.'.join(str(x) for x in loc) or 'manifest'}: {msg}")
        raise ManifestError(str(path), probs)

    root = path.parent
    probs: list[str] = []
    if not m.cases:
        probs.append("cases: the cohort is empty")
    if not m.classes:
        probs.append("classes: no classes given")
    if len(set(m.classes)) != len(m.classes):
        probs.append("classes: duplicate class names")
    seen: set[str] = set()
    resolved: list[Case] = []
    for c in m.cases:
        if not is_case_id(c.id):
            probs.append(f"case {c.id!r}: id: cannot name a file -> {CASE_ID_RULE}")
            continue
        if c.id in seen:
            probs.append(f"case {c.id}: id: duplicate id")
        seen.add(c.id)
        if c.split not in SPLITS:
            probs.append(f"case {c.id}: split: '{c.split}' is not one of train/val/test")
        img_path = (root / c.image).resolve()
        mask_path = (root / c.mask).resolve() if c.mask else None
        try:
            shape, affine = read_header(img_path, case=c.id)
        except UserError as e:
            probs.append(f"case {c.id}: image: {e.what} ({Path(img_path).name})")
            continue
        n = shape[slice_axis_of(affine, m.slice_axis)]
        if mask_path is not None:
            try:
                mshape, maffine = read_header(mask_path, case=c.id)
                if tuple(mshape) != tuple(shape):
                    probs.append(f"case {c.id}: mask: image and mask are on different grids (shape {tuple(shape)} vs {tuple(mshape)})")
                    mask_path = None
                elif not np.allclose(maffine, affine, atol=1e-3):
                    probs.append(f"case {c.id}: mask: image and mask are on different grids (same shape, another position or "
                                 "orientation in the header)")
                    mask_path = None
            except UserError as e:
                probs.append(f"case {c.id}: mask: {e.what} ({Path(mask_path).name})")
                mask_path = None
        tags = np.zeros((n, len(m.classes)), np.uint8)
        if m.tags_from_masks:
            if c.mask is None:
                probs.append(f"case {c.id}: mask: tags_from_masks is true but the case has no mask")
            elif mask_path is not None:
                tags = _tags_from_mask(mask_path, c.id, affine, m.slice_axis, len(m.classes), probs)
        elif isinstance(c.tags, str):
            t = _read_tags_csv((root / c.tags).resolve(), c.id, m.classes, n, probs)
            if t is not None:
                tags = t
        elif c.tags is None:
            probs.append(f"case {c.id}: tags: missing (give ranges, a CSV file, or set tags_from_masks)")
        else:
            for cls, ranges in c.tags.items():
                if cls not in m.classes:
                    probs.append(f"case {c.id}: tags: unknown class '{cls}' (classes: {', '.join(m.classes)})")
                    continue
                rp = _ranges_problems(c.id, cls, ranges, n)
                probs.extend(rp)
                if not rp:
                    k = m.classes.index(cls)
                    for a, b in ranges:
                        tags[a:b + 1, k] = 1
        resolved.append(Case(c.id, str(img_path), str(mask_path) if mask_path else None, c.split, tuple(shape), affine, tags))
    if m.cases and not any(c.split == "train" for c in m.cases):
        probs.append("cases: no case has split 'train'")
    if probs:
        raise ManifestError(str(path), probs)
    return Manifest(str(path.resolve()), m.name, m.modality, m.slice_axis, list(m.classes), resolved,
                    hashlib.sha256(raw).hexdigest())


def _tags_from_mask(mask_path: Path, cid: str, affine, slice_axis: str, k: int, probs: list[str]) -> np.ndarray:
    vol = read_volume(mask_path, case=cid)
    ax = slice_axis_of(affine, slice_axis)
    lab = np.moveaxis(np.asarray(vol.array), ax, 0)
    n = lab.shape[0]
    tags = np.zeros((n, k), np.uint8)
    if lab.max() > k:
        probs.append(f"case {cid}: mask: label {int(lab.max())} exceeds the {k} classes")
    for c in range(k):
        tags[:, c] = (lab == c + 1).reshape(n, -1).any(axis=1)
    return tags

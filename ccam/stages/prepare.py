"""`ccam prepare`: manifest -> normalised S x S slices, slice tags and per-case geometry.

Intensity: CT is clipped to an HU window, MR to the volume's 0.5-99.5 percentiles, both scaled to
[0, 1]. Every slice along the manifest's slice axis is shown in the canonical view
(`ccam.io.geometry`) and resampled to S x S. Volumes are processed a chunk of slices at a time
and written to memory-mapped .npy files, so memory stays near one volume.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click
import numpy as np
import torch
from ccam.progress import tqdm

from ccam.data.manifest import Manifest, load_manifest
from ccam.data.normalise import normaliser
from ccam.errors import UserError
from ccam.io.atomic import atomic_path, reserve, save_npy, write_json
from ccam.io.geometry import SliceGeometry, resize_slices
from ccam.io.hashing import sha256_file
from ccam.io.paths import inside
from ccam.io.volume import read_volume
from ccam.stages import base

log = logging.getLogger("ccam")


def assign_validation(manifest: Manifest, val_fraction: float, min_train: int, seed: int) -> list[str]:
    """Move a share of training cases (by patient) to 'val' when the manifest has none; returns their ids."""
    if manifest.split("val"):
        log.info("validation: %d case(s) from the manifest", len(manifest.split("val")))
        return []
    train = manifest.split("train")
    if len(train) < min_train or val_fraction <= 0:
        log.info("validation: none (%d training case(s), fewer than %d); validation metrics are skipped", len(train), min_train)
        return []
    n_val = max(1, int(round(val_fraction * len(train))))
    rng = np.random.default_rng(seed)
    chosen = sorted(train[i].id for i in rng.permutation(len(train))[:n_val])
    for c in manifest.cases:
        if c.id in chosen:
            c.split = "val"
    log.info("validation: %d case(s) taken from training by patient (data.val_fraction=%s): %s", n_val, val_fraction, ", ".join(chosen))
    return chosen


def prepare_volume(array: np.ndarray, geom: SliceGeometry, norm, out_path: Path, chunk: int, case_id: str, source: str = "") -> None:
    """Write the (N, S, S) float32 slice stack of one volume to ``out_path`` (atomic, chunked)."""
    view = geom.canonical_view(array)
    n, s = geom.n_slices, geom.size
    with atomic_path(out_path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, s, s))
        reserve(tmp, os.path.getsize(tmp))  # a full disk is an error here, not a SIGBUS in the loop below
        for a in range(0, n, chunk):
            block = np.ascontiguousarray(view[a:a + chunk], dtype=np.float32)
            if not np.isfinite(block).all():
                raise UserError("image has NaN or Inf voxels", case=case_id, path=source or None, fix="fix or mask the non-finite voxels and re-export the image")
            block = norm(block)
            out[a:a + chunk] = resize_slices(torch.from_numpy(block)[:, None], (s, s))[:, 0].numpy()
        out.flush()
        del out


def run(ctx: base.StageContext) -> dict:
    cfg = ctx.cfg
    manifest = load_manifest(ctx.options["manifest"])
    assign_validation(manifest, cfg.data.val_fraction, cfg.data.min_train_for_val, cfg.runtime.seed)
    out = ctx.dir
    cases = []
    S = cfg.data.slice_size
    for case in tqdm(manifest.cases, desc="prepare", unit="case", dynamic_ncols=True):
        vol = read_volume(case.image, case=case.id)
        geom = SliceGeometry.from_affine(vol.array.shape, vol.affine, manifest.slice_axis, S, vol.qform_code, vol.sform_code)
        norm = normaliser(manifest.modality, vol.array, cfg.data.ct_window, cfg.data.mr_percentiles, case.id, case.image)
        prepare_volume(vol.array, geom, norm, inside(out / "slices", f"{case.id}.npy"), cfg.data.chunk_slices, case.id, case.image)
        save_npy(inside(out / "tags", f"{case.id}.npy"), case.tags)
        cases.append({"id": case.id, "split": case.split, "image": case.image, "mask": case.mask,
                      "n_slices": geom.n_slices, "positive_slices": int(case.tags.any(1).sum()),
                      "geometry": geom.to_dict()})
        del vol
    meta = {"manifest": manifest.path, "manifest_sha256": manifest.sha256, "name": manifest.name,
            "modality": manifest.modality, "slice_axis": manifest.slice_axis, "classes": manifest.classes,
            "slice_size": S, "cases": cases}
    write_json(out / "cases.json", meta)
    counts = {s: sum(c["split"] == s for c in cases) for s in ("train", "val", "test")}
    log.info("prepare: %d cases (%s), %d slices at %dx%d", len(cases), ", ".join(f"{k} {v}" for k, v in counts.items()),
             sum(c["n_slices"] for c in cases), S, S)
    return {"cases": len(cases), "slices": sum(c["n_slices"] for c in cases), "splits": counts}


def extra_inputs(ctx: base.StageContext) -> dict:
    """The manifest's bytes and each image's size and mtime (cheap; a re-exported image re-runs prepare)."""
    m = ctx.options.get("manifest")
    if m is None:  # the manifest of the last prepare run (e.g. `ccam prepare -w W --force` after a damaged file)
        m = ((base.read_record(ctx.workdir, "prepare") or {}).get("options") or {}).get("manifest")
        if m is not None:
            ctx.options["manifest"] = m
    if m is None:
        raise UserError("prepare needs --manifest", fix="pass --manifest path/to/manifest.json")
    p = Path(m)
    if not p.is_file():
        raise UserError("manifest not found" if not p.exists() else "manifest is not a file", path=str(p),
                        fix="pass the manifest's JSON file to --manifest")
    import json

    files = []
    try:  # a manifest that does not parse is reported by load_manifest, with all its problems
        for c in json.loads(p.read_text(encoding="utf-8-sig")).get("cases", []):
            ip = (p.parent / str(c.get("image", ""))).resolve()
            st = os.stat(ip) if ip.exists() else None
            files.append([str(ip), st.st_size if st else None, st.st_mtime_ns if st else None])
    except (ValueError, AttributeError, TypeError, RecursionError, OSError):
        pass
    return {"manifest": sha256_file(p), "images": files}


STAGE = base.register(base.stage(
    "prepare", run, extra_inputs=extra_inputs,
    help="Validate a manifest and write normalised S x S slices, slice tags and per-case geometry.",
    examples="ccam prepare --manifest data_manifests/abdomen_mr_ranges.json --workdir runs/mr\n"
             "ccam prepare --manifest cohort.json --workdir runs/ct --set data.slice_size=128",
    options=[click.Option(["--manifest", "-m"], type=click.Path(dir_okay=False, resolve_path=True), required=False,
                          help="Data manifest (JSON, DESIGN section 3).")],
))

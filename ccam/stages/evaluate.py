"""`ccam evaluate`: every stage's masks against the ground truth the manifest names (evaluation only).

For each mask folder a finished stage left (coarse: ``sample/coarse_masks``, pseudo:
``pseudo_masks``, refined: ``refined_masks`` when refinement is enabled, predicted:
``predictions``) and every case with a ground-truth mask: Dice, HD95 and ASSD per class in
millimetres (`ccam.metrics`, MONAI, with the voxel spacing), then mean and standard deviation
over cases per split. Stages that did not run are left out, not counted as zero.

Also an **oracle** sweep of the background score tau on the CAM stacks (``sample/cams`` and
``pseudo_masks/cams``): labels = argmax over [tau, CAM_1..CAM_K] on the source grid, for every tau
of ``evaluate.tau_sweep``. The best tau is chosen by looking at ground truth, so it is reported
as "oracle" and never used by the pipeline.

With ``evaluate.localisation`` (default on), the same CAM stacks get the localisation diagnostics
of `ccam.localisation` on the training cases, per source and class, labelled as computed against
ground truth: pointing-game hit rate, share of CAM mass inside the organ, P-CAM's occlusion drop,
and contact sheets ``W/reports/localisation/<source>_<class>.png``.

Writes ``W/reports/evaluation.json``, ``W/reports/evaluation.md`` and the contact sheets (the
folder is shared with other reports, so only these files are touched) and prints the markdown to
stdout; the stage record lives in ``W/evaluation/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Optional

import click
import numpy as np

from ccam import artifacts
from ccam.data.cohort import Cohort, PreparedCase
from ccam.errors import UserError
from ccam.io.atomic import read_json, write_json, write_text
from ccam.io.volume import read_volume
from ccam.localisation import Localisation, markdown_table as localisation_table
from ccam.metrics import dice_from_confusion, dice_per_class, read_ground_truth, surface_distances, tau_confusions
from ccam.reports import fmt, markdown_table, stage_dice_table
from ccam.progress import tqdm
from ccam.stages import base

log = logging.getLogger("ccam")

# (name in the report, stage whose <case_id>.nii.gz masks are evaluated), pipeline order
MASK_SOURCES = (("coarse", "sample"), ("pseudo", "pseudo-masks"), ("refined", "refine"), ("predicted", "predict"))
# (name, stage whose CAM stacks (N, K, S, S) get the tau sweep); the localisation diagnostics use
# the same names ("coarse" is P-CAM's, so it gets the occlusion test)
CAM_SOURCES = (("coarse", "sample"), ("pseudo", "pseudo-masks"))
METRICS = ("dice", "hd95_mm", "assd_mm")
ORACLE_NOTE = "oracle: tau picked by Dice against ground truth; reported for comparison, never used by the pipeline"
LOCALISATION_DIR = Path("reports") / "localisation"  # contact sheets <source>_<class>.png


def extra_inputs(ctx: base.StageContext) -> dict:
    """The ground-truth files' size and mtime (the evaluated stages' records are hashed as ``uses``)."""
    out: dict = {}
    gts = []
    cases = artifacts.stage_dir(ctx.workdir, "prepare") / "cases.json"
    if cases.exists():
        for c in json.loads(cases.read_text()).get("cases", []):
            m = c.get("mask")
            st = os.stat(m) if m and os.path.exists(m) else None
            gts.append([c["id"], m, st.st_size if st else None, st.st_mtime_ns if st else None])
    out["ground_truth"] = gts
    return out


# -- per case -----------------------------------------------------------------------------------

def _bbox(mask: np.ndarray, margin: int = 1) -> tuple:
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - margin), int(i.max()) + 1 + margin) for i in idx)


def case_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing, surfaces: bool = True) -> dict:
    """Per class (K,) Dice, HD95 and ASSD (mm) of a label map against ground truth on the same grid.

    Each class is measured on the bounding box of prediction and truth (one voxel of margin),
    which gives the same numbers as the whole volume and keeps big volumes fast.
    """
    res = {m: np.full(num_classes, np.nan) for m in METRICS}
    for k in range(1, num_classes + 1):
        p, g = pred == k, gt == k
        union = p | g
        if not union.any():
            continue  # absent from both: NaN, left out of the means
        sl = _bbox(union)
        pk, gk = p[sl].astype(np.uint8), g[sl].astype(np.uint8)
        res["dice"][k - 1] = dice_per_class(pk, gk, 1)[0]
        if surfaces:
            hd, asd = surface_distances(pk, gk, 1, spacing)
            res["hd95_mm"][k - 1], res["assd_mm"][k - 1] = hd[0], asd[0]
    return res


def tau_sweep_case(cams: np.ndarray, gt: np.ndarray, case: PreparedCase, taus: list[float]) -> np.ndarray:
    """Dice (T, K) of argmax over [tau, CAMs] against ground truth (I, J, K), on the source grid, for every tau
    (`ccam.metrics.tau_confusions`)."""
    geom = case.geometry
    return dice_from_confusion(tau_confusions(cams, geom.canonical_view(gt), geom.plane_shape, taus))


# -- summaries and report -----------------------------------------------------------------------

def _clean(v):
    """NaN -> None for JSON (strict parsers reject NaN)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(float(v)) else round(float(v), 6)
    return v


def _mean_std(values: list[float]) -> dict:
    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarise(per_case: dict, classes: list[str]) -> dict:
    """per split: {metric: {class or 'mean': {mean, std, n}}}; 'mean' averages each case's classes first."""
    out: dict = {}
    for split in ("train", "val", "test"):
        rows = {cid: r for cid, r in per_case.items() if r["split"] == split}
        if not rows:
            continue
        s: dict = {"n_cases": len(rows)}
        for m in METRICS:
            s[m] = {c: _mean_std([r[m][c] for r in rows.values()]) for c in classes}
            case_means = []
            for r in rows.values():
                vals = [r[m][c] for c in classes if r[m][c] is not None and not math.isnan(r[m][c])]
                case_means.append(float(np.mean(vals)) if vals else float("nan"))
            s[m]["mean"] = _mean_std(case_means)
        out[split] = s
    return out


def markdown(report: dict) -> str:
    classes = report["classes"]
    lines = [f"# Evaluation: {report['cohort']}", "",
             "Against the manifest's ground-truth masks (evaluation only). Mean ± std over cases; "
             "classes absent from both masks of a case are left out; stages not run are not listed.", ""]
    titles = {"dice": "Dice (%)", "hd95_mm": "HD95 (mm)", "assd_mm": "ASSD (mm)"}
    for m in METRICS:
        if m != "dice" and not report["surface_distances"]:
            continue
        lines += [f"## {titles[m]}", ""] + stage_dice_table(report, m) + [""]
    if report["tau_sweep"]:
        rows = [[f"{name} ({sw['cams']})", str(sw["n_cases"]), f"{sw['oracle']['tau']} (oracle)"]
                + [fmt(sw["oracle"]["dice"][c]) for c in classes] + [fmt(sw["oracle"]["mean_dice"])]
                for name, sw in report["tau_sweep"].items()]
        lines += ["## Oracle tau sweep (Dice %, tau chosen on ground truth: NOT usable as a result)", ""]
        lines += markdown_table(["CAMs", "cases", "oracle tau"] + list(classes) + ["mean"], rows, numeric_from=1)
        lines += ["", ORACLE_NOTE, ""]
    loc = report.get("localisation")
    if loc is not None and not loc.get("sources"):
        lines += ["## Localisation (against ground truth)", "", loc["note"], ""]
    elif loc is not None:
        occ = (loc.get("settings") or {}).get("occlusion")
        lines += ["## Localisation (against ground truth)", "",
                  f"Training cases with ground truth ({loc['n_cases']}); per class the S x S slices that are tagged with it and "
                  f"whose ground-truth region is non-empty. Pointing hit: CAM peak inside the organ grown by "
                  f"{loc['settings']['tolerance_px']} px. CAM mass inside: CAM sum inside the organ / CAM sum, pooled over slices."
                  + (f" Occlusion (P-CAM, {occ['model']}): mean sigmoid probability before / after the organ grown by "
                     f"{occ['organ_dilation_px']} px is painted with the mean of a {occ['ring_px']} px ring around it, at most "
                     f"{occ['max_slices_per_class']} slices per class." if occ else ""), ""]
        lines += localisation_table(loc, classes)
        sheets = [p for per in loc.get("contact_sheets", {}).values() for p in per.values()]
        if sheets:
            lines += ["", f"Contact sheets (image, white ground-truth contour, CAM heat map, + peak): {LOCALISATION_DIR}/"]
        lines += ["", loc["note"], ""]
    return "\n".join(lines).rstrip() + "\n"


# -- stage ----------------------------------------------------------------------------------------

# -- per case: measured once, cached in evaluation/cases/<id>.json (so `--part i/n` can share the work) --

def _sources_of(ctx) -> tuple[list, list]:
    sources = [(n, st) for n, st in MASK_SOURCES if artifacts.finished(ctx.workdir, st) is not None]
    cam_sources = [(n, st) for n, st in CAM_SOURCES if artifacts.finished(ctx.workdir, st) is not None]
    return sources, cam_sources


def _cache_path(ctx, case_id: str) -> Path:
    return ctx.dir / "cases" / f"{case_id}.json"


def _cached(ctx, case: PreparedCase) -> Optional[dict]:
    return read_json(_cache_path(ctx, case.id))


def _measure_and_cache(ctx, cohort: Cohort, case: PreparedCase, gt_vol, sources, cam_sources, taus) -> dict:
    """Metrics of every finished stage's mask and the tau sweep of every CAM source for one case."""
    cfg = ctx.cfg.evaluate
    K, classes = cohort.num_classes, cohort.classes
    gt = gt_vol.array
    out: dict = {"stages": {}, "sweeps": {}}
    for name, st in sources:
        path = artifacts.mask_path(ctx.workdir, st, case.id)
        if not path.exists():
            continue
        pred = read_volume(path, case=case.id)
        if tuple(pred.array.shape) != tuple(gt.shape) or not np.allclose(pred.affine, gt_vol.affine, atol=1e-3):
            raise UserError(f"{name} mask is not on the case's source grid (shape {pred.array.shape} vs {gt.shape})",
                            case=case.id, path=str(path), fix="re-run the stage that wrote it")
        r = case_metrics(np.asarray(pred.array).astype(np.int64), gt, K, gt_vol.spacing, cfg.surface_distances)
        out["stages"][name] = {"split": case.split, **{m: dict(zip(classes, r[m].tolist())) for m in METRICS}}
    if case.split == "train":  # tau is a training-set choice
        for name, st in cam_sources:
            if artifacts.cam_stack_path(ctx.workdir, st, case.id).exists():
                out["sweeps"][name] = tau_sweep_case(artifacts.cam_stack(ctx.workdir, st, case, K), gt, case, taus).tolist()
    write_json(_cache_path(ctx, case.id), out)
    return out


def part_cases(ctx: base.StageContext) -> list[PreparedCase]:
    """The cases `--part i/n` splits: those with ground truth, in cohort order."""
    return [c for c in Cohort(ctx.workdir).cases if c.mask_path]


def run_part(ctx: base.StageContext, cases: list[PreparedCase]) -> None:
    """Measure (and cache) these cases; the merge adds the localisation diagnostics and writes the report."""
    sources, cam_sources = _sources_of(ctx)
    cohort = Cohort(ctx.workdir)
    taus = [float(t) for t in ctx.cfg.evaluate.tau_sweep]
    for case in tqdm(cases, desc="evaluate", unit="case", dynamic_ncols=True):
        if _cached(ctx, case) is None:
            _measure_and_cache(ctx, cohort, case, read_ground_truth(case), sources, cam_sources, taus)


def evaluate(ctx: base.StageContext) -> dict:
    cfg = ctx.cfg.evaluate
    cohort = Cohort(ctx.workdir)
    classes = cohort.classes
    with_gt = [c for c in cohort.cases if c.mask_path]
    if not with_gt:
        log.warning("evaluate: no case of the manifest has a ground-truth mask; nothing to evaluate")
    sources, cam_sources = _sources_of(ctx)
    per_stage: dict = {n: {} for n, _ in sources}
    sweeps: dict = {n: {"cases": [], "dice": []} for n, _ in cam_sources}
    taus = [float(t) for t in cfg.tau_sweep]
    # fed case by case below, so each ground-truth mask is read once
    loc = Localisation(ctx.workdir, ctx.cfg, cohort, sources=cam_sources, splits=("train",),
                       occlusion_source="coarse", batch_size=ctx.cfg.cam.batch_size) if cfg.localisation and cam_sources else None
    for case in tqdm(with_gt, desc="evaluate", unit="case", dynamic_ncols=True):
        wants_loc = loc is not None and loc.wants(case)
        got = _cached(ctx, case)
        if got is None or wants_loc:
            gt_vol = read_ground_truth(case)
            if wants_loc:
                loc.add_case(case, gt_vol.array)
            if got is None:
                got = _measure_and_cache(ctx, cohort, case, gt_vol, sources, cam_sources, taus)
        for name, entry in got["stages"].items():
            per_stage[name][case.id] = entry
        for name, dice in got["sweeps"].items():
            sweeps[name]["cases"].append(case.id)
            sweeps[name]["dice"].append(np.asarray(dice, dtype=np.float64))

    stages = {}
    for name, st in sources:
        if per_stage[name]:
            stages[name] = {"folder": _rel(ctx.workdir, artifacts.mask_dir(ctx.workdir, st)), "cases": per_stage[name], "summary": summarise(per_stage[name], classes)}
    tau_report = {}
    for name, st in cam_sources:
        folder = _rel(ctx.workdir, artifacts.cam_stack_path(ctx.workdir, st, "-").parent)
        sw = sweeps[name]
        if not sw["cases"]:
            continue
        d = np.stack(sw["dice"])  # (cases, T, K)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (class never present) stay NaN
            per_tau_class = np.nanmean(d, axis=0)  # (T, K) mean over cases
            per_tau = np.nanmean(per_tau_class, axis=1)  # (T,) mean over classes
        best = int(np.nanargmax(per_tau)) if np.isfinite(per_tau).any() else 0
        tau_report[name] = {
            "cams": str(folder), "split": "train", "n_cases": len(sw["cases"]), "taus": taus,
            "mean_dice": per_tau.tolist(), "dice": [dict(zip(classes, row)) for row in per_tau_class.tolist()],
            "oracle": {"tau": taus[best], "mean_dice": float(per_tau[best]), "dice": dict(zip(classes, per_tau_class[best].tolist()))},
            "note": ORACLE_NOTE,
        }
    localisation = None
    if cfg.localisation:
        localisation = loc.finish(ctx.workdir / LOCALISATION_DIR) if loc is not None else {
            "note": "no CAMs to measure: stages sample and pseudo-masks have not run", "sources": {}}
    _drop_stale_sheets(ctx.workdir / LOCALISATION_DIR, localisation or {}, classes)
    report = _clean({"cohort": cohort.meta.get("name", ""), "classes": classes, "surface_distances": cfg.surface_distances,
                     "units": {"dice": "fraction (0..1)", "hd95_mm": "mm", "assd_mm": "mm"},
                     "stages": stages, "tau_sweep": tau_report,
                     **({"localisation": localisation} if localisation is not None else {})})
    return report


def _rel(workdir: Path, path: Path) -> str:
    return str(Path(path).relative_to(workdir))


def _drop_stale_sheets(folder: Path, localisation: dict, classes: list[str]) -> None:
    """Remove contact sheets this evaluation did not write (e.g. of a stage that no longer finished)."""
    written = {Path(p).name for per in localisation.get("contact_sheets", {}).values() for p in per.values()}
    for name, _ in CAM_SOURCES:
        for cls in classes:
            p = folder / f"{name}_{cls}.png"
            if p.name not in written and p.exists():
                p.unlink()


def report_paths(workdir: Path) -> tuple[Path, Path]:
    return Path(workdir) / "reports" / "evaluation.json", Path(workdir) / "reports" / "evaluation.md"


def run(ctx: base.StageContext) -> dict:
    report = evaluate(ctx)
    js, md = report_paths(ctx.workdir)
    write_json(js, report)
    text = markdown(report)
    write_text(md, text)
    click.echo(text)
    log.info("evaluate: wrote %s and %s", js, md)
    summary = {name: {split: s["dice"]["mean"]["mean"] for split, s in st["summary"].items()} for name, st in report["stages"].items()}
    loc = {n: src["mean"]["pointing_hit_rate"] for n, src in (report.get("localisation") or {}).get("sources", {}).items()}
    return {"report": str(js), "markdown": str(md), "mean_dice": _clean(summary),
            "oracle_tau": {n: sw["oracle"]["tau"] for n, sw in report["tau_sweep"].items()},
            **({"pointing_hit_rate_mean": loc} if loc else {})}


STAGE = base.register(base.stage(
    "evaluate", run, extra_inputs=extra_inputs,
    help="Dice, HD95 and ASSD of every stage's masks and CAM localisation per class against the manifest's ground truth (reports/evaluation.*).",
    examples="ccam evaluate --workdir runs/demo\n"
             "ccam evaluate --workdir runs/big --set evaluate.surface_distances=false --set evaluate.localisation=false",
))

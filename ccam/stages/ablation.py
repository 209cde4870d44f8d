"""`ccam ablation`: the paper's Table 1 on the user's own cohort (benchmark / report use only).

Rows P-CAM, +AC, +CC, +AC+CC come from the same trained models: P-CAM's CAMs (stage `sample`)
or C-CAM's (stage `train-ccam`), with or without the anatomy-causality chain (M_s). Each row's
pseudo-masks (argmax([tau, CAM]) upsampled to the source grid, exactly as stage `pseudo-masks`
writes them) are compared with the ground-truth masks of every case that has one:

- per-class and mean Dice (`ccam.metrics.dice_per_class`, per case, then averaged over cases)
  at the configured ``cam.tau``;
- the same at the **oracle** tau: the value of ``evaluate.tau_sweep`` with the best mean Dice
  against ground truth. Choosing tau on ground truth is leakage, so it is labelled oracle and
  never fed back into the pipeline;
- the left/right swap rate for each left/right class pair (share of ground-truth left-organ
  voxels labelled as the right organ, and the reverse), pooled over cases;
- the pointing-game hit rate per class of each row's CAMs (`ccam.localisation`): share of the
  S x S slices tagged with the class and holding its ground truth whose CAM peak lies in the
  organ (1 px tolerance). It needs no tau, so it says whether a row *finds* the organ at all,
  apart from the extent its masks get. Label rows (+Aff) have none.

Ground truth is read here and nowhere in training. Writes ``ablation/ablation.{md,json}``, copies
them to ``reports/``, and prints the table.

A further row (e.g. +Aff from the refinement stage) is a new entry in ``ROWS`` plus, when it
reads a new kind of CAMs or labels, a new source in ``_sources``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import click
import numpy as np
import torch
from ccam.progress import tqdm

from ccam import artifacts
from ccam.anatomy import anatomy_chain
from ccam.data.cohort import Cohort, PreparedCase, left_right_pairs
from ccam.errors import UserError
from ccam.io.atomic import write_json, write_text
from ccam.io.geometry import labels_from_source, resize_slices
from ccam.localisation import TOLERANCE_PX, Tally, tally
from ccam.metrics import confusion, dice_from_confusion, read_ground_truth, swap_rates, tau_confusions
from ccam.reports import fmt, markdown_table
from ccam.stages import base

log = logging.getLogger("ccam")


@dataclass(frozen=True)
class Row:
    """One line of the table: CAMs (or labels) from ``source``, with or without the anatomy chain."""

    name: str
    source: str  # key of _sources(): "pcam", "ccam" (a refinement stage adds e.g. "refined")
    anatomy: bool


ROWS = [
    Row("P-CAM", "pcam", False),
    Row("+AC", "pcam", True),
    Row("+CC", "ccam", False),
    Row("+AC+CC", "ccam", True),
]
AFF_ROW = Row("+AC+CC+Aff", "refined", True)  # only when the refinement stage ran with refine.enabled


def _sources(workdir, cfg, cohort: Cohort, needed: set[str]) -> dict[str, Callable[[PreparedCase], torch.Tensor]]:
    """Source name -> case -> CAMs (N, K, S, S) float in [0, 1], or labels (N, S, S) int64 (tau-free rows)."""
    out = artifacts.cam_sources(workdir, cfg, cohort, tuple(sorted(needed & {"pcam", "ccam"})))
    if "refined" in needed:
        out["refined"] = lambda case: torch.from_numpy(np.asarray(artifacts.label_stack(workdir, "refine", case), dtype=np.int64))
    return out


def _label_confusion(labels: torch.Tensor, gt: np.ndarray, plane: tuple[int, int], c: int, chunk: int = 8) -> np.ndarray:
    """(C, C) confusion of a label row (N, S, S) upsampled to the source in-plane size (bilinear on one-hot, argmax)."""
    onehot = torch.nn.functional.one_hot(labels.long().clamp(0, c - 1), c).permute(0, 3, 1, 2)
    up = np.concatenate([resize_slices(onehot[a:a + chunk].float(), plane).max(1).indices.numpy()
                         for a in range(0, labels.shape[0], chunk)]).astype(np.int64)
    return confusion(up, gt, c)


def _ground_truth(case: PreparedCase, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth labels of one case (evaluation only): in the canonical view at the source in-plane
    size (N, R, C) int64, and on the canonical S x S grid (N, S, S) uint8 (for the pointing game)."""
    arr = read_ground_truth(case, num_classes).array
    return (np.ascontiguousarray(case.geometry.canonical_view(arr)),
            labels_from_source(case.geometry, arr, num_classes + 1))


def _nanmean(a, axis=None):
    """np.nanmean without the warning for an all-NaN slice (a class absent everywhere stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def run(ctx: base.StageContext) -> dict:
    cfg = ctx.cfg
    cohort = Cohort(ctx.workdir)
    k, c = cohort.num_classes, cohort.num_classes + 1
    cases = [case for case in cohort.cases if case.mask_path]
    if not cases:
        raise UserError("no case has a ground-truth mask; the ablation table compares pseudo-masks with ground truth",
                        path=str(ctx.workdir), fix="add 'mask' to some manifest cases (evaluation only)")
    tau = float(cfg.cam.tau)
    taus = sorted(set(float(t) for t in cfg.evaluate.tau_sweep) | {tau})
    rows = ROWS + ([AFF_ROW] if artifacts.finished(ctx.workdir, "refine") else [])
    sources = _sources(ctx.workdir, cfg, cohort, {r.source for r in rows})
    m_s = artifacts.positional_indicator(ctx.workdir, cohort) if any(r.anatomy for r in rows) else None
    pairs = left_right_pairs(cohort.classes)

    conf = np.zeros((len(rows), len(taus), len(cases), c, c), dtype=np.int64)  # every row, tau and case
    pointing: list = [None for _ in rows]  # tau-free Tally of where each row's CAM peaks (label rows: None)
    for ci, case in enumerate(tqdm(cases, desc="ablation", unit="case", dynamic_ncols=True)):
        gt, gt_small = _ground_truth(case, k)
        tags = case.tags()
        plane = case.geometry.plane_shape
        cache: dict[str, torch.Tensor] = {}
        for ri, row in enumerate(rows):
            if row.source not in cache:
                cache[row.source] = sources[row.source](case)
            maps = cache[row.source]
            if row.anatomy and maps.is_floating_point():
                maps = anatomy_chain(maps, m_s)
            if maps.is_floating_point():
                if pointing[ri] is None:
                    pointing[ri] = Tally.zeros(k)
                pointing[ri] += tally(maps.float().cpu().numpy(), gt_small, tags, TOLERANCE_PX)
                conf[ri, :, ci] = tau_confusions(maps.float().numpy(), gt, plane, taus)
            else:  # a label row (e.g. refined masks): the same at every tau
                conf[ri, :, ci] = _label_confusion(maps, gt, plane, c)[None]

    report_rows = []
    for ri, row in enumerate(rows):
        per_case = dice_from_confusion(conf[ri])  # (T, cases, K)
        sweep = [float(_nanmean(_nanmean(per_case[ti], axis=0))) for ti in range(len(taus))]  # (T,) mean Dice
        sweep_only = [i for i, t in enumerate(taus) if t in set(float(x) for x in cfg.evaluate.tau_sweep)]
        best = max(sweep_only, key=lambda i: (np.nan_to_num(sweep[i], nan=-1.0), -i))
        ti_cfg = taus.index(tau)
        report_rows.append({
            "row": row.name, "cams": row.source, "anatomy": row.anatomy,
            "configured": _summary(cohort, tau, _nanmean(per_case[ti_cfg], axis=0), conf[ri, ti_cfg].sum(0), pairs),
            "oracle": _summary(cohort, taus[best], _nanmean(per_case[best], axis=0), conf[ri, best].sum(0), pairs),
            "sweep": {f"{t:g}": round(v, 4) for t, v in zip(taus, sweep)},
            "pointing_hit_rate": None if pointing[ri] is None else
            {name: _r(v) for name, v in zip(cohort.classes, pointing[ri].pointing_hit_rate())},
            "pointing_slices": None if pointing[ri] is None else {name: int(v) for name, v in zip(cohort.classes, pointing[ri].slices)},
        })
    report = {
        "cohort": cohort.meta.get("name"), "classes": cohort.classes, "cases": [case.id for case in cases],
        "splits": sorted({case.split for case in cases}), "tau": tau, "tau_sweep": [float(t) for t in cfg.evaluate.tau_sweep],
        "left_right_pairs": [[cohort.classes[a - 1], cohort.classes[b - 1]] for a, b in pairs],
        "pointing_tolerance_px": TOLERANCE_PX,
        "rows": report_rows,
    }
    text = render_markdown(report)
    for folder in (ctx.dir, ctx.workdir / "reports"):
        write_json(folder / "ablation.json", report)
        write_text(folder / "ablation.md", text)
    click.echo(text)
    return {"mean_dice": {r["row"]: r["configured"]["mean_dice"] for r in report_rows},
            "oracle_mean_dice": {r["row"]: r["oracle"]["mean_dice"] for r in report_rows},
            "cases": len(cases), "report": "reports/ablation.md"}


def _summary(cohort: Cohort, tau: float, dice: np.ndarray, cm: np.ndarray, pairs: list[tuple[int, int]]) -> dict:
    """Dice per class (K,) and pooled confusion (C, C) -> the JSON block of one row at one tau."""
    swap = {name: None if v is None else round(v, 5) for name, v in swap_rates(cm, pairs, cohort.classes).items()}
    return {"tau": tau, "dice": {name: _r(d) for name, d in zip(cohort.classes, dice)},
            "mean_dice": _r(_nanmean(dice)), "swap": swap}


def _r(v) -> Optional[float]:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def render_markdown(report: dict) -> str:
    """The two tables (configured tau, oracle tau) as Markdown; Dice and swap rates in %."""
    classes = report["classes"]
    swaps = list(report["rows"][0]["configured"]["swap"]) if report["rows"] else []
    base = report["rows"][0]["configured"]["mean_dice"] if report["rows"] else None

    def pct(v):
        return fmt(v, digits=2)

    def table(key: str) -> list[str]:
        ref = report["rows"][0][key]["mean_dice"] if report["rows"] else None
        rows = []
        for r in report["rows"]:
            b = r[key]
            delta = "-" if b["mean_dice"] is None or ref is None else f"{100 * (b['mean_dice'] - ref):+.2f}"
            rows.append([r["row"], f"{b['tau']:g}"] + [pct(b["dice"][n]) for n in classes] + [pct(b["mean_dice"]), delta]
                        + [pct(b["swap"][s]) for s in swaps])
        return markdown_table(["row", "tau"] + classes + ["mean", "vs P-CAM"] + [f"swap {s}" for s in swaps], rows)

    out = [f"# Ablation: pseudo-mask Dice (%) on {report.get('cohort') or 'the cohort'}", "",
           f"{len(report['cases'])} case(s) with ground truth (splits: {', '.join(report['splits'])}); "
           "Dice per case on the source grid, averaged over cases."
           + (" Swap = share of ground-truth voxels of the first organ labelled as the second." if swaps else ""), "",
           f"## At the configured tau ({report['tau']:g})", ""]
    out += table("configured")
    out += ["", "## At the oracle tau (oracle: chosen per row on ground truth from evaluate.tau_sweep; leakage, for reference only)", ""]
    out += table("oracle")
    if any(r.get("pointing_hit_rate") for r in report["rows"]):
        out += ["", "## Pointing game (against ground truth): hit rate (%) of the CAM peak", "",
                f"Per class, the S x S slices tagged with it whose ground-truth region is non-empty; a hit = the class's "
                f"CAM peak inside the organ grown by {report.get('pointing_tolerance_px', TOLERANCE_PX)} px. No tau involved.", ""]
        rows = []
        for r in report["rows"]:
            hit = r.get("pointing_hit_rate")
            if not hit:
                continue
            vals = [hit[n] for n in classes if hit[n] is not None]
            rows.append([r["row"]] + [pct(hit[n]) for n in classes] + [pct(float(np.mean(vals)) if vals else None)])
        out += markdown_table(["row"] + classes + ["mean"], rows)
    if base is None:
        out += ["", "P-CAM has no finite mean Dice: no class was found in any case."]
    return "\n".join(out) + "\n"


STAGE = base.register(base.stage(
    "ablation", run,
    help="The paper's ablation table (P-CAM, +AC, +CC, +AC+CC, and +AC+CC+Aff when refine.enabled) against ground truth: Dice at tau and oracle tau, L/R swaps.",
    examples="ccam ablation --workdir runs/demo\n"
             "ccam run --pipeline pipelines/ablation.yaml --manifest demo_data/manifest.json --workdir runs/abl",
))

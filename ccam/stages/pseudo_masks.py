"""`ccam pseudo-masks`: CAMs of C-CAM (or P-CAM), the anatomy-causality chain, and label maps.

For every case of every split: CAM_cc from C-CAM's fused head with the same multi-scale code as
P-CAM (`ccam.cam.multiscale_cams`, coarse masks from `sample/coarse`), or P-CAM's CAMs from
`sample/cams` when ``ccam.enabled`` is off; CAM_ac = Down(M_s[1:]) * CAM when
``anatomy.enabled`` (`ccam.anatomy.anatomy_chain`); pseudo-mask = argmax([tau, CAM]). The two switches give
the paper's rows P-CAM, +AC, +CC, +AC+CC from the same trained models.

Writes ``pseudo_masks/<id>.nii.gz`` (label map on the source grid: the score maps [tau, CAM] are
upsampled bilinearly before the argmax), ``labels/<id>.npy`` (N, S, S) uint8 and
``cams/<id>.npy`` (N, K, S, S) float16, the CAMs the labels came from, so later stages (and
people) can restart from them. A case whose three files exist is not redone on resume.
"""

from __future__ import annotations

import logging

import numpy as np

from ccam import artifacts
from ccam.anatomy import anatomy_chain
from ccam.cam import autocast, coarse_labels, coarse_mask_volume
from ccam.data.cohort import Cohort, PreparedCase
from ccam.io.atomic import save_npy
from ccam.io.volume import write_label_map
from ccam.progress import tqdm
from ccam.stages import base
from ccam.training import select_device

log = logging.getLogger("ccam")


def _paths(ctx: base.StageContext, case_id: str) -> tuple:
    """The label map on the source grid, the (N, S, S) labels and the (N, K, S, S) CAMs of one case."""
    return (artifacts.mask_path(ctx.workdir, "pseudo-masks", case_id), artifacts.label_stack_path(ctx.workdir, "pseudo-masks", case_id),
            artifacts.cam_stack_path(ctx.workdir, "pseudo-masks", case_id))


def part_cases(ctx: base.StageContext) -> list[PreparedCase]:
    """The cases of the per-case loop, in a fixed order (`ccam.parts` gives part i/n every n-th from the i-th)."""
    return Cohort(ctx.workdir).cases


def run_part(ctx: base.StageContext, cases: list[PreparedCase]) -> None:
    """Pseudo-masks of ``cases`` (those whose three files do not exist yet)."""
    cfg = ctx.cfg
    todo = [c for c in cases if not all(p.exists() for p in _paths(ctx, c.id))]  # the runner clears the folder when settings change
    if not todo:
        return
    cohort = Cohort(ctx.workdir)
    tau, use_ac, use_cc = cfg.cam.tau, cfg.anatomy.enabled, cfg.ccam.enabled
    m_s = artifacts.positional_indicator(ctx.workdir, cohort) if use_ac else None
    if m_s is not None:
        for k, name in enumerate(cohort.classes, start=1):
            if not m_s[k].any():
                log.warning("pseudo-masks: M_s forbids %s everywhere (P-CAM never predicted it); it will be absent", name)
    source = artifacts.cam_sources(ctx.workdir, cfg, cohort, ("ccam",) if use_cc else ("pcam",))["ccam" if use_cc else "pcam"]
    device = select_device(cfg)
    for case in tqdm(todo, desc="pseudo-masks", unit="case", dynamic_ncols=True):
        paths = _paths(ctx, case.id)
        with autocast(cfg.runtime.precision if use_cc else "fp32", device):  # P-CAM's CAMs are read from `sample`
            cams = source(case)
        if m_s is not None:
            cams = anatomy_chain(cams, m_s)
        labels = coarse_labels(cams.float(), tau).numpy().astype(np.uint8)
        geom = case.geometry
        volume = coarse_mask_volume(geom, cams, tau)  # [tau, CAM] upsampled, then argmax, as stage `sample`
        save_npy(paths[2], cams.numpy().astype(np.float16))
        save_npy(paths[1], labels)
        write_label_map(paths[0], volume, geom.affine_array, n_labels=cohort.num_classes,
                        qform_code=geom.qform_code, sform_code=geom.sform_code)


def run(ctx: base.StageContext) -> dict:
    cfg = ctx.cfg
    cohort = Cohort(ctx.workdir)
    tau, use_ac, use_cc = cfg.cam.tau, cfg.anatomy.enabled, cfg.ccam.enabled
    run_part(ctx, cohort.cases)
    counts = np.zeros(cohort.num_classes + 1, dtype=np.int64)
    for case in cohort.cases:
        counts += np.bincount(np.load(_paths(ctx, case.id)[1]).ravel(), minlength=cohort.num_classes + 1)
    share = {name: round(float(counts[k] / max(1, counts.sum())), 5) for k, name in enumerate(cohort.classes, start=1)}
    log.info("pseudo-masks: %d cases from %s CAMs%s, tau=%.2f; voxel share %s", len(cohort.cases),
             "C-CAM" if use_cc else "P-CAM", " + anatomy chain" if use_ac else "", tau,
             ", ".join(f"{k} {v:.3f}" for k, v in share.items()))
    return {"cases": len(cohort.cases), "cams_from": "C-CAM" if use_cc else "P-CAM", "anatomy": use_ac, "tau": tau,
            "row": _row_name(use_cc, use_ac), "voxel_share": share}


def _row_name(cc: bool, ac: bool) -> str:
    """The ablation row these settings reproduce."""
    return {(False, False): "P-CAM", (False, True): "+AC", (True, False): "+CC", (True, True): "+AC+CC"}[(cc, ac)]


STAGE = base.register(base.stage(
    "pseudo-masks", run,
    help="Pseudo-masks for every case: C-CAM (or P-CAM) CAMs, the anatomy chain, argmax with tau, on the source grid.",
    examples="ccam pseudo-masks --workdir runs/demo\n"
             "ccam pseudo-masks --workdir runs/demo --set anatomy.enabled=false   # the +CC row\n"
             "ccam pseudo-masks --workdir runs/demo --set ccam.enabled=false      # the +AC row",
))

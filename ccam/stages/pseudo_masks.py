"""`ccam pseudo-masks`: CAMs of C-CAM (or P-CAM), the anatomy-causality chain, and label maps.

For every case of every split: CAM_cc from C-CAM's fused head with the same multi-scale code as
P-CAM (`ccam.cam.multiscale_cams`, coarse masks from `sample/coarse`), or P-CAM's CAMs from
`sample/cams` when ``ccam.enabled`` is off; CAM_ac = Down(M_s[1:]) * CAM when
``anatomy.enabled`` (`ccam.anatomy`); pseudo-mask = argmax([tau, CAM]). The two switches give
the paper's rows P-CAM, +AC, +CC, +AC+CC from the same trained models.

Writes ``pseudo_masks/<id>.nii.gz`` (label map on the source grid: the score maps [tau, CAM] are
upsampled bilinearly before the argmax), ``labels/<id>.npy`` (N, S, S) uint8 and
``cams/<id>.npy`` (N, K, S, S) float16, the CAMs the labels came from, so later stages (and
people) can restart from them. A case whose three files exist is not redone on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ccam.anatomy import apply_positional_indicator
from ccam.cam import cams_for_slices, coarse_labels, coarse_mask_volume, gradient_explainer
from ccam.data.cohort import Cohort, PreparedCase
from ccam.errors import UserError
from ccam.io.atomic import save_npy
from ccam.io.volume import write_label_map
from ccam.runner import Stage, StageContext, register
from ccam.stages.train_pcam import use_flip
from ccam.stages.train_ccam import load_trained_ccam, read_coarse, read_positional_indicator
from ccam.training import select_device

log = logging.getLogger("ccam")


def pcam_case_cams(sample_dir: Path, case: PreparedCase, num_classes: int) -> torch.Tensor:
    """P-CAM's CAMs of one case, (N, K, S, S) float16, as stage `sample` wrote them."""
    path = Path(sample_dir) / "cams" / f"{case.id}.npy"
    if not path.exists():
        raise UserError("no P-CAM CAMs for this case", case=case.id, path=str(path), fix="re-run `ccam sample --workdir W --force`")
    arr = np.load(path)
    want = (case.n_slices, num_classes, case.geometry.size, case.geometry.size)
    if arr.shape != want:
        raise UserError(f"CAM stack is {arr.shape}, expected (N, K, S, S) = {want}", case=case.id, path=str(path),
                        fix="re-run `ccam sample --workdir W --force`")
    return torch.from_numpy(arr.astype(np.float16))


def ccam_case_cams(model, case: PreparedCase, coarse: np.ndarray, cfg, flip: bool, device: torch.device,
                   explainer=None) -> torch.Tensor:
    """CAM_cc of one case, (N, K, S, S) float16 on the CPU (`ccam.cam.cams_for_slices`, coarse masks as extra input)."""
    return cams_for_slices(model, case.slices(), case.tags(), method=cfg.cam.method, scales=cfg.cam.scales, flip=flip,
                           batch_size=cfg.cam.batch_size, device=device, extra={"coarse": np.asarray(coarse)[:, None]},
                           explainer=explainer)


def cam_sources(ctx: StageContext, cohort: Cohort, which: tuple[str, ...] = ("pcam", "ccam")) -> dict[str, Callable[[PreparedCase], torch.Tensor]]:
    """Case -> CAMs (N, K, S, S) for "pcam" (stage `sample`) and "ccam" (trained C-CAM, loaded once)."""
    cfg = ctx.cfg
    sample_dir = ctx.stage_dir("sample")
    out: dict[str, Callable[[PreparedCase], torch.Tensor]] = {}
    if "pcam" in which:
        out["pcam"] = lambda case: pcam_case_cams(sample_dir, case, cohort.num_classes)
    if "ccam" in which:
        device = select_device(cfg)
        model = load_trained_ccam(ctx.workdir, cfg, cohort, device)
        flip = use_flip(cfg.cam.flip_tta, cohort)
        explainer = None if cfg.cam.method == "cam" else gradient_explainer(model, cfg.cam.method)
        out["ccam"] = lambda case: ccam_case_cams(model, case, read_coarse(sample_dir, case), cfg, flip, device, explainer)
    return out


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    cohort = Cohort(ctx.workdir)
    tau, use_ac, use_cc = cfg.cam.tau, cfg.anatomy.enabled, cfg.ccam.enabled
    m_s = read_positional_indicator(ctx.stage_dir("sample"), cohort) if use_ac else None
    if m_s is not None:
        for k, name in enumerate(cohort.classes, start=1):
            if not m_s[k].any():
                log.warning("pseudo-masks: M_s forbids %s everywhere (P-CAM never predicted it); it will be absent", name)
    source = cam_sources(ctx, cohort, ("ccam",) if use_cc else ("pcam",))["ccam" if use_cc else "pcam"]
    out = ctx.dir
    counts = np.zeros(cohort.num_classes + 1, dtype=np.int64)
    for case in tqdm(cohort.cases, desc="pseudo-masks", unit="case", dynamic_ncols=True):
        paths = (out / f"{case.id}.nii.gz", out / "labels" / f"{case.id}.npy", out / "cams" / f"{case.id}.npy")
        if all(p.exists() for p in paths):  # done before a crash; the runner clears the folder when settings change
            labels = np.load(paths[1])
        else:
            cams = source(case)
            if m_s is not None:
                cams = apply_positional_indicator(cams, m_s)
            labels = coarse_labels(cams.float(), tau).numpy().astype(np.uint8)
            geom = case.geometry
            volume = coarse_mask_volume(geom, cams, tau)  # [tau, CAM] upsampled, then argmax, as stage `sample`
            save_npy(paths[2], cams.numpy().astype(np.float16))
            save_npy(paths[1], labels)
            write_label_map(paths[0], volume, geom.affine_array, n_labels=cohort.num_classes,
                            qform_code=geom.qform_code, sform_code=geom.sform_code)
        counts += np.bincount(labels.ravel(), minlength=cohort.num_classes + 1)
    share = {name: round(float(counts[k] / max(1, counts.sum())), 5) for k, name in enumerate(cohort.classes, start=1)}
    log.info("pseudo-masks: %d cases from %s CAMs%s, tau=%.2f; voxel share %s", len(cohort.cases),
             "C-CAM" if use_cc else "P-CAM", " + anatomy chain" if use_ac else "", tau,
             ", ".join(f"{k} {v:.3f}" for k, v in share.items()))
    return {"cases": len(cohort.cases), "cams_from": "C-CAM" if use_cc else "P-CAM", "anatomy": use_ac, "tau": tau,
            "row": _row_name(use_cc, use_ac), "voxel_share": share}


def _row_name(cc: bool, ac: bool) -> str:
    """The ablation row these settings reproduce."""
    return {(False, False): "P-CAM", (False, True): "+AC", (True, False): "+CC", (True, True): "+AC+CC"}[(cc, ac)]


STAGE = register(Stage(
    name="pseudo-masks", folder="pseudo_masks", sections=("runtime", "pcam", "cam", "anatomy", "ccam"),
    needs=("prepare", "sample", "train-ccam"), run=run,
    help="Pseudo-masks for every case: C-CAM (or P-CAM) CAMs, the anatomy chain, argmax with tau, on the source grid.",
    examples="ccam pseudo-masks --workdir runs/demo\n"
             "ccam pseudo-masks --workdir runs/demo --set anatomy.enabled=false   # the +CC row\n"
             "ccam pseudo-masks --workdir runs/demo --set ccam.enabled=false      # the +AC row",
))

"""`ccam sample`: P-CAM's CAMs, coarse masks and the global sampling maps M_GC and M_s.

DESIGN section 2, "CAM" and "Coarse masks and global sampling":

- CAMs of every slice of every case (all splits) with `ccam.cam` (multi-scale, zeroed for
  untagged classes, normalised per class), saved as ``cams/<id>.npy`` (N, K, S, S) float16;
- Coarse_i = argmax over [tau, CAM_1..CAM_K] -> ``coarse/<id>.npy`` (N, S, S) uint8, and the same
  decision on the source grid -> ``coarse_masks/<id>.nii.gz`` (the "P-CAM" row of the ablation);
- M_GC = mean over *all training slices* of onehot(Coarse_i) -> ``m_gc.npy`` (C, S, S) float32
  and M_s = (M_GC > anatomy.eps) -> ``m_s.npy`` (C, S, S) uint8 (`ccam.anatomy.global_context`,
  `ccam.anatomy.positional_indicator`); one PNG per class of each for a person to look at.

Nothing here reads a ground-truth mask. A crash leaves finished cases in place; the re-run
skips them and carries on.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ccam import artifacts
from ccam.anatomy import global_context, positional_indicator
from ccam.cam import cams_for_slices, coarse_labels, coarse_mask_volume
from ccam.data.cohort import Cohort, PreparedCase
from ccam.errors import UserError
from ccam.io.atomic import atomic_path, save_npy
from ccam.io.volume import write_label_map
from ccam.data.augment import use_flip
from ccam.models.pcam import PCAM
from ccam.progress import tqdm
from ccam.stages import base
from ccam.training import select_device

log = logging.getLogger("ccam")


def load_pcam(workdir, cfg, num_classes: int, device: torch.device) -> PCAM:
    """P-CAM with the weights of stage `train-pcam`, in eval mode on ``device``, laid out for fast CPU convolutions."""
    model = artifacts.load_pcam(workdir, cfg, num_classes, device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)  # ~15 % faster convolutions on CPU (oneDNN)
    return model


def case_outputs(workdir, case: PreparedCase) -> tuple:
    """CAM stack, Coarse_i stack and coarse mask of one case (paths from `ccam.artifacts`)."""
    return (artifacts.cam_stack_path(workdir, "sample", case.id), artifacts.label_stack_path(workdir, "sample", case.id),
            artifacts.mask_path(workdir, "sample", case.id))


def save_map_png(path, image: np.ndarray, title: str, binary: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    im = ax.imshow(image, cmap="gray" if binary else "viridis", vmin=0, vmax=1 if binary else max(float(image.max()), 1e-6),
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    if not binary:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def part_cases(ctx: base.StageContext) -> list[PreparedCase]:
    """The cases of the per-case loop, in a fixed order (`ccam.parts` gives part i/n every n-th from the i-th)."""
    return Cohort(ctx.workdir).cases


def run_part(ctx: base.StageContext, cases: list[PreparedCase]) -> None:
    """CAMs, Coarse_i and coarse masks of ``cases`` (those not already done); M_GC and M_s come in `run`."""
    cfg, cc = ctx.cfg, ctx.cfg.cam
    cohort = Cohort(ctx.workdir)
    if not cohort.split("train"):
        raise UserError("the prepared cohort has no training case", path=str(cohort.root), fix="mark cases 'train' in the manifest and re-run `ccam prepare`")
    todo = [c for c in cases if not all(p.exists() for p in case_outputs(ctx.workdir, c))]
    if len(todo) < len(cases):
        log.info("sample: %d of %d cases already done, resuming", len(cases) - len(todo), len(cases))
    if not todo:
        return
    device = select_device(cfg)
    model = load_pcam(ctx.workdir, cfg, cohort.num_classes, device)
    flip = use_flip(cc.flip_tta, cohort.classes)
    log.info("sample: CAM method %s, scales %s, flip TTA %s, tau %.3f, device %s, %s", cc.method, list(cc.scales),
             "on" if flip else "off", cc.tau, device, cfg.runtime.precision)
    explainer = None
    if cc.method != "cam":
        from ccam.cam import gradient_explainer

        explainer = gradient_explainer(model, cc.method)
    bar = tqdm(total=sum(c.n_slices for c in todo), desc="sample", unit="slice", dynamic_ncols=True)
    for case in todo:
        cams_path, coarse_path, mask_path = case_outputs(ctx.workdir, case)
        cams = cams_for_slices(model, case.slices(), case.tags(), method=cc.method, scales=cc.scales, flip=flip,
                               batch_size=cc.batch_size, device=device, explainer=explainer, progress=bar.update,
                               precision=cfg.runtime.precision)
        coarse = coarse_labels(cams.float(), cc.tau).to(torch.uint8).numpy()
        geom = case.geometry
        labels = coarse_mask_volume(geom, cams, cc.tau)
        write_label_map(mask_path, labels, geom.affine_array, n_labels=cohort.num_classes,
                        qform_code=geom.qform_code, sform_code=geom.sform_code)
        save_npy(coarse_path, coarse)
        save_npy(cams_path, cams.numpy())  # written last: its presence marks the case done
    bar.close()


def run(ctx: base.StageContext) -> dict:
    cfg, cc = ctx.cfg, ctx.cfg.cam
    cohort = Cohort(ctx.workdir)
    out = ctx.dir
    flip = use_flip(cc.flip_tta, cohort.classes)
    run_part(ctx, cohort.cases)

    # M_GC: integer one-hot counts of every training case summed, divided once (`ccam.anatomy.global_context`),
    # so a cohort done in parts (`--part i/n`) gives the same bits as one process
    train_cases = cohort.split("train")
    m_gc, n = global_context((np.load(case_outputs(ctx.workdir, c)[1]) for c in train_cases), cohort.num_classes)
    m_s = positional_indicator(m_gc, cfg.anatomy.eps)
    save_npy(out / "m_gc.npy", m_gc)
    save_npy(out / "m_s.npy", m_s)
    names = ["background"] + list(cohort.classes)
    for c, name in enumerate(names):
        save_map_png(out / f"m_gc_{name}.png", m_gc[c], f"M_GC {name} (mean of {n} training slices)")
        save_map_png(out / f"m_s_{name}.png", m_s[c], f"M_s {name} (M_GC > {cfg.anatomy.eps:g})", binary=True)
    area = {name: float(m_s[c].mean()) for c, name in enumerate(names)}
    log.info("sample: M_GC from %d training slices; M_s covers %s of the slice", n,
             ", ".join(f"{k} {v:.0%}" for k, v in area.items() if k != "background"))
    return {"cases": len(cohort.cases), "training_slices": n, "method": cc.method, "tau": cc.tau, "flip_tta": flip,
            "scales": list(cc.scales), "eps": cfg.anatomy.eps, "m_s_area": area}


STAGE = base.register(base.stage(
    "sample", run,
    help="CAMs of every slice from P-CAM, coarse masks (also as NIfTI on the source grid), and the "
         "global context M_GC and 1/0 positional indicators M_s from the training slices.",
    examples="ccam sample --workdir runs/demo\n"
             "ccam sample --workdir runs/demo --set cam.tau=0.3 --set cam.scales=[1.0,0.5]\n"
             "ccam sample --workdir runs/demo --set cam.method=gradcam",
))

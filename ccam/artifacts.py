"""Typed readers of what the stages wrote: the only way one stage reads another's outputs.

Folder names come from the stage table (`ccam.stages.base.SPECS`); every reader checks shapes
against the prepared cohort and turns a missing or damaged file into a `UserError` that names
the stage to re-run.

| stage | outputs read here |
| --- | --- |
| `train-pcam` | P-CAM weights (`load_pcam`) |
| `sample` | CAM stacks, Coarse_i stacks, coarse masks, M_GC, M_s |
| `train-ccam` | C-CAM weights (`load_ccam`) |
| `pseudo-masks` | CAM stacks (CAM_ac), label stacks, masks |
| `refine` | label stacks, masks |
| `train-seg` | U-Net weights and `model.json` (`load_segmenter`) |
| `predict` | masks |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ccam.cam import cams_for_slices, gradient_explainer
from ccam.data.augment import use_flip
from ccam.data.cohort import Cohort, PreparedCase
from ccam.errors import UserError
from ccam.stages.base import RECORD, folder_of, read_record
from ccam.training import best_or_final, load_checkpoint, load_model_weights, select_device

# per stage: where its (N, S, S) label stacks, (N, K, S, S) CAM stacks and <id>.nii.gz masks lie, inside its folder
LABEL_STACKS = {"sample": "coarse", "pseudo-masks": "labels", "refine": "labels"}
CAM_STACKS = {"sample": "cams", "pseudo-masks": "cams"}
MASKS = {"sample": "coarse_masks", "pseudo-masks": "", "refine": "", "predict": ""}
# the models whose weights made a stage's masks (provenance of exports)
MODELS_BEHIND = {"sample": ("train-pcam",), "pseudo-masks": ("train-pcam", "train-ccam"),
                 "refine": ("train-pcam", "train-ccam", "refine"), "predict": ("train-pcam", "train-ccam", "refine", "train-seg")}
# masks a segmenter trains on, in order of preference
PIPELINE_MASKS = ("refine", "pseudo-masks")


def stage_dir(workdir: Path, name: str) -> Path:
    return Path(workdir) / folder_of(name)


def _rerun(name: str, workdir) -> str:
    return f"re-run `ccam {name} --workdir {workdir} --force`"


# -- records ------------------------------------------------------------------------------------

def finished(workdir: Path, name: str) -> Optional[dict]:
    """The stage's record if it finished and produced outputs (a disabled `refine` did not); else None."""
    rec = read_record(workdir, name)
    if rec is None or (rec.get("outputs") or {}).get("enabled", True) is False:
        return None
    return rec


def record_path(workdir: Path, name: str) -> Path:
    return stage_dir(workdir, name) / RECORD


# -- per-case arrays ------------------------------------------------------------------------------

def _load(path: Path, name: str, workdir, case: Optional[str], what: str, mmap: bool) -> np.ndarray:
    if not path.exists():
        raise UserError(f"no {what} (missing output of stage {name})", case=case, path=str(path), fix=_rerun(name, workdir))
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read the {what} ({str(e).splitlines()[0][:80]})", case=case, path=str(path),
                        fix=_rerun(name, workdir))


def cam_stack(workdir: Path, name: str, case: PreparedCase, num_classes: int, mmap: bool = True) -> np.ndarray:
    """(N, K, S, S) CAMs of one case as stage ``name`` (sample: P-CAM; pseudo-masks: CAM_ac) wrote them."""
    path = cam_stack_path(workdir, name, case.id)
    arr = _load(path, name, workdir, case.id, "CAM stack", mmap)
    want = (case.n_slices, num_classes, case.geometry.size, case.geometry.size)
    if tuple(arr.shape) != want:
        raise UserError(f"CAM stack has shape {tuple(arr.shape)}, expected (N, K, S, S) = {want}", case=case.id, path=str(path),
                        fix=_rerun(name, workdir))
    return arr


def cam_stack_path(workdir: Path, name: str, case_id: str) -> Path:
    return stage_dir(workdir, name) / CAM_STACKS[name] / f"{case_id}.npy"


def label_stack(workdir: Path, name: str, case: PreparedCase, mmap: bool = True) -> np.ndarray:
    """(N, S, S) uint8 labels 0..K of one case (sample: Coarse_i; pseudo-masks, refine: their masks on the S x S grid)."""
    path = label_stack_path(workdir, name, case.id)
    arr = _load(path, name, workdir, case.id, "label stack", mmap)
    s = case.geometry.size
    if tuple(arr.shape) != (case.n_slices, s, s):
        raise UserError(f"label stack has shape {tuple(arr.shape)}, expected (N, S, S) = {(case.n_slices, s, s)}",
                        case=case.id, path=str(path), fix=_rerun(name, workdir))
    return arr


def label_stack_path(workdir: Path, name: str, case_id: str) -> Path:
    return stage_dir(workdir, name) / LABEL_STACKS[name] / f"{case_id}.npy"


def coarse(workdir: Path, case: PreparedCase) -> np.ndarray:
    """Coarse_i of one case: (N, S, S) uint8 in 0..K (stage `sample`)."""
    return label_stack(workdir, "sample", case)


def mask_dir(workdir: Path, name: str) -> Path:
    """Folder of a stage's ``<case_id>.nii.gz`` label maps on the source grids."""
    d = stage_dir(workdir, name)
    return d / MASKS[name] if MASKS[name] else d


def mask_path(workdir: Path, name: str, case_id: str) -> Path:
    return mask_dir(workdir, name) / f"{case_id}.nii.gz"


# -- dataset-level maps of stage `sample` -----------------------------------------------------------

def _sample_map(workdir: Path, cohort: Cohort, file: str, dtype) -> np.ndarray:
    path = stage_dir(workdir, "sample") / file
    arr = _load(path, "sample", workdir, None, file, mmap=False).astype(dtype)
    want = (cohort.num_classes + 1, cohort.slice_size, cohort.slice_size)
    if arr.shape != want:
        raise UserError(f"shape {arr.shape}, expected (C, S, S) = {want}", path=str(path), fix=_rerun("sample", workdir))
    return arr


def global_context(workdir: Path, cohort: Cohort) -> np.ndarray:
    """M_GC (C, S, S) float32 (``sample/m_gc.npy``)."""
    return _sample_map(workdir, cohort, "m_gc.npy", np.float32)


def positional_indicator(workdir: Path, cohort: Cohort) -> np.ndarray:
    """M_s (C, S, S) uint8 0/1 (``sample/m_s.npy``)."""
    return (_sample_map(workdir, cohort, "m_s.npy", np.float32) > 0).astype(np.uint8)


# -- trained models -------------------------------------------------------------------------------

def checkpoint(workdir: Path, name: str) -> Path:
    """The weights a training stage selected (best by validation, else final)."""
    return best_or_final(stage_dir(workdir, name))


def load_pcam(workdir: Path, cfg, num_classes: int, device: torch.device | str = "cpu"):
    """P-CAM with the weights of stage `train-pcam`, in eval mode on ``device``."""
    from ccam.models.pcam import PCAM

    path = checkpoint(workdir, "train-pcam")
    model = PCAM.from_config(cfg.pcam, num_classes)
    try:
        ck = load_checkpoint(path)
    except Exception as e:  # a damaged or foreign file (torch raises several types)
        raise UserError(f"cannot read the P-CAM checkpoint ({type(e).__name__})", path=str(path), fix=_rerun("train-pcam", workdir))
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"P-CAM checkpoint does not fit pcam.backbone={cfg.pcam.backbone}, output_stride={cfg.pcam.stride} "
                        f"({str(e).splitlines()[0][:100]})", path=str(path),
                        fix="use the settings P-CAM was trained with, or re-run `ccam train-pcam --workdir W --force`")
    return model.eval().to(device)


def load_ccam(workdir: Path, cfg, cohort: Cohort, device: torch.device | str = "cpu"):
    """C-CAM with the weights of stage `train-ccam` (M_GC from `sample`), in eval mode on ``device``."""
    from ccam.models.ccam import build_ccam

    model = build_ccam(cfg, cohort, global_context(workdir, cohort))
    path = checkpoint(workdir, "train-ccam")
    try:
        ck = load_checkpoint(path)
    except Exception as e:  # a damaged or foreign file
        raise UserError(f"cannot read the C-CAM checkpoint ({type(e).__name__})", path=str(path), fix=_rerun("train-ccam", workdir))
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint does not fit the configured C-CAM ({str(e).splitlines()[0][:120]})", path=str(path),
                        fix="re-run `ccam train-ccam --workdir W --force` with the same settings")
    return model.to(device).eval()


def load_segmenter(workdir: Path, device: torch.device | str = "cpu"):
    """The U-Net of stage `train-seg` and its ``model.json`` (architecture and preprocessing)."""
    from ccam.models.segmenter import Segmenter

    folder = stage_dir(workdir, "train-seg")
    if not (folder / RECORD).exists() or not (folder / "model.json").exists():
        raise UserError("no trained segmenter in the work directory", path=str(folder),
                        fix=f"run `ccam train-seg --workdir {workdir}` (or `ccam run`) first")
    try:
        meta = json.loads((folder / "model.json").read_text())
        model = Segmenter.from_spec(meta["spec"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read the segmenter's model.json ({type(e).__name__})", path=str(folder / "model.json"),
                        fix=_rerun("train-seg", workdir))
    ck = best_or_final(folder)
    try:
        load_model_weights(model, ck)
    except Exception as e:  # damaged or foreign file
        raise UserError(f"cannot load the segmenter checkpoint ({type(e).__name__})", path=str(ck), fix=_rerun("train-seg", workdir))
    model.to(device).eval()
    return model, meta


# -- CAMs of P-CAM and C-CAM ------------------------------------------------------------------------

def ccam_case_cams(model, case: PreparedCase, coarse: np.ndarray, cfg, flip: bool, device: torch.device,
                   explainer=None) -> torch.Tensor:
    """CAM_cc of one case, (N, K, S, S) float16 on the CPU (`ccam.cam.cams_for_slices`, coarse masks as extra input)."""
    return cams_for_slices(model, case.slices(), case.tags(), method=cfg.cam.method, scales=cfg.cam.scales, flip=flip,
                           batch_size=cfg.cam.batch_size, device=device, extra={"coarse": np.asarray(coarse)[:, None]},
                           explainer=explainer)


def cam_sources(workdir: Path, cfg, cohort: Cohort, which: tuple[str, ...] = ("pcam", "ccam")) -> dict[str, Callable[[PreparedCase], torch.Tensor]]:
    """Case -> CAMs (N, K, S, S) for "pcam" (stage `sample`) and "ccam" (trained C-CAM, loaded once)."""
    out: dict[str, Callable[[PreparedCase], torch.Tensor]] = {}
    if "pcam" in which:
        out["pcam"] = lambda case: torch.from_numpy(
            np.asarray(cam_stack(workdir, "sample", case, cohort.num_classes, mmap=False), dtype=np.float16))
    if "ccam" in which:
        device = select_device(cfg)
        model = load_ccam(workdir, cfg, cohort, device)
        flip = use_flip(cfg.cam.flip_tta, cohort.classes)
        explainer = None if cfg.cam.method == "cam" else gradient_explainer(model, cfg.cam.method)
        out["ccam"] = lambda case: ccam_case_cams(model, case, coarse(workdir, case), cfg, flip, device, explainer)
    return out


# -- the masks a segmenter trains on ------------------------------------------------------------------

def pipeline_masks(workdir: Path) -> Optional[str]:
    """The stage whose masks the segmenter trains on: `refine` when it ran enabled, else `pseudo-masks`; None if neither ran."""
    for name in PIPELINE_MASKS:
        if finished(workdir, name) is not None:
            return name
    return None

"""Class activation maps for every CAM-producing model (P-CAM, C-CAM).

A model exposes ``cam_features(images, **extra) -> (B, D, h, w)`` and ``classifier`` (a 1x1
convolution without bias, D -> K). CAM_k = ReLU(sum_d w_{k,d} F_d) for all K classes comes from
one forward pass per scale, with no gradients; scales are summed after bilinear upsampling to
S x S, zeroed for classes the slice is not tagged with, and normalised per class by the maximum.
Everything stays on torch (and on the model's device) end to end.

``cam.method`` also offers the gradient baselines of the paper's table: ``gradcam`` and
``gradcampp`` are MONAI's `monai.visualize.GradCAM` / `GradCAMpp`; ``layercam`` (Jiang et al.
2021) is the same MONAI machinery with LayerCAM's element-wise weighting. They need one backward
pass per class and are far slower; the same multi-scale sum, tag mask and normalisation apply.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM, GradCAMpp
from monai.visualize.class_activation_maps import ModelWithHooks

METHODS = ("cam", "gradcam", "gradcampp", "layercam")
PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device | str = "cpu"):
    """``runtime.precision``: fp32 runs as is (a no-op context); bf16 runs the network under
    `torch.autocast` in bfloat16 on ``device`` (CPU or CUDA). Callers sum and normalise in float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _cam_at(model, images: torch.Tensor, size: tuple[int, int], **extra: torch.Tensor) -> torch.Tensor:
    feats = model.cam_features(images, **extra)
    cams = F.relu(F.conv2d(feats, model.classifier.weight))
    if hasattr(model, "restrict"):  # the laterality prior the model was trained with
        cams = model.restrict(cams, 0.0)
    return F.interpolate(cams, size=size, mode="bilinear", align_corners=False)


def _resize_extra(v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Extra maps (B, S, S) or (B, E, S, S) to ``hw`` with nearest (labels stay labels), same rank."""
    if v.dim() == 3:
        return F.interpolate(v[:, None].float(), size=hw, mode="nearest")[:, 0]
    return F.interpolate(v.float(), size=hw, mode="nearest")


def _scaled(images: torch.Tensor, extra: Mapping[str, torch.Tensor], s: float):
    size = tuple(images.shape[-2:])
    if s == 1.0:
        return images, dict(extra)
    hw = (max(1, int(round(size[0] * s))), max(1, int(round(size[1] * s))))
    x = F.interpolate(images, size=hw, mode="bilinear", align_corners=False)
    return x, {k: _resize_extra(v, hw) for k, v in extra.items()}


def _finish(total: torch.Tensor, tags: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero untagged classes, then normalise each (slice, class) map by its maximum."""
    if tags is not None:
        total = total * tags[:, :, None, None].to(total.dtype)
    peak = total.amax(dim=(2, 3), keepdim=True)
    return total / peak.clamp_min(1e-5)


@torch.inference_mode()
def multiscale_cams(model, images: torch.Tensor, tags: torch.Tensor | None, scales: Sequence[float] = (1.0,),
                    flip: bool = False, **extra: torch.Tensor) -> torch.Tensor:
    """CAMs (B, K, S, S) in [0, 1] for images (B, 1, S, S) and slice tags (B, K) (None = keep all).

    ``extra`` tensors of shape (B, ..., S, S) (e.g. C-CAM's coarse masks) are passed to
    ``cam_features`` and resized with the image at each scale (nearest, so labels stay labels).
    ``flip`` adds horizontal-flip averaging; never use it when classes have a left/right twin.
    """
    size = tuple(images.shape[-2:])
    total = None
    for s in scales:
        x, ex = _scaled(images, extra, s)
        cam = _cam_at(model, x, size, **ex).float()  # a no-op in fp32; bf16 maps are summed in float32
        if flip:
            cam = cam + _cam_at(model, x.flip(-1), size, **{k: v.flip(-1) for k, v in ex.items()}).flip(-1).float()
        total = cam if total is None else total + cam
    return _finish(total, tags)


class LayerCAM(GradCAM):
    """LayerCAM (Jiang et al., TIP 2021): ReLU(sum_d ReLU(dy_k/dF_d) * F_d), on MONAI's hooks."""

    def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):  # noqa: D102
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        return F.relu((F.relu(grad[layer_idx]) * acti[layer_idx]).sum(1, keepdim=True))


_GRADIENT_METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMpp, "layercam": LayerCAM}


class _BatchedHooks(ModelWithHooks):
    """MONAI's hooks with the class score kept as (B, 1, 1, 1): MONAI's ``squeeze()`` makes it
    (B,), which Grad-CAM++ cannot broadcast against (B, D, h, w) gradients for B > 1."""

    def class_score(self, logits: torch.Tensor, class_idx: int) -> torch.Tensor:
        return logits[:, class_idx].reshape(-1, 1, 1, 1)


def gradient_explainer(model, method: str):
    """A MONAI explainer on the model's CAM layer (``model.cam_layer``, default ``backbone``).

    Create it once per model: MONAI registers hooks on the model for every explainer it builds.
    """
    if method not in _GRADIENT_METHODS:
        raise ValueError(f"unknown gradient CAM method {method!r}; choose one of {sorted(_GRADIENT_METHODS)}")
    layer = getattr(model, "cam_layer", "backbone")
    hooks = _BatchedHooks(model, layer, register_forward=True, register_backward=True)
    return _GRADIENT_METHODS[method](nn_module=hooks, target_layers=layer, postprocessing=lambda t: t)


def gradient_cams(explainer, images: torch.Tensor, tags: torch.Tensor | None, num_classes: int,
                  scales: Sequence[float] = (1.0,), flip: bool = False, **extra: torch.Tensor) -> torch.Tensor:
    """Gradient-based CAMs (B, K, S, S) in [0, 1] (``gradient_explainer``); one backward pass per class.

    Classes no slice of the batch is tagged with are skipped (they are zeroed anyway).
    """
    size = tuple(images.shape[-2:])
    b = images.shape[0]
    wanted = range(num_classes) if tags is None else [k for k in range(num_classes) if bool(tags[:, k].any())]
    total = torch.zeros(b, num_classes, *size, device=images.device)
    with torch.enable_grad():
        for s in scales:
            x, ex = _scaled(images, extra, s)
            views = [(x, ex, False)] + ([(x.flip(-1), {k: v.flip(-1) for k, v in ex.items()}, True)] if flip else [])
            for xv, exv, flipped in views:
                xv = xv.detach().requires_grad_(True)  # so MONAI's full backward hook sees a graph input
                for k in wanted:
                    raw = explainer.compute_map(xv, class_idx=k, **exv)  # (B, 1, h, w)
                    up = F.interpolate(raw.detach(), size=size, mode="bilinear", align_corners=False)[:, 0]
                    total[:, k] += up.flip(-1) if flipped else up
    return _finish(total, tags)


def cams_for_slices(model, slices: np.ndarray | torch.Tensor, tags: np.ndarray | torch.Tensor | None, *,
                    method: str = "cam", scales: Sequence[float] = (1.0,), flip: bool = False, batch_size: int = 32,
                    device: torch.device | str = "cpu", extra: Optional[Mapping[str, np.ndarray | torch.Tensor]] = None,
                    explainer=None, progress: Optional[Callable[[int], None]] = None, precision: str = "fp32") -> torch.Tensor:
    """CAM stack (N, K, S, S) float16 on the CPU for a slice stack (N, S, S) and its tags (N, K).

    Slices go through the model ``batch_size`` at a time on ``device``; ``extra`` maps (N, ...)
    are cut into the same batches. Slices without any tag skip the network: their CAMs are 0.
    ``progress(n)`` is called with the number of slices done after each batch. ``precision``:
    "fp32", or "bf16" to run the network under autocast (`autocast`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {METHODS}")
    n, s = int(slices.shape[0]), int(slices.shape[-1])
    k = int(model.classifier.weight.shape[0])
    out = torch.zeros(n, k, s, s, dtype=torch.float16)
    tag_t = None if tags is None else torch.as_tensor(np.asarray(tags) if not torch.is_tensor(tags) else tags).float()
    todo = torch.arange(n) if tag_t is None else torch.nonzero(tag_t.any(1)).flatten()
    if method != "cam" and explainer is None:
        explainer = gradient_explainer(model, method)
    for a in range(0, len(todo), batch_size):
        idx = todo[a:a + batch_size]
        idx_np = idx.numpy()
        x = torch.as_tensor(np.asarray(slices[idx_np[0]:idx_np[-1] + 1])[idx_np - idx_np[0]] if not torch.is_tensor(slices)
                            else slices[idx], dtype=torch.float32).to(device)[:, None]
        t = None if tag_t is None else tag_t[idx].to(device)
        ex = {name: torch.as_tensor(np.asarray(v)[idx_np] if not torch.is_tensor(v) else v[idx]).to(device)
              for name, v in (extra or {}).items()}
        with autocast(precision, x.device):
            if method == "cam":
                cams = multiscale_cams(model, x, t, scales, flip, **ex)
            else:
                cams = gradient_cams(explainer, x, t, k, scales, flip, **ex)
        out[idx] = cams.to("cpu", torch.float16)
        if progress is not None:
            progress(len(idx))
    return out


def coarse_labels(cams: torch.Tensor, tau: float) -> torch.Tensor:
    """argmax over [tau, CAM_1..CAM_K]: (B, K, S, S) -> label map (B, S, S) in 0..K."""
    bg = torch.full_like(cams[:, :1], tau)
    return torch.cat([bg, cams], dim=1).max(1).indices  # = argmax(1) (first maximum), ~10x faster on CPU


def coarse_scores(cams: torch.Tensor, tau: float) -> torch.Tensor:
    """[tau, CAM_1..CAM_K] (B, K+1, S, S) float32: the scores whose argmax is `coarse_labels`."""
    cams = cams.float()
    return torch.cat([torch.full_like(cams[:, :1], tau), cams], dim=1)


def coarse_mask_volume(geometry, cams: np.ndarray | torch.Tensor, tau: float, chunk: int = 16) -> np.ndarray:
    """A case's coarse mask on its source grid (I, J, K) uint8 from its CAM stack (N, K, S, S).

    The scores [tau, CAM] are upsampled to the source in-plane size before the argmax (smoother
    than resampling the S x S labels); evaluation's tau sweep should use this same function.
    """
    from ccam.io.geometry import scores_to_source

    cams_t = torch.as_tensor(np.asarray(cams)) if not torch.is_tensor(cams) else cams
    return scores_to_source(geometry, _LazyScores(cams_t, tau), chunk=chunk)


class _LazyScores:
    """(N, K+1, S, S) view of [tau, CAM] built a chunk at a time (the full stack may be large)."""

    def __init__(self, cams: torch.Tensor, tau: float):
        self.cams, self.tau = cams, tau
        self.shape = (cams.shape[0], cams.shape[1] + 1) + tuple(cams.shape[2:])

    def __getitem__(self, sl) -> torch.Tensor:
        return coarse_scores(self.cams[sl], self.tau)

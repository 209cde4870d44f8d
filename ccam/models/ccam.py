"""C-CAM: the category-causality chain fused into a second slice classifier (paper Eqs. 2-3).

Per slice, the coarse mask Coarse_i (from P-CAM, stage `sample`) asks "which classes does this
slice look like?"; ``category_attention`` answers with a softmax A (1 x C) over the classes of
the dataset-level global context M_GC (C, S, S), and the per-image location prior is
M_c = Down(A M_GC), average-pooled to the feature grid. The classifier sees [F, M_c]
(D + 1 channels): 1x1 conv to K score maps pooled as P-CAM's (GAP or top-k) to K logits, so CAMs come from the same code as P-CAM's
(`ccam.cam.multiscale_cams(model, images, tags, scales, coarse=coarse)`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ccam.models.pcam import CAMHead, build_trunk, class_logits

ENCODINGS = ("index", "onehot")


def resolve_coarse_encoding(setting: str, num_classes: int) -> str:
    """``ccam.coarse_encoding`` -> "index" | "onehot" for K = ``num_classes`` foreground classes.

    auto = one-hot when K > 1: a label map fed to a linear Phi treats class ids as magnitudes
    (spleen = 4 x liver), one-hot gives each class its own weights; with K = 1 both carry the
    same information and the label map is C times smaller.
    """
    if setting == "auto":
        return "onehot" if num_classes > 1 else "index"
    if setting not in ENCODINGS:
        raise ValueError(f"coarse_encoding must be auto, index or onehot, got {setting!r}")
    return setting


def encode_coarse(coarse: torch.Tensor, num_classes: int, encoding: str) -> torch.Tensor:
    """Coarse label maps (B, S, S) in 0..K -> (B, E, S, S) float: E = 1 (index, scaled to [0, 1]) or C (one-hot)."""
    labels = coarse.long().clamp(0, num_classes)
    if encoding == "onehot":
        return F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()
    # label / K keeps the input scale of Phi independent of the number of classes
    return (labels.float() / max(1, num_classes))[:, None]


class CategoryAttention(nn.Module):
    """category_attention (Eqs. 2-3): A = softmax(Phi(Coarse) Theta(M_GC)^T), M_c = Down(A M_GC).

    Phi and Theta are learned linear maps from the flattened S x S grid to C. With the one-hot
    encoding the E = C channels of Coarse are concatenated into one E*S^2 vector (equivalently:
    one Phi_c per channel, summed), so A stays 1 x C per slice as in the paper.
    """

    def __init__(self, grid_size: int, num_maps: int, coarse_channels: int = 1):
        super().__init__()
        self.grid_size, self.num_maps = grid_size, num_maps
        self.phi = nn.Linear(coarse_channels * grid_size * grid_size, num_maps)  # Phi: Coarse -> R^C
        self.theta = nn.Linear(grid_size * grid_size, num_maps)  # Theta: each M_GC map -> R^C

    def attention(self, coarse: torch.Tensor, global_context: torch.Tensor) -> torch.Tensor:
        """A (B, C): coarse (B, E, S, S) encoded, global_context M_GC (C, S, S)."""
        q = self.phi(coarse.flatten(1))  # (B, C)
        k = self.theta(global_context.flatten(1))  # (C, C)
        return torch.softmax(q @ k.t(), dim=-1)

    def forward(self, coarse: torch.Tensor, global_context: torch.Tensor,
                size: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_c (B, 1, h, w), A (B, C)); M_c at ``size`` (adaptive average pooling), else S x S."""
        a = self.attention(coarse, global_context)
        s = self.grid_size
        m_c = (a @ global_context.flatten(1)).view(-1, 1, s, s)  # convex mix of the M_GC maps
        if size is not None and tuple(size) != (s, s):
            m_c = F.adaptive_avg_pool2d(m_c, size)
        return m_c, a


class FeatureFusion(nn.Module):
    """[F, M_c]: (B, D, h, w) and (B, 1, h, w) -> (B, D + 1, h, w); a named layer for gradient CAM hooks."""

    def forward(self, features: torch.Tensor, m_c: torch.Tensor) -> torch.Tensor:
        return torch.cat([features, m_c.to(features.dtype)], dim=1)


class CCAM(CAMHead):
    """Backbone + category attention + fused head over [F, M_c]; ``forward`` gives logits (B, K).

    ``global_context`` M_GC (C, S, S) is a buffer, so a checkpoint holds everything inference
    needs. ``cam_features(images, coarse=...)`` + ``classifier`` (1x1 conv D+1 -> K, no bias) is
    the interface of `ccam.cam`.
    """

    def __init__(self, num_classes: int, global_context: torch.Tensor, backbone: str | nn.Module = "resnet18",
                 output_stride: int = 16, coarse_encoding: str = "onehot", in_channels: int = 1,
                 pooling: str = "gap", topk_fraction: float = 0.01):
        """``backbone``: a ResNet name, or a trunk module with ``out_channels`` (e.g. P-CAM's, so the
        architecture always matches the P-CAM checkpoint it is initialised from)."""
        super().__init__()
        if coarse_encoding not in ENCODINGS:
            raise ValueError(f"coarse_encoding must be one of {ENCODINGS} (resolve 'auto' first)")
        c, s, s2 = global_context.shape
        if c != num_classes + 1 or s != s2:
            raise ValueError(f"global_context must be (K+1, S, S) = ({num_classes + 1}, S, S), got {tuple(global_context.shape)}")
        self.num_classes, self.grid_size, self.coarse_encoding = num_classes, s, coarse_encoding
        # pooled as P-CAM's; the laterality prior is copied from P-CAM by `init_from_pcam`
        self._init_head(num_classes, pooling, topk_fraction)
        self.backbone = build_trunk(backbone, output_stride, in_channels) if isinstance(backbone, str) else backbone
        self.feature_dim = self.backbone.out_channels
        self.register_buffer("global_context", global_context.float().clone())
        self.category_attention = CategoryAttention(s, c, c if coarse_encoding == "onehot" else 1)
        self.fusion = FeatureFusion()
        self.cam_layer = "fusion"  # gradient CAM methods (`cam.method`) hook the fused features
        self.classifier = nn.Conv2d(self.feature_dim + 1, num_classes, kernel_size=1, bias=False)

    def init_from_pcam(self, pcam_state: dict) -> None:
        """Backbone and the first D head weights from a P-CAM state dict; the M_c weight starts at 0."""
        backbone = {k[len("backbone."):]: v for k, v in pcam_state.items() if k.startswith("backbone.")}
        self.backbone.load_state_dict(backbone)
        w = pcam_state["classifier.weight"]  # (K, D, 1, 1)
        if w.shape[:2] != (self.num_classes, self.feature_dim):
            raise ValueError(f"P-CAM head is {tuple(w.shape[:2])}, C-CAM needs ({self.num_classes}, {self.feature_dim})")
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.weight[:, : self.feature_dim] = w
            for name in ("sides", "side_margin"):
                if name in pcam_state:
                    getattr(self, name).copy_(pcam_state[name])
        # P-CAM at step 0: logits and CAMs equal P-CAM's until the M_c weight is learned

    def _coarse_at_grid(self, coarse: torch.Tensor) -> torch.Tensor:
        """(B, S', S') or (B, 1, S', S') labels (multi-scale resizes them) -> (B, S, S) at the M_GC grid."""
        if coarse.dim() == 4:
            coarse = coarse[:, 0]
        if tuple(coarse.shape[-2:]) != (self.grid_size, self.grid_size):
            coarse = F.interpolate(coarse[:, None].float(), size=(self.grid_size,) * 2, mode="nearest")[:, 0]
        return coarse

    def location_prior(self, coarse: torch.Tensor, size: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """M_c (B, 1, h, w) and attention A (B, C) for coarse label maps (B, [1,] S, S)."""
        enc = encode_coarse(self._coarse_at_grid(coarse), self.num_classes, self.coarse_encoding)
        return self.category_attention(enc, self.global_context, size)

    def cam_features(self, x: torch.Tensor, coarse: Optional[torch.Tensor] = None, warp: Optional[torch.Tensor] = None,
                     **_: torch.Tensor) -> torch.Tensor:
        """[F, M_c]: images (B, 1, H, W), coarse (B, [1,] S, S) -> (B, D + 1, H/os, W/os).

        ``warp`` (B, 2, 3): the affine (``F.affine_grid`` convention) that geometric augmentation
        applied to the images; M_c is warped with it at S x S before pooling, so the location
        prior stays on the anatomy it describes. The attention A reads the unwarped Coarse, which
        lives on the same canonical grid as M_GC.
        """
        if coarse is None:
            raise ValueError("C-CAM needs the coarse masks of the slices (coarse=...)")
        f = self.backbone(x)
        if warp is None:
            m_c, _ = self.location_prior(coarse, tuple(f.shape[-2:]))
        else:
            m_c, _ = self.location_prior(coarse)
            grid = F.affine_grid(warp.to(m_c.dtype), list(m_c.shape), align_corners=False)
            m_c = F.adaptive_avg_pool2d(F.grid_sample(m_c, grid, mode="bilinear", align_corners=False), tuple(f.shape[-2:]))
        return self.fusion(f, m_c)

    def forward(self, x: torch.Tensor, coarse: Optional[torch.Tensor] = None, warp: Optional[torch.Tensor] = None,
                **extra: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) for images (B, 1, H, W) and their coarse masks (B, [1,] S, S)."""
        return class_logits(self, self.cam_features(x, coarse=coarse, warp=warp, **extra))

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone (initialised from P-CAM) at ``lr``; the new head and attention at ``lr * head_lr_mult``."""
        head = list(self.classifier.parameters()) + list(self.category_attention.parameters())
        return [{"params": self.backbone.parameters(), "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]


def build_ccam(cfg, cohort, global_context) -> CCAM:
    """C-CAM on a trunk built exactly as P-CAM's (``pcam`` settings); M_GC (C, S, S) as its buffer."""
    import numpy as np

    from ccam.models.pcam import PCAM

    enc = resolve_coarse_encoding(cfg.ccam.coarse_encoding, cohort.num_classes)
    trunk = PCAM.from_config(cfg.pcam, cohort.num_classes).backbone
    return CCAM(cohort.num_classes, torch.from_numpy(np.asarray(global_context, dtype=np.float32)),
                backbone=trunk, coarse_encoding=enc, pooling=cfg.pcam.pooling, topk_fraction=cfg.pcam.topk_fraction)

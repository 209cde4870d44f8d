"""Anatomy-causality chain: the 1/0 positional indicator M_s forbids a class where it never occurs.

M_s (C, S, S) comes from stage `sample` (M_s[c] = M_GC[c] > eps over the training slices).
CAM_ac = Down(M_s[1:]) * CAM: every class is zeroed outside the region where P-CAM's coarse
masks ever put it, so an organ with a look-alike twin (left / right kidney) cannot be painted on
the twin's side. Down is a max-pool, so the indicator stays exactly 0/1 at any CAM resolution.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def positional_indicator(m_s: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Down(M_s[1:]): (C, S, S) 0/1 -> (K, h, w) 0/1 float; max-pool when shrinking, nearest when growing.

    The max-pool keeps a class allowed in a coarse cell if it is allowed anywhere inside it, so
    shrinking never forbids a pixel the full-resolution indicator allows.
    """
    fg = torch.as_tensor(np.asarray(m_s) if not torch.is_tensor(m_s) else m_s)[1:].float()[None]
    size = (int(size[0]), int(size[1]))
    if tuple(fg.shape[-2:]) == size:
        out = fg
    elif size[0] <= fg.shape[-2] and size[1] <= fg.shape[-1]:
        out = F.adaptive_max_pool2d(fg, size)
    else:
        out = F.interpolate(fg, size=size, mode="nearest")
    return (out[0] > 0).float()


def apply_positional_indicator(cams: torch.Tensor, m_s: torch.Tensor | np.ndarray) -> torch.Tensor:
    """CAM_ac = Down(M_s[1:]) * CAM: cams (B, K, H, W), M_s (K+1, S, S) -> (B, K, H, W)."""
    if torch.as_tensor(np.asarray(m_s) if not torch.is_tensor(m_s) else m_s).shape[0] != cams.shape[1] + 1:
        raise ValueError(f"M_s has {m_s.shape[0]} maps; CAMs need K+1 = {cams.shape[1] + 1}")
    ind = positional_indicator(m_s, tuple(cams.shape[-2:])).to(device=cams.device, dtype=cams.dtype)
    return cams * ind[None]

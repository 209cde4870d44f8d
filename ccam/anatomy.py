"""The paper's dataset-level maps and the anatomy-causality chain (DESIGN section 2), defined once.

- ``global_context``: **M_GC** = (1/N) sum_i onehot(Coarse_i), the per-class spatial frequency of
  P-CAM's coarse masks over the N training slices (Eq. 1, one-hot so the shapes agree).
- ``positional_indicator``: **M_s** = 1 where M_GC > eps, else 0 (the 1/0 positional indicator).
- ``anatomy_chain``: **CAM_ac** = Down(M_s[1:]) * CAM: every class is zeroed outside the region
  where P-CAM's coarse masks ever put it, so an organ with a look-alike twin (left / right
  kidney) cannot be painted on the twin's side.
- ``down_indicator``: **Down** of M_s to a CAM's resolution, a max-pool, so the indicator stays
  exactly 0/1 and shrinking never forbids a pixel the full-resolution indicator allows.

Stage `sample` builds M_GC and M_s; stages `pseudo-masks`, `refine` and `ablation` apply the chain.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F


def global_context(coarse_stacks: Iterable[np.ndarray], num_classes: int) -> tuple[np.ndarray, int]:
    """M_GC (C, S, S) float32 = mean of onehot(Coarse_i) over every slice of ``coarse_stacks`` ((N, S, S) each),
    and the number of slices N. Integer counts are summed first and divided once."""
    counts, n = None, 0
    for coarse in coarse_stacks:
        onehot = F.one_hot(torch.as_tensor(np.asarray(coarse), dtype=torch.long), num_classes + 1)  # (N, S, S, C)
        c = onehot.sum(0, dtype=torch.int64).permute(2, 0, 1)
        counts = c if counts is None else counts + c
        n += int(coarse.shape[0])
    if counts is None or n == 0:
        raise ValueError("no slices to average")
    return (counts.double() / n).float().numpy(), n


def positional_indicator(m_gc: np.ndarray, eps: float) -> np.ndarray:
    """M_s (C, S, S) uint8 = 1 where M_GC > eps (eps = 0: wherever any coarse mask put the class)."""
    return (np.asarray(m_gc) > eps).astype(np.uint8)


def down_indicator(m_s: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Down(M_s[1:]): (C, S, S) 0/1 -> (K, h, w) 0/1 float; max-pool when shrinking, nearest when growing."""
    fg = torch.as_tensor(np.asarray(m_s) if not torch.is_tensor(m_s) else m_s)[1:].float()[None]
    size = (int(size[0]), int(size[1]))
    if tuple(fg.shape[-2:]) == size:
        out = fg
    elif size[0] <= fg.shape[-2] and size[1] <= fg.shape[-1]:
        out = F.adaptive_max_pool2d(fg, size)
    else:
        out = F.interpolate(fg, size=size, mode="nearest")
    return (out[0] > 0).float()


def anatomy_chain(cams: torch.Tensor, m_s: torch.Tensor | np.ndarray) -> torch.Tensor:
    """CAM_ac = Down(M_s[1:]) * CAM: cams (B, K, H, W) (CAMs or any per-class scores), M_s (K+1, S, S) -> (B, K, H, W)."""
    if torch.as_tensor(np.asarray(m_s) if not torch.is_tensor(m_s) else m_s).shape[0] != cams.shape[1] + 1:
        raise ValueError(f"M_s has {m_s.shape[0]} maps; CAMs need K+1 = {cams.shape[1] + 1}")
    ind = down_indicator(m_s, tuple(cams.shape[-2:])).to(device=cams.device, dtype=cams.dtype)
    return cams * ind[None]

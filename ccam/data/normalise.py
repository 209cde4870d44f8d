"""Intensity normalisation of a volume to [0, 1], shared by `prepare` and `predict` (DESIGN section 3).

CT is clipped to an HU window; MR to the volume's percentiles (from a strided subsample: close to
exact, and no full-volume copy). Both are scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np

from ccam.errors import UserError


def normaliser(modality: str, array: np.ndarray, ct_window, mr_percentiles, case: str | None = None, path=None):
    """Return f(block float32) -> block in [0, 1] for this volume; a constant volume is a UserError
    (no anatomy to see: an export or conversion went wrong)."""
    lo_v, hi_v = np.nanmin(array), np.nanmax(array)
    if not lo_v < hi_v:
        raise UserError(f"image is constant (every voxel {lo_v})", case=case, path=None if path is None else str(path),
                        fix="check the export of this volume")
    if modality == "CT":
        lo, hi = float(ct_window[0]), float(ct_window[1])
    else:
        # percentiles from a strided subsample: close to exact, and no full-volume copy
        step = max(1, int(round((array.size / 4e6) ** (1 / 3))))
        sub = np.asarray(array[::step, ::step, ::step], dtype=np.float32)
        lo, hi = (float(v) for v in np.percentile(sub, mr_percentiles))
    scale = 1.0 / max(hi - lo, 1e-6)

    def f(block: np.ndarray) -> np.ndarray:
        np.clip(block, lo, hi, out=block)
        block -= lo
        block *= scale
        return block

    return f

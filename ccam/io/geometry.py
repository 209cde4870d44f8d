"""Mapping between a source volume and its stack of S x S canonical slices, both ways.

A slice stack is (N, S, S): slice n is the file's slice n along the resolved slice axis (so tag
indices stay in the file's own voxel order), and each slice is shown in a fixed anatomical view
(radiological: axial rows run anterior->posterior and columns patient right->left), whatever the
stored orientation. Every case therefore puts the same anatomy at the same pixel, which the
dataset-level context maps M_GC and M_s rely on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ccam.io.volume import AXIS_OF_SLICE

# in-plane view per slice axis: (row world axis, row sign, col world axis, col sign), RAS world
_VIEW = {
    "axial": (1, -1, 0, -1),  # rows A->P, cols R->L
    "coronal": (2, -1, 0, -1),  # rows S->I, cols R->L
    "sagittal": (2, -1, 1, -1),  # rows S->I, cols A->P
}


@dataclass
class SliceGeometry:
    """Everything needed to go from the file grid to the S x S stack and back."""

    shape: tuple[int, int, int]  # file voxel grid (I, J, K)
    affine: list  # 4x4 RAS affine of the file
    slice_axis: str
    perm: tuple[int, int, int]  # file axes giving (slice, row, col)
    flip_row: bool
    flip_col: bool
    size: int  # S
    qform_code: int = 1
    sform_code: int = 1

    @classmethod
    def from_affine(cls, shape, affine, slice_axis: str, size: int, qform_code: int = 1, sform_code: int = 1) -> "SliceGeometry":
        ornt = nib.orientations.io_orientation(np.asarray(affine))
        row_w, row_s, col_w, col_s = _VIEW[slice_axis]
        axis_of_world = {int(w): i for i, w in enumerate(ornt[:, 0])}
        sign_of_world = {int(w): float(ornt[i, 1]) for i, w in enumerate(ornt[:, 0])}
        perm = (axis_of_world[AXIS_OF_SLICE[slice_axis]], axis_of_world[row_w], axis_of_world[col_w])
        return cls(
            shape=tuple(int(s) for s in shape), affine=np.asarray(affine, dtype=np.float64).tolist(),
            slice_axis=slice_axis, perm=perm, flip_row=sign_of_world[row_w] != row_s,
            flip_col=sign_of_world[col_w] != col_s, size=int(size), qform_code=int(qform_code), sform_code=int(sform_code),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "SliceGeometry":
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["perm"] = tuple(d["perm"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def n_slices(self) -> int:
        return self.shape[self.perm[0]]

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.shape[self.perm[1]], self.shape[self.perm[2]]

    @property
    def affine_array(self) -> np.ndarray:
        return np.asarray(self.affine, dtype=np.float64)

    def canonical_view(self, array: np.ndarray) -> np.ndarray:
        """(I, J, K) file array -> (N, R, C) view (no copy): slice, row, col in the canonical view."""
        v = np.transpose(array, self.perm)
        if self.flip_row:
            v = v[:, ::-1, :]
        if self.flip_col:
            v = v[:, :, ::-1]
        return v

    def to_file_order(self, stack: np.ndarray) -> np.ndarray:
        """(N, R, C) canonical stack at source in-plane size -> (I, J, K) file array (a view)."""
        v = stack
        if self.flip_row:
            v = v[:, ::-1, :]
        if self.flip_col:
            v = v[:, :, ::-1]
        return np.transpose(v, np.argsort(self.perm))


def resize_slices(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, *size), bilinear, antialiased when shrinking."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    shrink = size[0] < slices.shape[-2] or size[1] < slices.shape[-1]
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def scores_to_source(geom: SliceGeometry, scores: np.ndarray | torch.Tensor, chunk: int = 16) -> np.ndarray:
    """Per-class scores (N, C, S, S) -> label map (I, J, K) on the source grid.

    Scores are upsampled bilinearly before the argmax, which keeps boundaries smooth.
    """
    out = np.empty((geom.n_slices,) + geom.plane_shape, dtype=np.uint8 if scores.shape[1] <= 256 else np.uint16)
    for a in range(0, geom.n_slices, chunk):
        block = torch.as_tensor(np.asarray(scores[a:a + chunk]) if not torch.is_tensor(scores) else scores[a:a + chunk]).float()
        out[a:a + chunk] = resize_slices(block, geom.plane_shape).max(1).indices.numpy()  # = argmax(1), ~10x faster on CPU
    return np.ascontiguousarray(geom.to_file_order(out))


def labels_to_source(geom: SliceGeometry, labels: np.ndarray, n_classes: int, chunk: int = 16) -> np.ndarray:
    """Label stack (N, S, S) in 0..n_classes-1 -> label map (I, J, K) on the source grid (one-hot resampling)."""
    out = np.empty((geom.n_slices,) + geom.plane_shape, dtype=np.uint8 if n_classes <= 256 else np.uint16)
    for a in range(0, geom.n_slices, chunk):
        block = torch.as_tensor(np.asarray(labels[a:a + chunk]).astype(np.int64))
        onehot = F.one_hot(block, n_classes).permute(0, 3, 1, 2).float()
        out[a:a + chunk] = resize_slices(onehot, geom.plane_shape).max(1).indices.numpy()
    return np.ascontiguousarray(geom.to_file_order(out))


def labels_from_source(geom: SliceGeometry, labels: np.ndarray, n_classes: int, chunk: int = 16) -> np.ndarray:
    """Label map (I, J, K) on the source grid -> (N, S, S) uint8 stack (e.g. corrected masks for training)."""
    view = geom.canonical_view(labels)
    out = np.empty((geom.n_slices, geom.size, geom.size), dtype=np.uint8)
    for a in range(0, geom.n_slices, chunk):
        block = torch.as_tensor(np.ascontiguousarray(view[a:a + chunk]).astype(np.int64))
        onehot = F.one_hot(block.clamp(0, n_classes - 1), n_classes).permute(0, 3, 1, 2).float()
        out[a:a + chunk] = resize_slices(onehot, (geom.size, geom.size)).max(1).indices.numpy()
    return out

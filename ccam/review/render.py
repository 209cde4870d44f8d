"""Pictures of one case for the review report (matplotlib, PNG, no pyplot state).

Every view is the canonical radiological one of `ccam.io.geometry` (axial: rows anterior ->
posterior, columns patient right -> left; coronal: superior -> inferior, right -> left;
sagittal: superior -> inferior, anterior -> posterior), whatever the file's voxel order, with the
pixel aspect of the voxel spacing and the side markers in the corners of the picture.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ccam.export.labels import class_colours
from ccam.io.atomic import write_bytes
from ccam.io.geometry import SliceGeometry

# (left, right, top, bottom) markers of each canonical view
MARKERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
N_AXIAL = 6


def view_of(shape, affine, plane: str) -> SliceGeometry:
    return SliceGeometry.from_affine(shape, affine, plane, size=1)


def window(image: np.ndarray) -> tuple[float, float]:
    """Display range: 1st..99th percentile of the volume."""
    lo, hi = np.percentile(np.asarray(image, dtype=np.float32), [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def overlay_rgba(labels: np.ndarray, colours: list[tuple[int, int, int]], alpha: float = 0.45) -> np.ndarray:
    """(R, C) labels -> (R, C, 4) float RGBA, transparent where 0."""
    lut = np.zeros((len(colours) + 1, 4), np.float32)
    for k, rgb in enumerate(colours, start=1):
        lut[k, :3] = np.asarray(rgb, np.float32) / 255.0
        lut[k, 3] = alpha
    return lut[np.clip(labels, 0, len(colours))]


def render_plane(image2d: np.ndarray, labels2d: np.ndarray, aspect: float, plane: str, title: str,
                 colours: list[tuple[int, int, int]], vrange: tuple[float, float], px: int = 320) -> bytes:
    """One slice with its mask overlay, contours and side markers as PNG bytes. Arrays are (R, C)."""
    rows, cols = image2d.shape
    h_units, w_units = rows * aspect, cols
    scale = px / max(h_units, w_units)
    dpi = 100
    fig = Figure(figsize=(max(w_units * scale, 60) / dpi, max(h_units * scale, 60) / dpi + 0.25), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    ax = fig.add_axes((0, 0, 1, 1 - 0.25 / fig.get_figheight()))
    ax.imshow(np.asarray(image2d, np.float32), cmap="gray", vmin=vrange[0], vmax=vrange[1], aspect=aspect,
              interpolation="nearest")
    if labels2d.any():
        ax.imshow(overlay_rgba(labels2d, colours), aspect=aspect, interpolation="nearest")
        for k, rgb in enumerate(colours, start=1):
            if (labels2d == k).any() and (labels2d == k).sum() < labels2d.size:
                ax.contour((labels2d == k).astype(np.float32), levels=[0.5], colors=[tuple(np.asarray(rgb) / 255.0)],
                           linewidths=0.8)
    ax.set_axis_off()
    left, right, top, bottom = MARKERS[plane]
    style = dict(color="yellow", fontsize=9, fontweight="bold", transform=ax.transAxes)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    fig.text(0.5, 1 - 0.02 / fig.get_figheight(), title, color="white", fontsize=8, ha="center", va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="black")
    return buf.getvalue()


def _aspect(geom: SliceGeometry, affine: np.ndarray) -> float:
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return float(spacing[geom.perm[1]] / spacing[geom.perm[2]])


def pick_axial(present: np.ndarray, n: int = N_AXIAL) -> list[int]:
    """``n`` evenly spaced slice indices over the slices where ``present`` (N,) is true (else the middle 80 %)."""
    idx = np.flatnonzero(present)
    lo, hi = (int(idx[0]), int(idx[-1])) if len(idx) else (int(0.1 * len(present)), int(0.9 * (len(present) - 1)))
    picks = np.unique(np.round(np.linspace(lo, hi, min(n, hi - lo + 1))).astype(int))
    return [int(p) for p in picks]


def render_case(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, classes: list[str], folder: Path) -> dict:
    """Write the case's PNGs into ``folder``; returns {"axial": [{file, title}], "coronal": {...}, "sagittal": {...},
    "thumb": file} with file names relative to ``folder``'s parent."""
    folder = Path(folder)
    colours = class_colours(classes)
    vrange = window(image)
    fg = mask > 0
    centre = np.array([float(np.mean(a)) for a in np.nonzero(fg)]) if fg.any() else (np.array(mask.shape) - 1) / 2.0
    out: dict = {"axial": []}
    ax_geom = view_of(mask.shape, affine, "axial")
    img_v, lab_v = ax_geom.canonical_view(image), ax_geom.canonical_view(mask)
    aspect = _aspect(ax_geom, affine)
    n = lab_v.shape[0]
    for s in pick_axial(np.asarray(lab_v > 0).any(axis=(1, 2))):
        z = float((np.asarray(affine) @ np.r_[_index_at(ax_geom, s, mask.shape), 1.0])[2])
        name = f"axial_{s:04d}.png"
        write_bytes(folder / name, render_plane(img_v[s], np.asarray(lab_v[s]), aspect, "axial",
                                                f"axial slice {s} (0-{n - 1})  z = {z:.0f} mm", colours, vrange))
        out["axial"].append({"file": f"{folder.name}/{name}", "title": f"axial slice {s} of 0-{n - 1} (z = {z:.0f} mm)", "slice": s})
    centre_slice = int(round(centre[ax_geom.perm[0]]))
    thumb = render_plane(img_v[centre_slice], np.asarray(lab_v[centre_slice]), aspect, "axial", out_id(folder), colours,
                         vrange, px=140)
    write_bytes(folder / "thumb.png", thumb)
    out["thumb"] = f"{folder.name}/thumb.png"
    for plane in ("coronal", "sagittal"):
        g = view_of(mask.shape, affine, plane)
        s = int(round(centre[g.perm[0]]))
        name = f"{plane}.png"
        write_bytes(folder / name, render_plane(g.canonical_view(image)[s], np.asarray(g.canonical_view(mask)[s]),
                                                _aspect(g, affine), plane, f"{plane} through the organ centroid",
                                                colours, vrange))
        out[plane] = {"file": f"{folder.name}/{name}", "title": f"{plane} reformat through the centroid of the masks"}
    return out


def out_id(folder: Path) -> str:
    return Path(folder).name


def _index_at(geom: SliceGeometry, s: int, shape) -> np.ndarray:
    """A voxel index (3,) on slice ``s`` of the view (the middle of the plane)."""
    ijk = (np.array(shape, dtype=np.float64) - 1) / 2.0
    ijk[geom.perm[0]] = s
    return ijk

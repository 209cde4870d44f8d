"""Label descriptions for viewers: ITK-SNAP label file, 3D Slicer colour table, labels.json.

Colours are fixed per class name (3D Slicer's GenericAnatomyColors where it has the organ), so a
class looks the same in every export and every viewer; unknown names get colours from a fixed
palette by their index.
"""

from __future__ import annotations

from pathlib import Path

from ccam.io.atomic import write_json, write_text

# RGB per class name; left/right twins get distinguishable shades of the same hue family
KNOWN_COLOURS = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (185, 102, 83),
    "right_kidney": (185, 102, 83),
    "left_kidney": (212, 126, 151),
    "pancreas": (249, 180, 111),
    "gallbladder": (139, 150, 98),
    "stomach": (216, 132, 105),
    "aorta": (224, 97, 76),
    "heart": (206, 110, 84),
    "lung": (197, 165, 145),
    "right_lung": (197, 165, 145),
    "left_lung": (172, 138, 115),
    "bladder": (222, 154, 132),
    "prostate": (230, 158, 140),
    "bone": (241, 214, 145),
    "tumor": (144, 238, 144),
    "lesion": (144, 238, 144),
}
PALETTE = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (0, 200, 200), (200, 0, 200),
           (255, 128, 0), (128, 0, 255), (0, 128, 255), (128, 255, 0), (255, 0, 128), (128, 128, 0)]


def class_colours(classes: list[str]) -> list[tuple[int, int, int]]:
    """RGB of classes[k] (label k + 1)."""
    return [KNOWN_COLOURS.get(c.lower(), PALETTE[i % len(PALETTE)]) for i, c in enumerate(classes)]


def itksnap_text(classes: list[str]) -> str:
    """ITK-SNAP label description file (load with `itksnap -l file` or Segmentation > Import Label Descriptions)."""
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format: ",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields: ",
        "#    IDX:   Zero-based index ",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    IDX:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description ",
        "################################################",
        f"{0:5d} {0:5d} {0:4d} {0:4d} {0:8.2f} {0:2d} {0:2d}    \"Clear Label\"",
    ]
    for k, (name, (r, g, b)) in enumerate(zip(classes, class_colours(classes)), start=1):
        lines.append(f"{k:5d} {r:5d} {g:4d} {b:4d} {1:8.2f} {1:2d} {1:2d}    \"{name}\"")
    return "\n".join(lines) + "\n"


def slicer_ctbl_text(classes: list[str]) -> str:
    """3D Slicer colour table (.ctbl): ``index name R G B A`` per line (load it with Add Data)."""
    lines = ["# Color table file ccam_labels.ctbl", f"# {len(classes) + 1} values", "0 background 0 0 0 0"]
    for k, (name, (r, g, b)) in enumerate(zip(classes, class_colours(classes)), start=1):
        lines.append(f"{k} {name.replace(' ', '_')} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def labels_json(classes: list[str]) -> dict:
    """MONAI Label style ``{"labels": {name: value}}`` plus colours."""
    return {"labels": {"background": 0, **{c: k for k, c in enumerate(classes, start=1)}},
            "colors": {c: list(rgb) for c, rgb in zip(classes, class_colours(classes))}}


def write_label_descriptions(folder: Path, classes: list[str]) -> dict[str, str]:
    """Write the three description files into ``folder``; returns {kind: file name}."""
    folder = Path(folder)
    names = {"itksnap": "labels_itksnap.txt", "slicer": "labels_slicer.ctbl", "json": "labels.json"}
    write_text(folder / names["itksnap"], itksnap_text(classes))
    write_text(folder / names["slicer"], slicer_ctbl_text(classes))
    write_json(folder / names["json"], labels_json(classes))
    return names

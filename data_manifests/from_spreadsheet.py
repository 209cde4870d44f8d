"""Write a ccam manifest from a spreadsheet of start/end slices (saved as CSV).

The spreadsheet has one row per (case, class, range):

    case_id,image,split,class,start,end
    p001,images/p001.nii.gz,train,liver,40,71
    p001,images/p001.nii.gz,train,left_kidney,52,60
    p002,images/p002.nii.gz,test,liver,38,69

``start`` and ``end`` are inclusive 0-based slice indices along the slice axis, as a viewer shows
the file (ITK-SNAP and 3D Slicer count from 0; if your viewer counts from 1, pass --one-based).
A class may have several rows per case (an organ interrupted along the axis).

    python data_manifests/from_spreadsheet.py tags.csv --name my-cohort --modality CT \
        --classes liver,right_kidney,left_kidney,spleen --out data_manifests/my_cohort.json

Paths in the spreadsheet are relative to the manifest's folder. Check the result with
``ccam prepare --manifest data_manifests/my_cohort.json --workdir runs/my_cohort``: every problem
is listed with its case and field.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def manifest_from_rows(rows: list[dict], name: str, modality: str, classes: list[str], one_based: bool = False) -> dict:
    cases: dict[str, dict] = {}
    for i, row in enumerate(rows, start=2):
        try:
            cid, cls = row["case_id"].strip(), row["class"].strip()
            start, end = int(row["start"]), int(row["end"])
        except (KeyError, ValueError, AttributeError) as e:
            raise SystemExit(f"line {i}: needs case_id, image, split, class, start, end ({e})")
        if one_based:
            start, end = start - 1, end - 1
        case = cases.setdefault(cid, {"id": cid, "image": row["image"].strip(), "split": (row.get("split") or "train").strip(),
                                      "tags": {}})
        case["tags"].setdefault(cls, []).append([start, end])
    for case in cases.values():
        for ranges in case["tags"].values():
            ranges.sort()
    return {"name": name, "modality": modality, "slice_axis": "axial", "classes": classes, "cases": list(cases.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spreadsheet", help="CSV with columns case_id,image,split,class,start,end")
    ap.add_argument("--name", required=True)
    ap.add_argument("--modality", choices=["CT", "MR"], required=True)
    ap.add_argument("--classes", required=True, help="comma-separated, in label order (label = position + 1)")
    ap.add_argument("--one-based", action="store_true", help="start/end count slices from 1")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with open(a.spreadsheet, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    data = manifest_from_rows(rows, a.name, a.modality, [c.strip() for c in a.classes.split(",")], a.one_based)
    Path(a.out).write_text(json.dumps(data, indent=2) + "\n")
    print(f"{len(data['cases'])} case(s) -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

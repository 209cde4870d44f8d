"""Benchmark `ccam prepare`: throughput and peak RSS (issue 2).

1. 20 synthetic MR volumes of 256 x 256 x 80 -> slices per second and peak RSS.
2. One CT-like volume of 512 x 512 x 300 -> peak RSS against 2.5 x its size as float32.

Each `ccam prepare` runs in its own process; peak RSS is that process's ru_maxrss. The RSS of a
process that only imports the stage (Python + torch + nibabel) is printed as the baseline.

    .venv/bin/python benchmarks/prepare_speed.py [--out /tmp/ccam_bench_prepare] [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
from _proc import run_child


def child_peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of cmd run in its own process."""
    wall, rss, _ = run_child(cmd)
    return wall, rss


def write_cohort(out: Path, n: int, shape, modality: str) -> Path:
    from ccam.data.phantom import CLASSES, make_phantom_volume, tags_from_mask, axial_axis

    (out / "images").mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        img, mask, aff = make_phantom_volume(shape, modality=modality, seed=i, orientation=["RAS", "LPS"][i % 2])
        nib.save(nib.Nifti1Image(img, aff), out / "images" / f"c{i:03d}.nii.gz")
        cases.append({"id": f"c{i:03d}", "image": f"images/c{i:03d}.nii.gz",
                      "tags": tags_from_mask(mask, axial_axis(aff)), "split": "train"})
    m = {"name": "bench", "modality": modality, "slice_axis": "axial", "classes": CLASSES, "cases": cases}
    (out / "manifest.json").write_text(json.dumps(m))
    return out / "manifest.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ccam_bench_prepare")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--slice-size", type=int, default=256)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--shape", default="256,256,80")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ccam = [sys.executable, "-m", "ccam.cli"]
    _, base = child_peak_rss_mb([sys.executable, "-c", "import ccam.stages.prepare"])
    print(f"baseline RSS (python + torch + ccam imported): {base:.0f} MB")

    t = time.time()
    man = write_cohort(out / "cohort20", args.cases, tuple(int(v) for v in args.shape.split(",")), "MR")
    print(f"generated {args.cases} x {args.shape} MR volumes in {time.time() - t:.1f} s")
    wall, rss = child_peak_rss_mb(ccam + ["prepare", "-m", str(man), "-w", str(out / "w20"), "--set", f"data.slice_size={args.slice_size}"])
    rec = json.loads((out / "w20" / "prepare" / "_stage.json").read_text())
    n = rec["outputs"]["slices"]
    print(f"prepare {args.cases} volumes: {n} slices in {wall:.1f} s wall (incl. ~start-up) -> {n / wall:.1f} slices/s; "
          f"stage time {rec['duration_s']:.1f} s -> {n / rec['duration_s']:.1f} slices/s; peak RSS {rss:.0f} MB")

    if not args.skip_big:
        t = time.time()
        man = write_cohort(out / "big", 1, (512, 512, 300), "CT")
        print(f"generated 512x512x300 CT volume in {time.time() - t:.1f} s")
        wall, rss = child_peak_rss_mb(ccam + ["prepare", "-m", str(man), "-w", str(out / "wbig"), "--set", f"data.slice_size={args.slice_size}"])
        vol_mb = 512 * 512 * 300 * 4 / 2**20
        print(f"prepare 512x512x300 CT: {wall:.1f} s, peak RSS {rss:.0f} MB = {rss / vol_mb:.2f} x the volume as float32 "
              f"({vol_mb:.0f} MB; goal <= 2.5 x = {2.5 * vol_mb:.0f} MB); above baseline: {(rss - base) / vol_mb:.2f} x")


if __name__ == "__main__":
    main()

"""Benchmark `ccam predict --input`: slices per second and peak RSS on a 512 x 512 x 300 CT-like volume.

Goal (issue 6): peak RSS under 3 GB. Steps:

1. a segmenter with the configured architecture (default `seg` settings, slice size S) is trained
   for one epoch on a 5-case CT phantom (the weights do not matter for speed, only the network);
2. one CT-like volume of 512 x 512 x 300 (``make_phantom_volume((512, 512, 300), modality="CT")``)
   is written as NIfTI;
3. ``ccam predict --input vol.nii.gz --output DIR`` runs in its own process; its wall time, its
   throughput (slices / s) and its peak RSS (ru_maxrss) are printed, with and without
   ``--probabilities``. The RSS of a process that only imports ccam's predict is the baseline.

    .venv/bin/python benchmarks/predict_throughput.py [--out /tmp/ccam_bench_predict] [--slice-size 256]
        [--threads 0] [--skip-probabilities]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _proc import run_child

CCAM = [sys.executable, "-m", "ccam.cli"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ccam_bench_predict")
    ap.add_argument("--slice-size", type=int, default=256, help="S of the segmenter (default: the config default)")
    ap.add_argument("--threads", type=int, default=0, help="runtime.num_threads (0 = torch default)")
    ap.add_argument("--shape", default="512,512,300")
    ap.add_argument("--skip-probabilities", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(v) for v in a.shape.split(","))
    sets = ["--set", f"runtime.num_threads={a.threads}"]

    w = out / "work"
    if not (w / "seg" / "_stage.json").exists():
        from ccam.data.phantom import make_phantom_cohort

        t = time.time()
        man = make_phantom_cohort(out / "cohort", n_cases=5, seed=1, modality="CT", shape=(64, 64, 12))
        for cmd in (["prepare", "-m", str(man), "-w", str(w), "--set", f"data.slice_size={a.slice_size}"],
                    ["train-seg", "-w", str(w), "--masks", str(out / "cohort" / "masks"), "--set", "seg.epochs=1"]):
            r = subprocess.run(CCAM + cmd + sets, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{cmd[0]} failed:\n{r.stderr[-2000:]}")
        print(f"setup: segmenter with the default architecture at S={a.slice_size} ({time.time() - t:.0f} s)")

    vol = out / f"ct_{'x'.join(map(str, shape))}.nii.gz"
    if not vol.exists():
        from ccam.data.phantom import make_phantom_volume, save_nifti

        t = time.time()
        img, _, aff = make_phantom_volume(shape, modality="CT", seed=3)
        save_nifti(img, aff, vol)
        print(f"setup: CT-like volume {shape} int16 written ({time.time() - t:.0f} s, {img.nbytes / 2**20:.0f} MB in memory)")
        del img

    _, base, _ = run_child([sys.executable, "-c", "import ccam.stages.predict"])
    spec = json.loads((w / "seg" / "model.json").read_text())["spec"]
    print(f"\nnetwork: {spec['network']} channels {spec['channels']}, S = {a.slice_size}, threads = {a.threads or 'default'}")
    print(f"baseline RSS (python + torch + ccam imported): {base:.0f} MB")
    n = shape[2]
    runs = [("labels", [])] + ([] if a.skip_probabilities else [("labels + --probabilities", ["--probabilities"])])
    print("\n| output | slices | wall s | slices/s | peak RSS MB |\n| --- | ---: | ---: | ---: | ---: |")
    for name, extra in runs:
        dest = out / ("pred_" + ("prob" if extra else "lab"))
        wall, rss, _ = run_child(CCAM + ["predict", "-w", str(w), "--input", str(vol), "--output", str(dest)] + extra + sets)
        print(f"| {name} | {n} | {wall:.1f} | {n / wall:.1f} | {rss:.0f} |")
    print("\ngoal: peak RSS < 3072 MB for labels -> see the first row (wall time includes reading, "
          "normalising, resampling and writing the NIfTI)")


if __name__ == "__main__":
    main()

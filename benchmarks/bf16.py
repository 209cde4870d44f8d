"""Benchmark ``runtime.precision: bf16`` against fp32 for CAM extraction (stage `sample`) (issue 12).

Goals: speed-up >= 1.5x where the CPU has bf16 instructions, and coarse-mask Dice within 0.5
points of fp32. The stage is run on a copy of one prepared phantom work directory with a trained
P-CAM, once per precision (``--force``); Dice of the coarse masks (``sample/coarse_masks``) against
the phantom's ground truth is computed here (evaluation only). Reports the CPU's bf16 flags
(avx512_bf16: bf16 dot products; amx_bf16: tile matrix units).

    .venv/bin/python benchmarks/bf16.py [--workdir /tmp/ccam_bf16] [--cases 8] [--epochs 5] [--wait-idle 600]

Rows are appended to benchmarks/results/bf16.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from under_load import CLI, cpu_model, wait_idle  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bf16.jsonl"


def ccam(args: list[str]) -> None:
    p = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"ccam {' '.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


def cpu_flags() -> list[str]:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return sorted(f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2") if f in flags)


def folder_dice(w: Path, folder: Path) -> dict:
    """Dice (%) of ``folder/<case_id>.nii.gz`` against the cohort's ground truth (evaluation only):
    per class averaged over the cases that have both, and the mean of the classes."""
    from ccam.data.cohort import Cohort
    from ccam.io.volume import read_volume
    from ccam.metrics import dice_per_class, read_ground_truth

    cohort = Cohort(w)
    per = []
    for case in cohort.cases:
        if not case.mask_path or not (folder / f"{case.id}.nii.gz").exists():
            continue
        gt = np.asarray(read_ground_truth(case).array).astype(np.int64)
        pred = np.asarray(read_volume(folder / f"{case.id}.nii.gz", case=case.id).array).astype(np.int64)
        per.append(dice_per_class(pred, gt, cohort.num_classes))
    d = np.nanmean(np.array(per, dtype=np.float64), axis=0)
    return {"classes": dict(zip(cohort.classes, [round(100 * float(v), 2) for v in d])), "mean": round(100 * float(np.nanmean(d)), 2)}


def coarse_dice(w: Path) -> dict:
    return folder_dice(w, w / "sample" / "coarse_masks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ccam_bf16")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5, help="pcam.epochs of the P-CAM whose CAMs are extracted")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per precision (the fastest counts)")
    ap.add_argument("--wait-idle", type=float, default=600.0)
    a = ap.parse_args()
    root = Path(a.workdir)
    w = root / "w"
    if not (w / "pcam" / "_stage.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        ccam(["phantom", "--out", str(root / "cohort"), "--cases", str(a.cases), "--seed", "0"])
        ccam(["-q", "prepare", "--manifest", str(root / "cohort" / "manifest.json"), "-w", str(w),
              "--config", str(REPO / "configs" / "demo.yaml")])
        ccam(["-q", "train-pcam", "-w", str(w), "--set", f"pcam.epochs={a.epochs}"])
    idle, waited, load = wait_idle(a.wait_idle)
    flags = cpu_flags()
    res = {}
    for prec in ("fp32", "bf16"):
        times = []
        for _ in range(a.repeats):
            ccam(["-q", "sample", "-w", str(w), "--force", "--set", f"runtime.precision={prec}"])
            times.append(json.loads((w / "sample" / "_stage.json").read_text())["duration_s"])
        res[prec] = {"stage_s": min(times), "runs_s": times, "dice": coarse_dice(w)}
    speedup = res["fp32"]["stage_s"] / res["bf16"]["stage_s"]
    dd = res["bf16"]["dice"]["mean"] - res["fp32"]["dice"]["mean"]
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmark": "bf16", "stage": "sample (CAM extraction, configs/demo.yaml)",
           "cases": a.cases, "machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores", "cpu_flags": flags,
           "idle": idle, "load1_at_start": load, "fp32": res["fp32"], "bf16": res["bf16"],
           "speedup": round(speedup, 2), "dice_change_points": round(dd, 2),
           "goal_speed_met": speedup >= 1.5, "goal_dice_met": abs(dd) <= 0.5}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"sample (CAM extraction) on {a.cases} phantom cases; {row['machine']}; bf16 flags: "
          f"{', '.join(f for f in flags if 'bf16' in f) or 'none'}; machine idle: {'yes' if idle else 'NO'} (load {load:.2f})\n")
    print("| precision | stage s | coarse Dice % (mean) |\n| --- | ---: | ---: |")
    for prec in ("fp32", "bf16"):
        print(f"| {prec} | {res[prec]['stage_s']:.1f} | {res[prec]['dice']['mean']:.2f} |")
    print(f"\nspeed-up {speedup:.2f}x (goal >= 1.5x: {'met' if row['goal_speed_met'] else 'NOT met'}); "
          f"Dice change {dd:+.2f} points (goal within 0.5: {'met' if row['goal_dice_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()

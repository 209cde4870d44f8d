"""Benchmark issue 4: the ablation table on the demo cohort, the goals, and the stage times.

1. ``ccam phantom --out D --cases 20 --seed 0`` (skipped when D/manifest.json exists);
2. ``ccam run --pipeline pipelines/ablation.yaml --manifest D/manifest.json --workdir W --config configs/demo.yaml``;
3. ``ccam pseudo-masks --workdir W`` (not in the ablation pipeline; timed for the demo budget).

Prints the table, the stage times (from each stage's ``_stage.json``), and the goals:
+AC+CC mean Dice >= P-CAM + 10 points at the configured tau; left/right swap rate <= 2 % in the
rows with the anatomy chain (P-CAM's figure beside it); train-ccam <= 120 s, pseudo-masks <= 40 s.

    .venv/bin/python benchmarks/ablation_demo.py [--data /tmp/ccam_demo_data] [--workdir /tmp/ccam_bench_ablation] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CCAM = [sys.executable, "-m", "ccam.cli"]


def sh(args: list[str]) -> float:
    t = time.time()
    rc = subprocess.call(CCAM + [str(a) for a in args], cwd=REPO)
    if rc != 0:
        sys.exit(f"failed (exit {rc}): ccam {' '.join(str(a) for a in args)}")
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/ccam_demo_data")
    ap.add_argument("--workdir", default="/tmp/ccam_bench_ablation")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    a = ap.parse_args()
    data, work = Path(a.data), Path(a.workdir)
    if a.fresh and work.exists():
        shutil.rmtree(work)
    if not (data / "manifest.json").exists():
        sh(["phantom", "--out", data, "--cases", "20", "--seed", "0"])
    sh(["run", "--pipeline", REPO / "pipelines" / "ablation.yaml", "--manifest", data / "manifest.json",
        "--workdir", work, "--config", a.config])
    sh(["pseudo-masks", "--workdir", work, "--config", a.config])

    times = {}
    for folder, name in (("prepare", "prepare"), ("pcam", "train-pcam"), ("sample", "sample"), ("ccam", "train-ccam"),
                         ("ablation", "ablation"), ("pseudo_masks", "pseudo-masks")):
        rec = work / folder / "_stage.json"
        times[name] = json.loads(rec.read_text())["duration_s"] if rec.exists() else None
    report = json.loads((work / "reports" / "ablation.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}

    print()
    print((work / "reports" / "ablation.md").read_text())
    print("stage times (s): " + ", ".join(f"{k} {v}" for k, v in times.items()))
    base = rows["P-CAM"]["configured"]["mean_dice"]
    full = rows["+AC+CC"]["configured"]["mean_dice"]
    gain = 100 * (full - base)
    print(f"goal 1: +AC+CC mean Dice {100 * full:.2f} vs P-CAM {100 * base:.2f}: {gain:+.2f} points "
          f"(goal >= +10): {'MET' if gain >= 10 else f'NOT MET by {10 - gain:.2f} points'}")
    for name in ("P-CAM", "+AC", "+CC", "+AC+CC"):
        swap = rows[name]["configured"]["swap"]
        worst = max((v for v in swap.values() if v is not None), default=None)
        text = ", ".join(f"{k} {100 * v:.2f} %" for k, v in swap.items() if v is not None) or "no left/right pair"
        goal = ""
        if "AC" in name and worst is not None:
            goal = f" (goal <= 2 %: {'MET' if worst <= 0.02 else f'NOT MET by {100 * worst - 2:.2f} points'})"
        print(f"goal 2: swap {name}: {text}{goal}")
    for name, limit in (("train-ccam", 120), ("pseudo-masks", 40)):
        t = times.get(name)
        print(f"budget: {name} {t} s (<= {limit} s: {'MET' if t is not None and t <= limit else 'NOT MET'})")


if __name__ == "__main__":
    main()

"""Benchmark `ccam demo`: wall time per stage, total, the Dice table, and a second (no-op) run.

Goal (issue 6): the whole demo (20 synthetic cases of 160 x 160 x ~40, every stage of
pipelines/ccam.yaml with configs/demo.yaml) within 15 minutes on 2 CPU cores; train-seg within
3 minutes and predict + evaluate + export within 1 minute. Also compares the segmenter's Dice on
the test cases with the pseudo-masks' Dice on the training cases (the paper: 83.8 vs 77.3 on ProMRI).

The demo runs as `ccam demo` in its own process, in a fresh work directory unless --keep.

    .venv/bin/python benchmarks/demo_timing.py [--workdir /tmp/ccam_bench_demo] [--cases 20] [--keep]
        [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_demo(workdir: Path, cases: int, sets: list[str]) -> tuple[float, str, str]:
    cmd = [sys.executable, "-m", "ccam.cli", "demo", "--workdir", str(workdir), "--cases", str(cases)]
    for s in sets:
        cmd += ["--set", s]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ccam demo failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return time.time() - t, p.stdout, p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ccam_bench_demo")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="reuse the work directory (default: start fresh)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = ap.parse_args()
    w = Path(a.workdir)
    if w.exists() and not a.keep:
        shutil.rmtree(w)

    wall, out, _ = run_demo(w, a.cases, a.sets)
    from ccam.runner import get_stage, load_pipeline, read_record

    names = [s if isinstance(s, str) else s["stage"] for s in load_pipeline()["stages"]]
    print(f"ccam demo, {a.cases} cases, first run: {wall:.0f} s ({wall / 60:.1f} min; goal <= 15 min on 2 CPU cores)\n")
    print("| stage | wall s |\n| --- | ---: |")
    per = {}
    for n in names:
        rec = read_record(w, get_stage(n)) or {}
        per[n] = rec.get("duration_s")
        print(f"| {n} | {'-' if per[n] is None else f'{per[n]:.1f}'} |")
    stages_s = sum(v for v in per.values() if v)
    print(f"| (cohort generation, export, start-up) | {wall - stages_s:.1f} |")
    if per.get("train-seg") is not None:
        print(f"\ntrain-seg: {per['train-seg']:.0f} s (goal <= 180 s)")
    tail = sum(per.get(n) or 0 for n in ("predict", "evaluate"))
    print(f"predict + evaluate: {tail:.0f} s (+ export, in the last row; goal <= 60 s together)")

    rep_path = w / "reports" / "evaluation.json"
    if rep_path.exists():
        rep = json.loads(rep_path.read_text())
        from ccam.commands.demo import dice_table

        print("\nDice (%) per stage and class:\n")
        print(dice_table(rep))
        st = rep["stages"]
        try:
            seg = st["predicted"]["summary"]["test"]["dice"]["mean"]["mean"]
            src = "refined" if "refined" in st else "pseudo"
            pm = st[src]["summary"]["train"]["dice"]["mean"]["mean"]
            verdict = "met" if seg >= pm else "NOT met"
            print(f"\ngoal: segmenter Dice on test {100 * seg:.1f} >= {src}-mask Dice on train {100 * pm:.1f}: {verdict}")
        except (KeyError, TypeError):
            print("\ngoal: segmenter vs pseudo-mask Dice: not measurable (a stage is missing from the report)")

    wall2, out2, _ = run_demo(w, a.cases, a.sets)
    same = "every stage was up to date" in out2
    print(f"\nsecond run right after: {wall2:.1f} s ({'every stage up to date' if same else 'something ran again!'})")


if __name__ == "__main__":
    main()

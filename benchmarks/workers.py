"""DataLoader workers against compute threads (issue 12): does a worker process help a training stage?

Times a stage (train-pcam by default) for each ``threads:workers`` pair, alone and next to one
busy-loop process, with `benchmarks/under_load.py`'s machinery (same idle wait, same foreign-CPU
accounting, ccam's OpenMP wait policy). ``runtime.num_workers: auto`` follows what this shows:
on CPU, workers take only the cores the compute threads leave free.

    .venv/bin/python benchmarks/workers.py [--pairs 2:0,2:1,1:0,1:1] [--cases 8] [--epochs 4] [--repeats 2]

Rows are appended to benchmarks/results/workers.jsonl; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import under_load  # noqa: E402  (benchmarks/ is not a package)

RESULTS = under_load.REPO / "benchmarks" / "results" / "workers.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="train-pcam")
    ap.add_argument("--pairs", default="2:0,2:1,1:0,1:1", help="threads:workers pairs")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=600.0)
    ap.add_argument("--workdir", default="/tmp/ccam_workers")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    workdir = Path(a.workdir)
    under_load.setup(workdir, a.cases)
    base = [f"pcam.epochs={a.epochs}"] if a.stage == "train-pcam" else []
    under_load.ccam(["-q", a.stage, "-w", str(workdir / "w")] + [x for s in base for x in ("--set", s)], dict(os.environ))
    idle, waited, load_start = under_load.wait_idle(a.wait_idle)
    machine = f"{under_load.cpu_model()}, {len(os.sched_getaffinity(0))} cores (affinity)"
    rows = []
    for pair in a.pairs.split(","):
        t, w = (int(x) for x in pair.split(":"))
        sets = base + [f"runtime.num_threads={t}", f"runtime.num_workers={w}"]
        for comp in (0, 1):
            runs = [under_load.timed_stage(workdir, a.stage, sets, "after", comp) for _ in range(a.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmark": "workers", "stage": a.stage,
                         "cases": a.cases, "threads": t, "workers": w, "competitors": comp, "repeats": a.repeats,
                         **{k: round(v, 3) for k, v in med.items()}, "runs_stage_s": [r["stage_s"] for r in runs],
                         "machine": machine, "load1_at_start": load_start,
                         "idle": bool(idle and max(r["foreign_cpu_share"] for r in runs) < 0.1)})
            print(f"  threads {t} workers {w} competitors {comp}: stage {med['stage_s']:.1f} s", file=sys.stderr)
    if not a.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{a.stage}, {a.cases} phantom cases, {' '.join(base)}; {machine}; "
          f"idle at start: {'yes' if idle else 'NO'} (load {load_start:.2f}); idle rows {sum(r['idle'] for r in rows)}/{len(rows)}\n")
    print("| threads | workers | alone (s) | with 1 busy process (s) |")
    print("| ---: | ---: | ---: | ---: |")
    for pair in a.pairs.split(","):
        t, w = (int(x) for x in pair.split(":"))
        r0, r1 = (next(r for r in rows if r["threads"] == t and r["workers"] == w and r["competitors"] == c) for c in (0, 1))
        print(f"| {t} | {w} | {r0['stage_s']:.1f} | {r1['stage_s']:.1f} |")


if __name__ == "__main__":
    main()

"""Benchmark a stage's wall time alone and next to one competing CPU-bound process (issue 12).

Goal: with one competitor (a busy-loop python process) on a 2-core machine, at most 3x the idle
wall time. Measured before and after the fix of `ccam.threads` (idle OpenMP threads sleep
instead of spinning): "before" runs the stage with ``CCAM_OMP_WAIT=default`` (libgomp's own
spin-then-sleep default), "after" with ccam's setting. Both runs start the CLI through
`ccam.threads.prepare_openmp` first, which is what ``import ccam`` does, so the same code path is
measured whichever way the command is started.

Timings only mean something on an otherwise idle machine: the script first waits (up to
``--wait-idle`` seconds) until the 1-minute load average is below 0.3, and records in every row
whether it was, and how much CPU time *other* processes used while that row ran
(``foreign_cpu_share``: share of all cores; a row is ``idle`` when the wait succeeded and that
share stayed below 0.1).

    .venv/bin/python benchmarks/under_load.py [--stage train-pcam] [--cases 8] [--epochs 3]
        [--modes before,after] [--repeats 1] [--wait-idle 600] [--workdir /tmp/ccam_under_load]

Rows are appended to benchmarks/results/under_load.jsonl; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "under_load.jsonl"
IDLE_LOAD = 0.3
GOAL = 3.0
CLI = ("import sys; from ccam import threads; threads.prepare_openmp(); "
       "from ccam.cli import main; sys.exit(main(sys.argv[1:]))")
BUSY = "while True: pass"


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_idle(limit_s: float) -> tuple[bool, float, float]:
    """Poll until the 1-minute load is below IDLE_LOAD; (idle?, seconds waited, load at the end)."""
    t0 = time.time()
    while True:
        v = load1()
        if v < IDLE_LOAD:
            return True, time.time() - t0, v
        if time.time() - t0 >= limit_s:
            return False, time.time() - t0, v
        print(f"  waiting for an idle machine: 1-min load {v:.2f} (>= {IDLE_LOAD}), {time.time() - t0:.0f} s so far",
              file=sys.stderr)
        time.sleep(15)


def busy_jiffies() -> int:
    """CPU time (clock ticks) every process of the machine used so far: /proc/stat minus idle and iowait."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(f) - f[3] - f[4]


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def ccam(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, cwd=REPO)
    if check and p.returncode != 0:
        sys.exit(f"ccam {' '.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return p


def setup(workdir: Path, cases: int) -> None:
    if (workdir / "w" / "prepare" / "_stage.json").exists():
        return
    shutil.rmtree(workdir, ignore_errors=True)
    env = dict(os.environ)
    ccam(["phantom", "--out", str(workdir / "cohort"), "--cases", str(cases), "--seed", "0"], env)
    ccam(["-q", "prepare", "--manifest", str(workdir / "cohort" / "manifest.json"), "-w", str(workdir / "w"),
          "--config", str(REPO / "configs" / "demo.yaml")], env)


LABELS = {"before": "libgomp default", "after": "ccam (spin 1000, then sleep)", "passive": "passive (OMP_WAIT_POLICY)"}


def timed_stage(workdir: Path, stage: str, sets: list[str], mode: str, competitors: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):  # this process imported ccam, which set one
        env.pop(k, None)
    if mode == "before":
        env["CCAM_OMP_WAIT"] = "default"
    elif mode == "passive":
        env["CCAM_OMP_WAIT"] = "passive"
    else:
        env.pop("CCAM_OMP_WAIT", None)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
    time.sleep(0.5 if busy else 0)
    j0, c0, t0 = busy_jiffies(), children_cpu_s(), time.time()
    args = ["-q", stage, "-w", str(workdir / "w"), "--force"] + [x for s in sets for x in ("--set", s)]
    p = ccam(args, env, check=False)
    wall = time.time() - t0
    for b in busy:
        b.kill()
        b.wait()
    j1, c1 = busy_jiffies(), children_cpu_s()
    if p.returncode != 0:
        sys.exit(f"ccam {' '.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    hz = os.sysconf("SC_CLK_TCK")
    cores = len(os.sched_getaffinity(0))
    # our children (stage + competitors) ran until we reaped them; the busy loops also ran 0.5 s before t0
    foreign = max(0.0, (j1 - j0) / hz - (c1 - c0) + 0.5 * competitors)
    rec = json.loads((workdir / "w" / _folder(stage) / "_stage.json").read_text())
    return {"wall_s": round(wall, 2), "stage_s": rec["duration_s"],
            "foreign_cpu_share": round(foreign / max(1e-6, wall * cores), 3)}


def _folder(stage: str) -> str:
    sys.path.insert(0, str(REPO))
    from ccam.stages.base import folder_of

    return folder_of(stage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="train-pcam")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="pcam.epochs for train-pcam")
    ap.add_argument("--modes", default="before,after")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (mode, competitors); the median is reported")
    ap.add_argument("--wait-idle", type=float, default=600.0, help="seconds to wait for 1-min load < 0.3")
    ap.add_argument("--workdir", default="/tmp/ccam_under_load")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to the results file")
    a = ap.parse_args()
    workdir = Path(a.workdir)
    setup(workdir, a.cases)
    # the work directory keeps the settings of its last command (W/config.yaml): pin the runtime
    # defaults so an earlier --set (e.g. runtime.num_threads=1) cannot leak into this run
    sets = ["runtime.num_threads=0", "runtime.num_workers=auto", "runtime.precision=fp32"] + list(a.sets)
    if a.stage == "train-pcam":
        sets.append(f"pcam.epochs={a.epochs}")
    ccam(["-q", a.stage, "-w", str(workdir / "w")] + [x for s in sets for x in ("--set", s)], dict(os.environ))  # upstream + warm caches

    idle, waited, load_start = wait_idle(a.wait_idle)
    print(f"machine {'idle' if idle else 'NOT idle'}: 1-min load {load_start:.2f} after waiting {waited:.0f} s", file=sys.stderr)
    machine = f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores (affinity), {os.cpu_count()} online"
    rows = []
    for mode in a.modes.split(","):
        per = {}
        for comp in (0, 1):
            runs = [timed_stage(workdir, a.stage, sets, mode, comp) for _ in range(a.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            per[comp] = med
            row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmark": "under_load", "stage": a.stage,
                   "cases": a.cases, "sets": sets, "mode": mode,
                   "openmp_wait": LABELS[mode], "competitors": comp,
                   "repeats": a.repeats, **{k: round(v, 3) for k, v in med.items()},
                   "runs_wall_s": [r["wall_s"] for r in runs], "machine": machine,
                   "waited_for_idle_s": round(waited, 1), "load1_at_start": load_start,
                   "idle": bool(idle and max(r["foreign_cpu_share"] for r in runs) < 0.1)}
            if comp:
                # the stage's own wall time (its record's duration_s); wall_s adds the CLI start-up
                row["slowdown_vs_alone"] = round(med["stage_s"] / per[0]["stage_s"], 2)
                row["slowdown_wall_vs_alone"] = round(med["wall_s"] / per[0]["wall_s"], 2)
                row["goal_met"] = row["slowdown_vs_alone"] <= GOAL
            rows.append(row)
            print(f"  {mode:<6} competitors={comp} wall {med['wall_s']:.1f} s, stage {med['stage_s']:.1f} s, "
                  f"foreign CPU {med['foreign_cpu_share']:.0%}", file=sys.stderr)
    if not a.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    print(f"\n{a.stage}, {a.cases} phantom cases, {' '.join(sets)}; {machine}")
    print(f"machine idle before the runs: {'yes' if idle else 'NO'} (1-min load {load_start:.2f}); "
          f"idle rows: {sum(r['idle'] for r in rows)}/{len(rows)}\n")
    print("stage wall time (its record's duration_s); in brackets the command's wall time with start-up\n")
    print("| OpenMP wait | alone (s) | with 1 busy process (s) | slowdown | goal <= 3x |")
    print("| --- | ---: | ---: | ---: | --- |")
    for mode in a.modes.split(","):
        r0 = next(r for r in rows if r["mode"] == mode and r["competitors"] == 0)
        r1 = next(r for r in rows if r["mode"] == mode and r["competitors"] == 1)
        print(f"| {r0['openmp_wait']} | {r0['stage_s']:.1f} ({r0['wall_s']:.1f}) | {r1['stage_s']:.1f} ({r1['wall_s']:.1f}) | "
              f"{r1['slowdown_vs_alone']:.2f}x ({r1['slowdown_wall_vs_alone']:.2f}x) | "
              f"{'met' if r1['goal_met'] else 'NOT met'} |")
    if not a.no_save:
        print(f"\nrows appended to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()

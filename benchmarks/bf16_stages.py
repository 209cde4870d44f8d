"""``runtime.precision: bf16`` against fp32 for the stages `pseudo-masks` and `predict` (issue 12).

`benchmarks/bf16.py` and `benchmarks/bf16_cams.py` measure CAM extraction (`sample`); this one
times the two other stages that run under autocast, on a copy of a finished work directory (e.g.
the demo's), in this process (no CLI start-up): the per-case work of `pseudo-masks` (C-CAM's CAMs,
the anatomy chain, the masks written), `predict --input` on every volume of the cohort's
manifest, and the pipeline `predict`'s own path (prepared slices, every case), once per precision and repeat (the fastest run counts), and the mean Dice of the masks
against the cohort's ground truth (evaluation only). In the pipeline, bf16 also makes `sample`
and so everything after it stale; here the fp32 upstream is kept so that only the stage itself
changes. Goals: >= 1.5x where the CPU has bf16 instructions, Dice within 0.5 points.

    .venv/bin/python benchmarks/bf16_stages.py --workdir runs/demo [--repeats 2] [--wait-idle 600]
        [--stages predict,pseudo-masks]

Rows are appended to benchmarks/results/bf16.jsonl; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from bf16 import cpu_flags, folder_dice  # noqa: E402
from under_load import cpu_model, wait_idle  # noqa: E402

STAGES = ("predict", "predict (pipeline path)", "pseudo-masks")


def mean_dice(w: Path, folder: Path) -> float:
    """Mean foreground Dice (%) of the masks in ``folder`` (`bf16.folder_dice`)."""
    return folder_dice(w, folder)["mean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a work directory where `predict` is done (e.g. runs/demo)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=600.0)
    ap.add_argument("--stages", default="predict,pseudo-masks",
                    help="which to time: predict (both paths) and/or pseudo-masks (needs sample and train-ccam done)")
    a = ap.parse_args()
    chosen = set(a.stages.split(","))

    import ccam.stages
    from ccam import artifacts
    from ccam import config as config_mod
    from ccam.data.cohort import Cohort
    from ccam.stages import base
    from ccam.stages import predict as predict_stage
    from ccam.stages.predict import predict_files
    from ccam.stages.pseudo_masks import part_cases, run_part

    ccam.stages.load_all()
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp) / "w"
        shutil.copytree(a.workdir, w, ignore=shutil.ignore_patterns("export*", "review*"))
        manifest = Path(json.loads((w / "prepare" / "_stage.json").read_text())["options"]["manifest"])
        if not manifest.is_absolute():
            manifest = Path.cwd() / manifest
        base_cfg = config_mod.resolve(w)
        config_mod.apply_threads(base_cfg)
        cases = Cohort(w).cases
        n_cases = len(cases)
        idle, _, load = wait_idle(a.wait_idle)
        res: dict = {}
        for prec in ("fp32", "bf16"):
            cfg = config_mod.resolve(w, None, [f"runtime.precision={prec}"])
            if "pseudo-masks" in chosen:
                ctx = base.StageContext(w, cfg, base.get_stage("pseudo-masks"))
                times = []
                for _ in range(a.repeats):
                    shutil.rmtree(ctx.dir)
                    ctx.dir.mkdir()
                    t0 = time.perf_counter()
                    run_part(ctx, part_cases(ctx))
                    times.append(round(time.perf_counter() - t0, 3))
                res[("pseudo-masks", prec)] = {"stage_s": min(times), "runs_s": times,
                                               "dice": mean_dice(w, artifacts.mask_dir(w, "pseudo-masks"))}
            if "predict" in chosen:
                times = []
                for r in range(a.repeats):
                    out = Path(tmp) / f"pred_{prec}_{r}"
                    t0 = time.perf_counter()
                    predict_files(w, cfg, manifest, out)
                    times.append(round(time.perf_counter() - t0, 3))
                res[("predict", prec)] = {"stage_s": min(times), "runs_s": times, "dice": mean_dice(w, out)}
                # the pipeline stage's own path (prepared slices, no NIfTI reading), over every case
                pctx = base.StageContext(w, cfg, base.get_stage("predict"))
                times = []
                for _ in range(a.repeats):
                    shutil.rmtree(pctx.dir, ignore_errors=True)
                    pctx.dir.mkdir()
                    t0 = time.perf_counter()
                    predict_stage.run_part(pctx, cases)
                    times.append(round(time.perf_counter() - t0, 3))
                res[("predict (pipeline path)", prec)] = {"stage_s": min(times), "runs_s": times, "dice": mean_dice(w, pctx.dir)}
    flags = cpu_flags()
    machine = f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"
    print(f"{a.workdir} ({n_cases} cases); {machine}; bf16 flags: {', '.join(f for f in flags if 'bf16' in f) or 'none'}; "
          f"machine idle: {'yes' if idle else 'NO'} (load {load:.2f})\n")
    print("| stage | fp32 s | bf16 s | speed-up | Dice fp32 % | Dice bf16 % | change (points) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with open(REPO / "benchmarks" / "results" / "bf16.jsonl", "a") as fh:
        for stage in (st for st in STAGES if (st, "fp32") in res):
            f, b = res[(stage, "fp32")], res[(stage, "bf16")]
            speed, dd = f["stage_s"] / b["stage_s"], b["dice"] - f["dice"]
            fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmark": "bf16_stages", "stage": stage,
                                 "workdir": a.workdir, "cases": n_cases, "machine": machine, "cpu_flags": flags, "idle": idle,
                                 "load1_at_start": load, "fp32": f, "bf16": b, "speedup": round(speed, 2),
                                 "dice_change_points": round(dd, 2)}) + "\n")
            print(f"| {stage} | {f['stage_s']:.1f} | {b['stage_s']:.1f} | {speed:.2f}x | {f['dice']:.2f} | {b['dice']:.2f} | {dd:+.2f} |")


if __name__ == "__main__":
    main()

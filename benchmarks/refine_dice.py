"""Dice of refined vs unrefined pseudo-masks, per class, on the demo cohort.

Runs the pipeline up to `pseudo-masks` (skipped when already done), then `refine` with
``refine.enabled=true`` (plus any ``--set``), and scores both ``pseudo_masks/<id>.nii.gz`` and
``refined_masks/<id>.nii.gz`` against the manifest's ground truth (benchmark use only: nothing
in the pipeline reads it). Dice is pooled over the voxels of all cases of the chosen splits.

    python benchmarks/refine_dice.py --data runs/demo_data --workdir runs/demo_refine \
        [--config configs/demo.yaml] [--set refine.t=6] [--splits train val test]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ccam.cli import main as ccam
from ccam.data.cohort import Cohort
from ccam.io.volume import read_volume
from ccam.metrics import DiceAccumulator

REPO = Path(__file__).resolve().parent.parent


def call(*args: str) -> None:
    rc = ccam([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"ccam {' '.join(map(str, args))} exited with {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/demo_data", help="phantom cohort folder (made if missing)")
    ap.add_argument("--workdir", default="runs/demo_refine")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra settings for refine")
    ap.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    a = ap.parse_args()

    data, wd = Path(a.data), Path(a.workdir)
    if not (data / "manifest.json").exists():
        call("phantom", "--out", data, "--cases", a.cases, "--seed", a.seed)
    cfg_args = ["--config", a.config] if a.config and Path(a.config).exists() else []
    t0 = time.time()
    call("run", "--manifest", data / "manifest.json", "--workdir", wd, *cfg_args, "--until", "pseudo-masks")
    t1 = time.time()
    sets = ["refine.enabled=true"] + a.sets
    call("refine", "--workdir", wd, *[x for s in sets for x in ("--set", s)])
    t2 = time.time()
    record = json.loads((wd / "refined_masks" / "_stage.json").read_text())

    cohort = Cohort(wd)
    k = cohort.num_classes
    acc = {"unrefined": DiceAccumulator(k), "refined": DiceAccumulator(k)}
    n = 0
    for case in cohort.cases:
        if case.split not in a.splits or not case.mask_path:
            continue
        gt = read_volume(case.mask_path, case=case.id).array
        acc["unrefined"].add(read_volume(wd / "pseudo_masks" / f"{case.id}.nii.gz").array, gt)
        acc["refined"].add(read_volume(wd / "refined_masks" / f"{case.id}.nii.gz").array, gt)
        n += 1
    print(f"pseudo-mask Dice (%), pooled over {n} cases ({', '.join(a.splits)}); "
          f"pipeline to pseudo-masks {t1 - t0:.0f} s (0 if it was done), refine {t2 - t1:.0f} s")
    head = " ".join(f"{c:>13}" for c in cohort.classes)
    print(f"{'':<10} {head} {'mean':>7}")
    for name, d in acc.items():
        dice = d.dice() * 100
        print(f"{name:<10} " + " ".join(f"{v:>13.2f}" for v in dice) + f" {np.nanmean(dice):>7.2f}")
    diff = (acc["refined"].dice() - acc["unrefined"].dice()) * 100
    print(f"{'change':<10} " + " ".join(f"{v:>+13.2f}" for v in diff) + f" {np.nanmean(diff):>+7.2f}")
    out = record["outputs"]
    print(f"seeds on tagged training slices: {out.get('seed_fraction')}; affinity loss {out.get('final_loss')}; "
          f"labels changed by the walk: {out.get('changed_fraction')}; refine settings: {' '.join(sets)}")


if __name__ == "__main__":
    main()

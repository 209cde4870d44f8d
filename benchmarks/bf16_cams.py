"""CAM extraction alone, fp32 against bf16 (issue 12: "bf16 for CAM extraction ... speed-up >= 1.5x").

`benchmarks/bf16.py` times the whole `sample` stage, which also resamples the score maps to the
source grid, writes NIfTI masks and draws PNGs in float32; this script times only
`ccam.cam.cams_for_slices` (P-CAM's multi-scale CAMs of every slice of every case) in one process,
alternating precisions, and reports the best of ``--repeats`` per precision.

    .venv/bin/python benchmarks/bf16_cams.py --workdir runs/demo [--repeats 3]

Needs a work dir whose train-pcam is done (e.g. the demo's). Rows go to benchmarks/results/bf16.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wait-idle", type=float, default=300.0)
    a = ap.parse_args()

    import torch

    from ccam import artifacts, config as config_mod
    from ccam.cam import cams_for_slices
    from ccam.data.augment import use_flip
    from ccam.data.cohort import Cohort
    from under_load import cpu_model, wait_idle

    idle, _, load0 = wait_idle(a.wait_idle)
    w = Path(a.workdir)
    cfg = config_mod.resolve(w)
    config_mod.apply_threads(cfg)
    cohort = Cohort(w)
    model = artifacts.load_pcam(w, cfg, cohort.num_classes, "cpu").to(memory_format=torch.channels_last)
    cc = cfg.cam
    flip = use_flip(cc.flip_tta, cohort.classes)
    stacks = [(c.slices(), c.tags()) for c in cohort.cases]
    n_slices = sum(s.shape[0] for s, _ in stacks)

    def once(precision: str) -> float:
        t0 = time.perf_counter()
        for slices, tags in stacks:
            cams_for_slices(model, slices, tags, method="cam", scales=cc.scales, flip=flip, batch_size=cc.batch_size,
                            device="cpu", precision=precision)
        return time.perf_counter() - t0

    once("fp32")  # warm-up (oneDNN kernels, page cache)
    times: dict = {"fp32": [], "bf16": []}
    for _ in range(a.repeats):
        for p in ("fp32", "bf16"):
            times[p].append(round(once(p), 3))
    best = {p: min(v) for p, v in times.items()}
    ratio = best["fp32"] / best["bf16"]
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmark": "bf16_cams", "workdir": str(w), "cases": len(stacks),
           "slices": n_slices, "slice_size": cohort.slice_size, "scales": list(cc.scales), "machine": cpu_model(),
           "threads": torch.get_num_threads(), "idle": idle, "load1_at_start": load0, "runs_s": times,
           "best_s": best, "speedup": round(ratio, 3), "goal": ">= 1.5x", "goal_met": ratio >= 1.5}
    with open(REPO / "benchmarks" / "results" / "bf16.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"CAM extraction of {len(stacks)} cases ({n_slices} slices, S = {cohort.slice_size}, scales {list(cc.scales)}), "
          f"{torch.get_num_threads()} threads, idle: {idle} (load {load0:.2f})")
    print(f"fp32 {best['fp32']:.2f} s, bf16 {best['bf16']:.2f} s (best of {a.repeats}): {ratio:.2f}x "
          f"({'goal met' if ratio >= 1.5 else 'goal NOT met'}, >= 1.5x)")


if __name__ == "__main__":
    main()

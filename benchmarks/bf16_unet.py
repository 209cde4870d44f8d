"""``runtime.precision: bf16`` against fp32 for the segmenter's forward pass alone (issue 12).

`benchmarks/bf16_cams.py` times CAM extraction alone; this times the U-Net that `predict` runs
under autocast: the default segmenter (`configs/default.yaml`: MONAI UNet, channels 16-256) on a
batch of ``--batch`` slices at S = 96 (the demo) and S = 256 (the default), fresh weights (speed
does not depend on them), inference mode, best of ``--repeats`` timed rounds. Whole stages gain
less: reading, resampling to the source grid and NIfTI writing stay float32
(`benchmarks/bf16_stages.py`). Goal: >= 1.5x where the CPU has bf16 instructions.

    .venv/bin/python benchmarks/bf16_unet.py [--batch 32] [--sizes 96,256] [--repeats 5]

Rows are appended to benchmarks/results/bf16.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from bf16 import cpu_flags  # noqa: E402
from under_load import cpu_model, wait_idle  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sizes", default="96,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wait-idle", type=float, default=600.0)
    a = ap.parse_args()

    import torch

    from ccam import config as config_mod
    from ccam.models.segmenter import Segmenter

    cfg = config_mod.resolve(None, None, [])
    config_mod.apply_threads(cfg)
    sc = cfg.seg
    torch.manual_seed(0)
    model = Segmenter(sc.network, sc.channels, num_classes=5).eval()
    idle, _, load = wait_idle(a.wait_idle)
    flags = cpu_flags()
    rows = []
    for s in (int(v) for v in a.sizes.split(",")):
        x = torch.rand(a.batch, 1, s, s)
        best = {}
        for prec in ("fp32", "bf16"):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                model(x)  # warm-up: oneDNN primitives
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - t0)
            best[prec] = min(times)
        ratio = best["fp32"] / best["bf16"]
        rows.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmark": "bf16_unet", "slice_size": s, "batch": a.batch,
                     "network": sc.network, "channels": list(sc.channels), "machine": cpu_model(), "cpu_flags": flags,
                     "threads": torch.get_num_threads(), "idle": idle, "load1_at_start": load,
                     "fp32_ms": round(1000 * best["fp32"], 1), "bf16_ms": round(1000 * best["bf16"], 1),
                     "speedup": round(ratio, 2), "goal_met": ratio >= 1.5})
        print(f"S = {s}, batch {a.batch}: fp32 {1000 * best['fp32']:.1f} ms, bf16 {1000 * best['bf16']:.1f} ms: {ratio:.2f}x "
              f"({'goal met' if ratio >= 1.5 else 'goal NOT met'}, >= 1.5x)")
    with open(REPO / "benchmarks" / "results" / "bf16.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, bf16 flags: {', '.join(f for f in flags if 'bf16' in f) or 'none'}; "
          f"idle: {'yes' if idle else 'NO'} (load {load:.2f})")


if __name__ == "__main__":
    main()

"""Time and peak memory of the affinity random walk per slice at S = 256 and S = 512.

The walk (`ccam.affinity.walk_scores`: T = D^-1 A^beta on the stride-8 grid, 2^t steps, bilinear
upsampling to S x S) runs on random CAMs and the affinities of a random feature map, with the
stage's defaults (radius 5, beta 8, t 8, K = 4). Each measurement runs in a fresh process, so the
peak resident memory it adds (ru_maxrss minus the resident size before any tensor, so the CAMs
and affinities it reads are included) is its own.
For scale the script prints what a dense transition matrix would take: (h*w)^2 on the grid and
(H*W)^2 at full resolution, neither of which the walk builds. AffinityNet's forward pass
(default trunk) is timed separately.

    python benchmarks/random_walk.py [--sizes 256 512] [--batch 1] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(size: int, batch: int, threads: int, repeats: int, what: str) -> dict:
    import torch

    from ccam.affinity import half_disk_offsets, pair_affinities, walk_scores
    from ccam.config import RefineConfig
    from ccam.models.affinity import AffinityNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rc = RefineConfig()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h = size // 8
    base = _rss_mib()  # before any tensor: the peak below includes the walk's inputs
    cams = torch.rand(batch, 4, size, size, device=dev)
    with torch.no_grad():
        aff = pair_affinities(torch.randn(batch, 64, h, h, device=dev), half_disk_offsets(rc.radius))
        net = AffinityNet(rc.backbone, rc.width).to(dev).eval() if what == "net" else None
        x = torch.rand(batch, 1, size, size, device=dev)
        times = []
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_gpu = torch.cuda.memory_allocated()
        for _ in range(repeats):
            t0 = time.perf_counter()
            if what == "net":
                net.affinities(x, rc.radius)
            else:
                walk_scores(cams, aff, radius=rc.radius, beta=rc.beta, t=rc.t, background=0.25).argmax(1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"size": size, "batch": batch, "what": what, "device": dev.type, "threads": threads,
           "s_per_slice": min(times) / batch, "peak_added_mib": max(0.0, peak - base)}
    if dev.type == "cuda":
        out["gpu_peak_added_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "WHAT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), a.batch, a.threads, a.repeats, a.child[1])))
        return
    print(f"random walk per slice (radius 5, beta 8, 2^8 steps, K=4), batch {a.batch}, {a.threads} thread(s)")
    print(f"{'S':>5} {'grid':>7} {'walk s/slice':>13} {'walk peak MiB':>14} {'net s/slice':>12} "
          f"{'dense grid T MiB':>17} {'dense HWxHW MiB':>16}")
    for s in a.sizes:
        res = {}
        for what in ("walk", "net"):
            cmd = [sys.executable, __file__, "--child", str(s), what, "--batch", str(a.batch),
                   "--threads", str(a.threads), "--repeats", str(a.repeats)]
            res[what] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        h = s // 8
        dense_grid = (h * h) ** 2 * 4 / 2**20
        dense_full = (s * s) ** 2 * 4 / 2**20
        w = res["walk"]
        mem = f"{w['peak_added_mib']:.1f}" + (f" (gpu {w['gpu_peak_added_mib']:.1f})" if "gpu_peak_added_mib" in w else "")
        print(f"{s:>5} {f'{h}x{h}':>7} {w['s_per_slice']:>13.4f} {mem:>14} {res['net']['s_per_slice']:>12.4f} "
              f"{dense_grid:>17.1f} {dense_full:>16.0f}")
    print(f"device: {res['walk']['device']}")


if __name__ == "__main__":
    main()

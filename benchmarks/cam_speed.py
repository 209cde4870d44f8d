"""Benchmark issue 3: CAM extraction speed and forward-pass efficiency, side by side in one run.

Same model, same inputs, scale 1.0, CAMs of all K classes for a batch of slices:

- ours: `ccam.cam.multiscale_cams` (one forward pass, no gradients, all classes at once);
- MONAI `monai.visualize.CAM` (one call per class; its fc layer is evaluated pixel by pixel);
- MONAI `monai.visualize.GradCAM` (one forward + backward per class);
- pytorch-grad-cam's `GradCAM` (one forward + backward per class), run in its own venv
  ``benchmarks/.venv-gradcam`` (torch 2.14.1 + torchvision 0.29.1, which grad-cam pulls in;
  the project's torch is not touched). Create it once with
  ``python3 -m venv benchmarks/.venv-gradcam && benchmarks/.venv-gradcam/bin/pip install torch==2.14.1 torchvision==0.29.1 grad-cam monai nibabel``
  (nibabel: the worker imports ccam's P-CAM from this checkout).
  Without it that row is skipped.

Goals: ours >= 10x grad-cam's GradCAM and >= 4x MONAI's CAM (slices per second).
Also: forward-pass GFLOP/s of the backbone during our extraction (FLOPs counted with
`torch.utils.flop_counter`) against the fp32 matrix-multiply peak measured in the same run
(goal >= 50 %).

    .venv/bin/python benchmarks/cam_speed.py [--workdir W] [--batch 32] [--size 96]

With ``--workdir`` (after `ccam train-pcam`) the trained P-CAM and real slices of that work
directory are used; otherwise a freshly initialised P-CAM with the settings of
``configs/demo.yaml`` (speed does not depend on the weights) on random slices.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GRADCAM_PY = REPO / "benchmarks" / ".venv-gradcam" / "bin" / "python"
sys.path.insert(0, str(REPO))


def best_rate(fn, n_items: int, repeats: int, min_time: float = 1.0) -> float:
    """Items per second: best of ``repeats`` timed runs after one warm-up (each run >= min_time)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        t0, n = time.perf_counter(), 0
        while True:
            fn()
            n += n_items
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = max(best, n / dt)
    return best


def gradcam_worker(folder: str) -> None:
    """Runs inside benchmarks/.venv-gradcam: pytorch-grad-cam's GradCAM for all classes."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = json.loads((Path(folder) / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    # the whole module, pickled by the parent: the same P-CAM class of this checkout, whatever its config
    model = torch.load(Path(folder) / "model.pt", weights_only=False).eval()
    x = torch.load(Path(folder) / "x.pt", weights_only=True)
    cam = GradCAM(model=model, target_layers=[model.backbone])

    def run():
        for k in range(spec["k"]):
            cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * x.shape[0])

    rate = best_rate(run, x.shape[0], spec["repeats"])
    print(json.dumps({"rate": rate, "torch": torch.__version__}))


def main() -> None:
    ap = argparse.ArgumentParser(description="CAM extraction speed: ours vs MONAI vs pytorch-grad-cam")
    ap.add_argument("--workdir", help="work directory with a trained P-CAM (optional)")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, help="slice size S (default: the config's data.slice_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--gradcam-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.gradcam_worker:
        return gradcam_worker(a.gradcam_worker)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from monai.visualize import CAM, GradCAM
    from torch.utils.flop_counter import FlopCounterMode

    from ccam.cam import multiscale_cams
    from ccam.config import resolve
    from ccam.models.pcam import PCAM

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    if a.workdir:
        from ccam.data.cohort import Cohort
        from ccam.artifacts import load_pcam

        w = Path(a.workdir)
        cfg = resolve(w)
        cohort = Cohort(w)
        model = load_pcam(w, cfg, cohort.num_classes, torch.device("cpu")).to(memory_format=torch.contiguous_format)
        xs = []
        for c in cohort.cases:
            pos = np.flatnonzero(c.tags().any(1))
            xs.append(np.asarray(c.slices())[pos])
        x = torch.from_numpy(np.concatenate(xs)[: a.batch].copy())[:, None]
        source = f"trained P-CAM of {w}, {x.shape[0]} positive slices"
    else:
        cfg = resolve(None, a.config if Path(a.config).exists() else None)
        size = a.size or cfg.data.slice_size
        model = PCAM.from_config(cfg.pcam, 4).eval()
        x = torch.rand(a.batch, 1, size, size)
        source = f"fresh P-CAM ({cfg.pcam.backbone} OS{cfg.pcam.stride} width {cfg.pcam.width}), random slices"
    k = int(model.classifier.weight.shape[0])
    b, s = x.shape[0], x.shape[-1]
    tags = torch.ones(b, k)
    print(f"CAM extraction, scale 1.0, all {k} classes, batch {b} x {s}x{s}, {threads} CPU thread(s); {source}")
    print("(this machine's 2 cores are shared with other jobs: absolute figures are pessimistic, ratios less so)\n")

    # ours: channels_last + inference_mode (multiscale_cams runs under inference_mode)
    ours_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run_ours():
        multiscale_cams(ours_model, x_cl, tags, (1.0,))

    # MONAI CAM: one call per class; the 1x1 head as a linear layer on (B, D) vectors
    monai_cam = CAM(nn_module=copy.deepcopy(model), target_layers="backbone",
                    fc_layers=lambda m: (lambda v: F.linear(v, m.classifier.weight.flatten(1))), postprocessing=lambda t: t)

    def run_monai_cam():
        with torch.no_grad():
            for c in range(k):
                monai_cam(x, class_idx=torch.full((b,), c))

    monai_grad = GradCAM(nn_module=copy.deepcopy(model), target_layers="backbone", postprocessing=lambda t: t)

    def run_monai_gradcam():
        for c in range(k):
            monai_grad(x, class_idx=c)

    # rounds interleave the methods, and each keeps its best round: load from other jobs hits all alike
    fns = {"ours (ccam.cam, 1 forward, all classes)": run_ours, "MONAI CAM (1 call per class)": run_monai_cam,
           "MONAI GradCAM (fwd+bwd per class)": run_monai_gradcam}
    rates = {name: 0.0 for name in fns}
    for _ in range(a.repeats):
        for name, fn in fns.items():
            rates[name] = max(rates[name], best_rate(fn, b, 1))

    gc_note = ""
    if GRADCAM_PY.exists():
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(model, Path(tmp) / "model.pt")
            torch.save(x, Path(tmp) / "x.pt")
            (Path(tmp) / "spec.json").write_text(json.dumps({
                "k": k, "threads": threads, "repeats": a.repeats}))
            env = dict(os.environ, PYTHONPATH=str(REPO))
            p = subprocess.run([str(GRADCAM_PY), __file__, "--gradcam-worker", tmp], capture_output=True, text=True, env=env)
            if p.returncode == 0:
                res = json.loads(p.stdout.strip().splitlines()[-1])
                rates["pytorch-grad-cam GradCAM (fwd+bwd per class)"] = res["rate"]
                gc_note = f" (torch {res['torch']} in benchmarks/.venv-gradcam)"
            else:
                print("pytorch-grad-cam run failed:", p.stderr.strip().splitlines()[-1:] or p.returncode)
    else:
        print(f"pytorch-grad-cam skipped: {GRADCAM_PY} missing (see the module docstring)\n")

    ours = next(iter(rates.values()))
    print(f"{'method':<48} {'slices/s':>10} {'ours is':>9}")
    for name, r in rates.items():
        print(f"{name:<48} {r:>10.1f} {ours / r:>8.1f}x" + (gc_note if name.startswith("pytorch") else ""))
    gc = rates.get("pytorch-grad-cam GradCAM (fwd+bwd per class)")
    print(f"\ngoals: >= 10x grad-cam: {'n/a' if gc is None else f'{ours / gc:.1f}x'}; "
          f">= 4x MONAI CAM: {ours / rates['MONAI CAM (1 call per class)']:.1f}x")

    # forward-pass efficiency against the fp32 matmul peak, measured in interleaved rounds
    print("\nforward-pass efficiency (FLOPs by torch.utils.flop_counter; fp32 matrix-multiply peak = the faster of "
          "torch.mm and the same 2048^3 GEMM as a 1x1 convolution, same threads):")
    n = 2048
    ma, mb = torch.randn(n, n), torch.randn(n, n)
    # the same GEMM through the convolution library: on some CPUs (e.g. MKL on AMD) torch.mm is not the fastest path
    gemm_w = torch.randn(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
    gemm_x = torch.randn(1, n, n, 1).contiguous(memory_format=torch.channels_last)

    def gemm_peak() -> float:
        with torch.inference_mode():
            mm = best_rate(lambda: torch.mm(ma, mb), 1, 1)
            conv = best_rate(lambda: F.conv2d(gemm_x, gemm_w), 1, 1)
        return max(mm, conv) * 2 * n ** 3
    models = [("this model", ours_model, x_cl)]
    if not a.workdir:
        from ccam.config import Config

        dflt = Config()  # the default settings (local P-CAM trunk since issue 13), S = 256
        big = PCAM.from_config(dflt.pcam, 4).eval().to(memory_format=torch.channels_last)
        xb = torch.rand(8, 1, dflt.data.slice_size, dflt.data.slice_size).contiguous(memory_format=torch.channels_last)
        models.append((f"default config ({dflt.pcam.backbone} OS{dflt.pcam.stride} width {dflt.pcam.width}, "
                       f"{xb.shape[0]} x {dflt.data.slice_size}^2)", big, xb))
    for label, mdl, xin in models:
        with FlopCounterMode(display=False) as fc:
            with torch.inference_mode():
                mdl.classifier(mdl.cam_features(xin))
        per_slice = fc.get_total_flops() / xin.shape[0]
        t_in = torch.ones(xin.shape[0], k)
        fwd, peak = 0.0, 0.0
        for _ in range(a.repeats + 2):
            fwd = max(fwd, best_rate(lambda: multiscale_cams(mdl, xin, t_in, (1.0,)), xin.shape[0], 1))
            peak = max(peak, gemm_peak())
        achieved = per_slice * fwd
        print(f"  {label}: {per_slice / 1e9:.3f} GFLOP/slice, {fwd:.1f} slices/s = {achieved / 1e9:.1f} GFLOP/s; "
              f"peak {peak / 1e9:.1f} GFLOP/s -> {100 * achieved / peak:.0f} % (goal >= 50 %)")
    print("  (above 100 % means the convolution library does fewer multiplies than counted, e.g. Winograd 3x3 kernels)")


if __name__ == "__main__":
    main()

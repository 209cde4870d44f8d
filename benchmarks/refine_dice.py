"""Dice of refined vs unrefined pseudo-masks, per class, on the demo cohort.

Runs the pipeline up to `pseudo-masks` (skipped when already done), then `refine` with
``refine.enabled=true`` (plus any ``--set``), and scores both ``pseudo_masks/<id>.nii.gz`` and
``refined_masks/<id>.nii.gz`` against the manifest's ground truth (benchmark use only: nothing
in the pipeline reads it). Dice is pooled over the voxels of all cases of the chosen splits.

    python benchmarks/refine_dice.py --data runs/demo_data --workdir runs/demo_refine \
        [--config configs/demo.yaml] [--set refine.t=6] [--splits train val test] [--variants]

``--oracle-cams SIGMA`` checks the machinery apart from the CAMs' quality: in a copy of the work
dir the CAMs are replaced by ground-truth masks blurred with a Gaussian of SIGMA pixels (so they
bleed past the organ as CAMs do), the unrefined labels by argmax([tau, CAM]); refine runs on
those. Labelled oracle: it uses ground truth on purpose and says nothing about the pipeline.

``--variants`` re-runs only the walk with the trained AffinityNet under other walk settings
(background channel, beta, t) and scores them on the S x S stacks: a sensitivity table, labelled
oracle because ground truth is what ranks it; no default is taken from it.
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
    ap.add_argument("--variants", action="store_true", help="oracle sensitivity of the walk settings")
    ap.add_argument("--oracle-cams", type=float, default=0.0, metavar="SIGMA",
                    help="also refine ground-truth masks blurred by SIGMA px (oracle check of the machinery)")
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


    if a.variants:
        variants(wd, cohort, a.splits)
    if a.oracle_cams > 0:
        oracle_cams(wd, cohort, a.oracle_cams, a.splits, sets)


def oracle_cams(wd: Path, cohort: Cohort, sigma: float, splits: list[str], sets: list[str]) -> None:
    """Refine blurred ground-truth 'CAMs' in a copy of ``wd`` and print Dice before / after (oracle)."""
    import shutil

    import torch
    from scipy import ndimage

    from ccam.cam import coarse_labels
    from ccam.config import resolve
    from ccam.io.atomic import save_npy
    from ccam.io.geometry import labels_from_source

    dst = wd.parent / (wd.name + "_oracle_cams")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(wd, dst, ignore=shutil.ignore_patterns("refined_masks"))
    tau = resolve(dst).cam.tau
    k = cohort.num_classes
    gts = {}
    for c in cohort.cases:
        gt = labels_from_source(c.geometry, read_volume(c.mask_path).array, k + 1)
        gts[c.id] = gt
        tags = c.tags()
        cams = np.zeros((c.n_slices, k) + gt.shape[1:], dtype=np.float32)
        for n in range(c.n_slices):
            for j in range(k):
                if tags[n, j] and (gt[n] == j + 1).any():
                    blur = ndimage.gaussian_filter((gt[n] == j + 1).astype(np.float32), sigma)
                    cams[n, j] = blur / blur.max()
        save_npy(dst / "pseudo_masks" / "cams" / f"{c.id}.npy", cams.astype(np.float16))
        save_npy(dst / "pseudo_masks" / "labels" / f"{c.id}.npy",
                 coarse_labels(torch.from_numpy(cams), tau).numpy().astype(np.uint8))
    call("refine", "--workdir", dst, *[x for s in sets for x in ("--set", s)])
    acc = {"blurred-GT CAMs, unrefined": DiceAccumulator(k), "blurred-GT CAMs, refined": DiceAccumulator(k)}
    for c in cohort.cases:
        if c.split in splits:
            acc["blurred-GT CAMs, unrefined"].add(np.load(dst / "pseudo_masks" / "labels" / f"{c.id}.npy"), gts[c.id])
            acc["blurred-GT CAMs, refined"].add(np.load(dst / "refined_masks" / "labels" / f"{c.id}.npy"), gts[c.id])
    print(f"\nORACLE CAMs (ground truth blurred by sigma {sigma} px; checks the refinement machinery only), "
          f"pooled Dice (%) on the stacks")
    for name, d in acc.items():
        print(f"{name:<28} " + " ".join(f"{v * 100:>13.2f}" for v in d.dice()) + f" {np.nanmean(d.dice()) * 100:>7.2f}")


VARIANTS = [("stage settings", {}), ("background=power, bg_alpha=4", {"background": "power", "bg_alpha": 4.0}),
            ("background=power, bg_alpha=16", {"background": "power", "bg_alpha": 16.0}),
            ("beta=4", {"beta": 4.0}), ("beta=16", {"beta": 16.0}), ("t=4", {"t": 4}), ("t=6", {"t": 6}),
            ("t=10", {"t": 10}), ("no walk (t=0): grid cost only", {"t": 0})]


def variants(wd: Path, cohort: Cohort, splits: list[str]) -> None:
    """Walk-only variants with the stage's AffinityNet, pooled Dice on the S x S stacks (oracle)."""
    import torch

    from ccam.config import resolve
    from ccam.io.geometry import labels_from_source
    from ccam.models.affinity import AffinityNet
    from ccam.stages.refine import refine_stack
    from ccam.training import load_model_weights

    cfg = resolve(wd)
    base = cfg.refine.model_copy(update={"enabled": True})
    model = AffinityNet(base.backbone, base.width)
    load_model_weights(model, wd / "refined_masks" / "affinity" / "checkpoint_final.pt")
    model.eval()
    m_s = np.load(wd / "sample" / "m_s.npy") if cfg.anatomy.enabled else None
    k = cohort.num_classes
    cases = [c for c in cohort.cases if c.split in splits and c.mask_path]
    gts = {c.id: labels_from_source(c.geometry, read_volume(c.mask_path).array, k + 1) for c in cases}
    print(f"\nORACLE sensitivity of the walk (ground truth ranks these; none is used as a default), "
          f"pooled Dice (%) on the {cohort.slice_size} x {cohort.slice_size} stacks")
    print(f"{'variant':<32} " + " ".join(f"{c:>13}" for c in cohort.classes) + f" {'mean':>7}")
    acc = DiceAccumulator(k)
    for c in cases:
        acc.add(np.load(wd / "pseudo_masks" / "labels" / f"{c.id}.npy"), gts[c.id])
    rows = [("unrefined pseudo-masks", acc.dice())]
    for name, upd in VARIANTS:
        rc = base.model_copy(update=upd)
        acc = DiceAccumulator(k)
        for c in cases:
            cams = np.load(wd / "pseudo_masks" / "cams" / f"{c.id}.npy", mmap_mode="r")
            acc.add(refine_stack(model, c.slices(), cams, rc, tau=cfg.cam.tau, m_s=m_s, device=torch.device("cpu"),
                                 batch_size=16), gts[c.id])
        rows.append((name, acc.dice()))
    # the walk itself with ground-truth affinities (1 within a label, 0 across) on the same CAMs:
    # what the stage could reach if AffinityNet were perfect
    from ccam.affinity import half_disk_offsets, seeds_to_grid, shift, walk_scores

    acc = DiceAccumulator(k)
    h = model(torch.zeros(1, 1, cohort.slice_size, cohort.slice_size)).shape[-1]
    for c in cases:
        cams = torch.from_numpy(np.load(wd / "pseudo_masks" / "cams" / f"{c.id}.npy").astype(np.float32))
        g = seeds_to_grid(torch.from_numpy(gts[c.id]).long(), (h, h))
        aff = torch.stack([(g == shift(g, dy, dx, fill=-1)).float() for dy, dx in half_disk_offsets(base.radius)], 1)
        lab = np.zeros_like(gts[c.id])
        pos = (cams.flatten(1).amax(1) > 0).numpy()
        with torch.no_grad():
            sc = walk_scores(cams[pos], aff[pos], radius=base.radius, beta=base.beta, t=base.t, background=cfg.cam.tau)
            if m_s is not None:
                sc[:, 1:] *= torch.from_numpy(m_s[1:]).float()[None]
        lab[pos] = sc.argmax(1).numpy()
        acc.add(lab, gts[c.id])
    rows.append(("ground-truth affinities", acc.dice()))
    for name, d in rows:
        print(f"{name:<32} " + " ".join(f"{v * 100:>13.2f}" for v in d) + f" {np.nanmean(d) * 100:>7.2f}")


if __name__ == "__main__":
    main()

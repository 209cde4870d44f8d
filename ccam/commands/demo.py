"""`ccam demo`: the whole method on a synthetic cohort, end to end, on a laptop CPU.

Generates the phantom cohort (`ccam.data.phantom`, train/val/test split by patient) into
``W/data``, runs every stage of ``pipelines/ccam.yaml`` with ``configs/demo.yaml`` (skip/resume:
a repeated run only does what is missing), exports the training masks and the test predictions
for review, and prints the Dice per stage and class with each stage's wall time.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import click

from ccam import artifacts
from ccam.options import shared
from ccam.config import REPO_CONFIGS, apply_threads, resolve, save
from ccam.errors import UserError
from ccam.io.atomic import read_json
from ccam.reports import stage_dice_table

log = logging.getLogger("ccam")

DEMO_SHAPE = (160, 160, 40)  # base matrix of the phantom: ~2.2 mm in-plane, 5 mm slices


def ensure_cohort(data_dir: Path, n_cases: int, seed: int) -> Path:
    """The demo cohort's manifest, generated unless the same cohort (cases, seed) is already there."""
    from ccam.data.phantom import make_phantom_cohort

    manifest = data_dir / "manifest.json"
    if manifest.exists():
        m = read_json(manifest, {})
        if len(m.get("cases", [])) == n_cases and m.get("name") == f"phantom-MR-{seed}":
            log.info("demo: reusing the synthetic cohort in %s", data_dir)
            return manifest
        if not str(m.get("name", "")).startswith("phantom-"):
            raise UserError("the data folder holds a cohort the demo did not make", path=str(data_dir),
                            fix="use another --workdir for the demo")
        for sub in ("images", "masks"):  # a different demo cohort: replace it (prepare then sees a new manifest)
            shutil.rmtree(data_dir / sub, ignore_errors=True)
        manifest.unlink()
    log.info("demo: generating %d synthetic MR cases into %s", n_cases, data_dir)
    return make_phantom_cohort(data_dir, n_cases=n_cases, seed=seed, modality="MR", shape=DEMO_SHAPE)


def dice_table(report: dict) -> str:
    """Markdown table of Dice (%) per stage, split and class from ``reports/evaluation.json``, with the oracle-tau rows."""
    return "\n".join(stage_dice_table(report, "dice", std=False, oracle=True))


def run_demo(workdir: Path, n_cases: int = 20, seed: int = 0, config_file=None, sets=()) -> dict:
    """Generate, run, evaluate and export; returns {stages: [(name, seconds, ran)], report, exports}."""
    from ccam.export.review import export_review
    from ccam.runner import WorkdirLock, get_stage, load_pipeline, read_record, run_pipeline

    workdir = Path(workdir)
    t0 = time.time()
    with WorkdirLock(workdir):
        manifest = ensure_cohort(workdir / "data", n_cases, seed)
        cfg = resolve(workdir, config_file or REPO_CONFIGS / "demo.yaml", sets)
        save(cfg, workdir)
        apply_threads(cfg)
        ran = run_pipeline(workdir, cfg, manifest=str(manifest))
        names = [s if isinstance(s, str) else s["stage"] for s in load_pipeline()["stages"]]
        timings = [(n, (read_record(workdir, get_stage(n)) or {}).get("duration_s"), n in ran) for n in names]
        exports = {}
        for stage in (artifacts.pipeline_masks(workdir) or "pseudo-masks", "predict"):
            try:
                prov = export_review(workdir, stage, workdir / "export" / stage)
                exports[stage] = str(workdir / "export" / stage)
                log.info("demo: %d case(s) of %s exported to %s", len(prov["cases"]), stage, exports[stage])
            except UserError as e:  # e.g. a pipeline without that stage
                log.warning("demo: no export of %s (%s)", stage, e)
    report_path = workdir / "reports" / "evaluation.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return {"stages": timings, "ran": ran, "report": report, "exports": exports, "wall_s": time.time() - t0}


@click.command("demo", short_help="Synthetic cohort -> every stage -> evaluation and review export, in one command.")
@shared("workdir", workdir={"required": False, "default": "runs/demo", "show_default": True, "help": "Work directory (the cohort goes to W/data)."})
@click.option("--cases", "-n", default=20, show_default=True, type=click.IntRange(5, 2000),
              help="Number of synthetic patients (at least 5, so train, val and test all get some).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the synthetic cohort.")
@shared("config", "set", config={"help": "Settings instead of configs/demo.yaml."})
def demo_cmd(workdir, cases, seed, config_file, sets) -> None:
    """Run C-CAM end to end on a synthetic abdominal MR cohort and print Dice per stage and class.

    Generates the cohort (train/val/test by patient) into W/data, runs the pipeline with
    configs/demo.yaml, evaluates against the phantom's ground truth, exports the training masks
    and the test predictions to W/export/ for review. Running it again skips what is done.

    \b
    Examples:
      ccam demo
      ccam demo --workdir runs/demo --cases 20
      ccam demo --workdir runs/demo --set seg.epochs=20     # re-runs train-seg and what follows
    """
    res = run_demo(Path(workdir), cases, seed, config_file, sets)
    click.echo("\n## Wall time per stage\n\n| stage | seconds | this run |\n| --- | ---: | --- |")
    for name, sec, ran in res["stages"]:
        click.echo(f"| {name} | {'-' if sec is None else f'{sec:.1f}'} | {'ran' if ran else 'up to date'} |")
    click.echo(f"\nthis run: {res['wall_s']:.0f} s" + ("" if res["ran"] else " (every stage was up to date)"))
    if res["report"] is not None:
        click.echo("\n## Dice (%) per stage and class (against the phantom's ground truth)\n")
        click.echo(dice_table(res["report"]))
    for stage, folder in res["exports"].items():
        click.echo(f"\nreview {stage}: {folder}  (itksnap -g {folder}/images/<id>.nii.gz -s {folder}/labels/original/<id>.nii.gz "
                   f"-l {folder}/labels_itksnap.txt)")


COMMANDS = [demo_cmd]

"""`ccam evaluate`: the evaluation stage, printing the report also when it is up to date."""

from __future__ import annotations

from pathlib import Path

import click

from ccam.config import load_settings
from ccam.options import shared
from ccam.runner import WorkdirLock, run_stage
from ccam.stages.base import read_record
from ccam.stages.evaluate import STAGE, report_paths


@click.command("evaluate", short_help=STAGE.help.split(" (")[0])
@shared("workdir", "config", "set", "force")
def evaluate_cmd(workdir, config_file, sets, force) -> None:
    """Evaluate every stage's masks and the CAMs' localisation against ground truth; writes
    W/reports/evaluation.{json,md} and W/reports/localisation/*.png and prints the tables (also
    when the evaluation is up to date).

    \b
    Examples:
      ccam evaluate --workdir runs/demo
      ccam evaluate --workdir runs/big --set evaluate.surface_distances=false --set evaluate.localisation=false
    """
    wd = Path(workdir)
    with WorkdirLock(wd):
        cfg = load_settings(workdir, config_file, sets, save_to_workdir=False)
        before = read_record(wd, STAGE)
        after = run_stage(wd, cfg, "evaluate", {}, force=force, save_config=True)
    md = report_paths(wd)[1]
    if before is not None and before.get("finished") == after.get("finished") and md.exists():
        click.echo(md.read_text(encoding="utf-8"))  # skipped: show the current report anyway


COMMANDS = [evaluate_cmd]

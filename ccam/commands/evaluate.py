"""`ccam evaluate`: the evaluation stage, printing the report also when it is up to date."""

from __future__ import annotations

from pathlib import Path

import click

from ccam.config import load_settings
from ccam.errors import UserError
from ccam.options import shared
from ccam.runner import WorkdirLock, run_stage
from ccam.stages.base import read_record
from ccam.stages.evaluate import STAGE, report_paths


@click.command("evaluate", short_help=STAGE.help.split(" (")[0])
@shared("workdir", "config", "set", "force")
@click.option("--part", metavar="I/N", help="Measure every N-th case with ground truth from the I-th (0-based), for N parallel "
              "jobs; the last part to end adds the localisation diagnostics and writes the report.")
@click.option("--merge", is_flag=True, help="Finish the evaluation once all its parts ended (the last part does this itself).")
def evaluate_cmd(workdir, config_file, sets, force, part, merge) -> None:
    """Evaluate every stage's masks and the CAMs' localisation against ground truth; writes
    W/reports/evaluation.{json,md} and W/reports/localisation/*.png and prints the tables (also
    when the evaluation is up to date).

    \b
    Examples:
      ccam evaluate --workdir runs/demo
      ccam evaluate --workdir runs/big --set evaluate.surface_distances=false --set evaluate.localisation=false
      ccam evaluate --workdir runs/big --part 0/4      # ... --part 3/4: four jobs share the cases
    """
    wd = Path(workdir)
    if part is not None or merge:
        from ccam import parts

        if part is not None and merge:
            raise UserError("--part and --merge are separate steps", fix="run each --part i/n, then --merge once")
        cfg = load_settings(workdir, config_file, sets, save_to_workdir=False)
        if merge:
            parts.merge(wd, cfg, "evaluate", {})
        else:
            parts.run_part(wd, cfg, "evaluate", part, {}, force=force)
        return
    with WorkdirLock(wd):
        cfg = load_settings(workdir, config_file, sets, save_to_workdir=False)
        before = read_record(wd, STAGE)
        after = run_stage(wd, cfg, "evaluate", {}, force=force, save_config=True)
    md = report_paths(wd)[1]
    if before is not None and before.get("finished") == after.get("finished") and md.exists():
        click.echo(md.read_text(encoding="utf-8"))  # skipped: show the current report anyway


COMMANDS = [evaluate_cmd]

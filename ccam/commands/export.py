"""`ccam export`: a stage's masks as a review folder (MONAI Label layout) with viewer label files.

Not a pipeline stage: it writes where the user says. The work is done by `ccam.export.review`.
"""

from __future__ import annotations

from pathlib import Path

import click

from ccam.export.review import ALIASES, EXPORTABLE, export_review


@click.command("export", short_help="Export a stage's masks for review (images/, labels/original/, labels/final/).")
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False), help="Work directory of the run.")
@click.option("--stage", "-s", required=True, type=click.Choice(list(EXPORTABLE) + sorted(ALIASES)), metavar="STAGE",
              help=f"Whose masks: {', '.join(EXPORTABLE)} (or coarse, pseudo, refined, predicted).")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Review folder (default W/export/<stage>).")
def export_cmd(workdir, stage, out) -> None:
    """Export a stage's masks with their images for review in ITK-SNAP, 3D Slicer or MONAI Label.

    The folder holds images/<id>.nii.gz, labels/original/<id>.nii.gz (our masks, same grid and
    header), an empty labels/final/ for approved or corrected masks, an ITK-SNAP label file, a 3D
    Slicer colour table, labels.json and provenance.json. Train on the reviewed masks with
    `ccam train-seg --workdir W --masks DIR/labels/final`.

    \b
    Examples:
      ccam export --workdir runs/demo --stage pseudo-masks --out review/
      itksnap -g review/images/case000.nii.gz -s review/labels/original/case000.nii.gz -l review/labels_itksnap.txt
      ccam train-seg --workdir runs/demo --masks review/labels/final
    """
    from ccam.runner import WorkdirLock

    from ccam.errors import UserError

    wd = Path(workdir)
    if not (wd / "prepare").is_dir():
        raise UserError("not a ccam work directory (no prepare/)", path=str(wd), fix="point --workdir to a run")
    dest = Path(out) if out else wd / "export" / stage
    with WorkdirLock(wd):  # no stage may rewrite the masks while they are copied
        prov = export_review(wd, stage, dest)
    click.echo(f"export: {len(prov['cases'])} case(s) of {prov['stage']} in {dest}", err=True)


COMMANDS = [export_cmd]

"""`ccam review`: the clinician review report of a stage's masks, and recording review decisions.

The work is done by `ccam.review.report` (report) and `ccam.review.decisions` (decisions).
"""

from __future__ import annotations

from pathlib import Path

import click

from ccam import artifacts
from ccam.options import shared

from ccam.errors import UserError
from ccam.export.review import ALIASES, EXPORTABLE


@click.command("review", short_help="Review report of a stage's masks (flags, pictures), and recorded decisions.")
@shared("workdir")
@click.option("--stage", "-s", type=click.Choice(list(EXPORTABLE) + sorted(ALIASES)), metavar="STAGE",
              help="Whose masks to review: pseudo-masks, refine (refined), predict (or sample).")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Report folder (default W/reports/review/<stage>).")
@click.option("--no-export", is_flag=True, help="Pictures only: do not put images/ and labels/ beside the report.")
@click.option("--record", "record_files", multiple=True, type=click.Path(dir_okay=False),
              help="Record the decisions.json a report page saved (repeatable).")
@click.option("--decide", nargs=2, multiple=True, metavar="CASE DECISION",
              help="Record one decision: accept, edit (needs edit) or reject (repeatable).")
@click.option("--comment", default="", help="Comment stored with --decide.")
@click.option("--final-dir", type=click.Path(file_okay=False),
              help="Folder of edited masks (<case>.nii.gz) for 'edit' decisions (default: the one the report names).")
def review_cmd(workdir, stage, out, no_export, record_files, decide, comment, final_dir) -> None:
    """Write a static review report of a stage's masks, or record reviewers' decisions.

    The report (D/index.html, one page per case) lists the cases worst first with flags computed
    without ground truth, and shows each case with its mask on axial, coronal and sagittal views.
    Beside it are the images and masks in the MONAI Label layout (D/labels/final for edits).
    A page saves the decisions (accept / needs edit / reject) as decisions.json; --record stores
    them in W/review/decisions.json, where `ccam train-seg` reads them: edited cases train on
    D/labels/final/<case>.nii.gz, rejected cases are left out.

    \b
    Examples:
      ccam review --workdir runs/demo --stage pseudo-masks --out review/
      ccam review --workdir runs/demo --record ~/Downloads/decisions.json
      ccam review --workdir runs/demo --decide case003 reject --comment "motion artefact"
      ccam train-seg --workdir runs/demo
    """
    from ccam.runner import WorkdirLock

    wd = Path(workdir)
    if not artifacts.stage_dir(wd, "prepare").is_dir():
        raise UserError("not a ccam work directory (no prepare/)", path=str(wd), fix="point --workdir to a run")
    if not (stage or record_files or decide):
        raise UserError("nothing to do", fix="pass --stage to write a report, or --record FILE / --decide CASE DECISION")
    with WorkdirLock(wd):
        if record_files or decide:
            _record(wd, record_files, decide, comment, final_dir)
        if stage:
            from ccam.review.report import build_report, default_out

            from ccam.export.review import resolve_stage

            dest = Path(out) if out else default_out(wd, resolve_stage(stage))
            rep = build_report(wd, stage, dest, export=not no_export)
            flagged = sum(1 for c in rep["cases"] if c["flags"])
            click.echo(f"review: {len(rep['cases'])} case(s) of {rep['stage']}, {flagged} flagged: {dest / 'index.html'}", err=True)


def _record(wd: Path, record_files, decide, comment: str, final_dir) -> None:
    from ccam.review.decisions import normalise_decision, parse_decisions_file, record_decisions

    for f in record_files:
        table, meta = parse_decisions_file(Path(f))
        if meta.get("workdir") and Path(meta["workdir"]).resolve() != wd.resolve():
            click.echo(f"review: note: {f} was saved from a report of {meta['workdir']}", err=True)
        fd = Path(final_dir) if final_dir else (Path(meta["final_dir"]) if meta.get("final_dir") else None)
        stored = record_decisions(wd, table, source=str(Path(f).resolve()), stage=meta.get("stage"), final_dir=fd)
        click.echo(f"review: recorded {len(table)} decision(s) from {f}: {_counts(table)}; "
                   f"{len(stored)} case(s) decided in {wd / 'review' / 'decisions.json'}", err=True)
    if decide:
        table = {cid: {"decision": normalise_decision(d, cid, "--decide"), "comment": comment} for cid, d in decide}
        record_decisions(wd, table, source="ccam review --decide", final_dir=Path(final_dir) if final_dir else None)
        click.echo(f"review: recorded {_counts(table)}", err=True)


def _counts(table: dict) -> str:
    out = {}
    for d in table.values():
        out[d["decision"]] = out.get(d["decision"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(out.items())) or "none"


COMMANDS = [review_cmd]

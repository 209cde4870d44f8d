"""`ccam predict`: the pipeline stage (the cohort's test cases), or any volumes with --input/--output."""

from __future__ import annotations

from pathlib import Path

import click

from ccam.config import load_settings
from ccam.errors import UserError
from ccam.options import shared
from ccam.runner import WorkdirLock, run_stage
from ccam.stages.predict import predict_files


@click.command("predict", short_help="Segment the test cases, or any volumes with --input/--output.")
@shared("workdir", workdir={"help": "Work directory with a trained segmenter (seg/)."})
@click.option("--input", "-i", "input_path", type=click.Path(), help="NIfTI/MHA/NRRD file, folder of them, DICOM series folder, or manifest.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output folder for <case_id>.nii.gz (with --input).")
@click.option("--continue", "resume", is_flag=True, help="Skip cases whose outputs are already written.")
@click.option("--part", metavar="I/N", help="Process every N-th case starting at I (0-based), for N parallel jobs "
              "(pipeline mode too: the last part to end writes the stage record).")
@click.option("--merge", is_flag=True, help="Pipeline mode: finish the stage once all its parts ended (the last part does this itself).")
@click.option("--probabilities", is_flag=True, help="Also write <case_id>.npz with float16 class probabilities (C, I, J, K).")
@shared("config", "set", "force", force={"help": "Pipeline mode: run even if the stage is up to date."})
def predict_cmd(workdir, input_path, output, resume, part, merge, probabilities, config_file, sets, force) -> None:
    """Segment volumes with the trained U-Net; label maps are written on each volume's own grid.

    Without --input this is the pipeline stage: the prepared cohort's test cases into
    W/predictions/. With --input PATH --output DIR it segments new volumes and only reads W,
    so several jobs (--part 0/4 ... 3/4) can run at once.

    \b
    Examples:
      ccam predict --workdir runs/demo
      ccam predict --workdir runs/demo --input new_scans/ --output new_masks/
      ccam predict --workdir runs/demo --input scan.mha --output out/ --probabilities
      ccam predict --workdir runs/demo --input cohort.json --output masks/ --part 1/4 --continue
      ccam predict --workdir runs/demo --part 0/2 & ccam predict --workdir runs/demo --part 1/2
    """
    if input_path is None:
        if output is not None or resume or probabilities:
            raise UserError("--output, --continue and --probabilities go with --input",
                            fix="add --input PATH, or drop them to predict the cohort's test cases into W/predictions")
        if part is not None or merge:
            from ccam import parts

            if part is not None and merge:
                raise UserError("--part and --merge are separate steps", fix="run each --part i/n, then --merge once")
            cfg = load_settings(workdir, config_file, sets, save_to_workdir=False)
            if merge:
                parts.merge(Path(workdir), cfg, "predict", {})
            else:
                parts.run_part(Path(workdir), cfg, "predict", part, {}, force=force)
            return
        with WorkdirLock(Path(workdir)):
            cfg = load_settings(workdir, config_file, sets, save_to_workdir=False)
            run_stage(Path(workdir), cfg, "predict", {}, force=force, save_config=True)
        return
    if merge:
        raise UserError("--merge is for the pipeline stage (no --input)", fix="drop --merge: with --input every part writes its own files")
    if output is None:
        raise UserError("--input needs --output DIR", fix="add --output folder/for/masks")
    if not Path(workdir).is_dir():
        raise UserError("work directory does not exist", path=str(workdir), fix="point --workdir to a run with a trained segmenter")
    cfg = load_settings(workdir, config_file, sets, save_to_workdir=False)  # read-only: parallel parts may share W
    res = predict_files(Path(workdir), cfg, Path(input_path), Path(output), resume=resume, part=part, probabilities=probabilities)
    click.echo(f"predict: {res['cases']} case(s) written to {output}" + (f", {res['skipped']} skipped" if res["skipped"] else ""), err=True)


COMMANDS = [predict_cmd]

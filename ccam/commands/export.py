"""`ccam export`: a stage's masks as a review folder (MONAI Label layout) with viewer label files.

Not a pipeline stage: it writes where the user says. The work is done by `ccam.export.review`.
"""

from __future__ import annotations

from pathlib import Path

import click

from ccam import artifacts
from ccam.io.paths import check_output_folder
from ccam.options import shared
from ccam.stages.base import SPECS

from ccam.export.review import ALIASES, EXPORTABLE, export_review


@click.command("export", short_help="Export a stage's masks for review (images/, labels/original/, labels/final/).")
@shared("workdir")
@click.option("--stage", "-s", required=True, type=click.Choice(list(EXPORTABLE) + sorted(ALIASES)), metavar="STAGE",
              help=f"Whose masks: {', '.join(EXPORTABLE)} (or coarse, pseudo, refined, predicted).")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Output folder (default W/export/<stage>[-<format>]).")
@click.option("--format", "fmt", type=click.Choice(["monai", "nnunet", "seg.nrrd", "dicom-seg"]), default="monai",
              show_default=True, help="monai: MONAI Label folder; nnunet: nnU-Net v2 raw dataset of the reviewed masks; "
                                      "seg.nrrd: 3D Slicer segmentations; dicom-seg: DICOM-SEG for DICOM-series cases.")
@click.option("--dataset-id", type=int, default=501, show_default=True, help="nnunet: dataset number (1-999).")
@click.option("--name", "dataset_name", default="CCAM", show_default=True, help="nnunet: dataset name (letters, digits, _).")
@click.option("--masks", "final_dir", type=click.Path(file_okay=False),
              help="Folder of edited masks for cases decided 'edit' (default: the one recorded with the decision).")
def export_cmd(workdir, stage, out, fmt, dataset_id, dataset_name, final_dir) -> None:
    """Export a stage's masks with their images for review in ITK-SNAP, 3D Slicer or MONAI Label.

    The folder holds images/<id>.nii.gz, labels/original/<id>.nii.gz (our masks, same grid and
    header), an empty labels/final/ for approved or corrected masks, an ITK-SNAP label file, a 3D
    Slicer colour table, labels.json and provenance.json. Train on the reviewed masks with
    `ccam train-seg --workdir W --masks DIR/labels/final`.

    The other formats export the reviewed masks (rejected cases left out, edited ones from
    labels/final): an nnU-Net v2 raw dataset (DatasetNNN_Name/imagesTr, labelsTr, dataset.json),
    3D Slicer .seg.nrrd files, or DICOM-SEG objects for cases whose source is a DICOM series.

    \b
    Examples:
      ccam export --workdir runs/demo --stage pseudo-masks --out review/
      itksnap -g review/images/case000.nii.gz -s review/labels/original/case000.nii.gz -l review/labels_itksnap.txt
      ccam train-seg --workdir runs/demo --masks review/labels/final
      ccam export --workdir runs/demo --stage pseudo-masks --format nnunet --dataset-id 501 --out nnUNet_raw
    """
    from ccam.runner import WorkdirLock

    from ccam.errors import UserError

    wd = Path(workdir)
    if not artifacts.stage_dir(wd, "prepare").is_dir():
        raise UserError("not a ccam work directory (no prepare/)", path=str(wd), fix="point --workdir to a run")
    dest = Path(out) if out else wd / "export" / (stage if fmt == "monai" else f"{stage}-{fmt}")
    check_output_folder(dest, wd, [s.folder for s in SPECS.values()], marker="provenance.json" if fmt == "monai" else None)
    fd = Path(final_dir) if final_dir else None
    with WorkdirLock(wd):  # no stage may rewrite the masks while they are copied
        if fmt == "monai":
            prov = export_review(wd, stage, dest)
            click.echo(f"export: {len(prov['cases'])} case(s) of {prov['stage']} in {dest}", err=True)
        elif fmt == "nnunet":
            from ccam.export.nnunet import export_nnunet

            ds = export_nnunet(wd, stage, dest, dataset_id, dataset_name, final_dir=fd)
            click.echo(f"export: nnU-Net dataset with {ds['numTraining']} case(s) in {dest}", err=True)
        elif fmt == "seg.nrrd":
            from ccam.export.seg_nrrd import export_seg_nrrd

            n = export_seg_nrrd(wd, stage, dest, final_dir=fd)
            click.echo(f"export: {len(n)} .seg.nrrd file(s) in {dest}", err=True)
        else:
            from ccam.export.dicom_seg import export_dicom_seg

            n = export_dicom_seg(wd, stage, dest, final_dir=fd)
            click.echo(f"export: {len(n)} DICOM-SEG file(s) in {dest}", err=True)


COMMANDS = [export_cmd]

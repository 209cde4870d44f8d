"""`ccam review`'s report: a static, self-contained folder that opens from disk.

``D/index.html``              one row per case, worst first, sortable; decisions of every case
``D/cases/<id>.html``         the case page: pictures, per-class table, flags in words, decision
``D/cases/<id>/*.png``        matplotlib pictures (`ccam.review.render`)
``D/report.json``             the same measurements and flags, machine-readable
``D/images``, ``D/labels/original``, ``D/labels/final``, label files, ``provenance.json``:
                              the MONAI Label export of the same masks (`ccam.export.review`), so
                              an edited mask is saved beside the report, in ``D/labels/final``

Pages are rendered by Jinja2 from ``ccam/review/templates``; the only script is inline (table
sorting, keeping decisions in the browser's local storage, saving ``decisions.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from ccam.progress import tqdm

from ccam import __version__
from ccam.data.cohort import Cohort
from ccam.errors import UserError
from ccam.export.labels import class_colours
from ccam.export.review import case_image_and_mask, export_review, stage_masks
from ccam.io.atomic import write_json, write_text
from ccam.review.decisions import load_decisions
from ccam.review.flags import SHORT, WEIGHTS, add_cohort_flags, case_confidence, measure_case
from ccam.review.render import render_case

log = logging.getLogger("ccam")
TEMPLATES = Path(__file__).parent / "templates"


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["hex"] = lambda rgb: "#%02x%02x%02x" % tuple(rgb)
    return env


def default_out(workdir: Path, stage: str) -> Path:
    return Path(workdir) / "reports" / "review" / stage


def build_report(workdir: Path, stage: str, out: Path, *, export: bool = True) -> dict:
    """Measure, flag and draw every case of ``stage``, write the report into ``out``; returns report.json's content."""
    workdir, out = Path(workdir), Path(out)
    name, mask_folder, record = stage_masks(workdir, stage)
    cohort = Cohort(workdir)
    ids = {c.id for c in cohort.cases}
    files = [f for f in sorted(mask_folder.glob("*.nii.gz")) if f.name[:-7] in ids]
    if not files:
        raise UserError(f"stage '{name}' wrote no masks", path=str(mask_folder), fix=f"re-run `ccam {name} --workdir {workdir}`")
    try:
        (out / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder ({e.strerror})", path=str(out), fix="choose a writable --out")
    if export:
        export_review(workdir, name, out)
    old = _old_cases(out)

    classes = cohort.classes
    tau = None
    try:
        from ccam.config import resolve

        tau = float(resolve(workdir).cam.tau)
    except Exception:  # an unreadable config only loses the default; the stage record usually has tau
        tau = 0.25
    reviews = []
    for f in tqdm(files, desc=f"review {name}", unit="case", dynamic_ncols=True):
        cid, image, mask = case_image_and_mask(workdir, name, cohort, f)
        case = cohort.case(cid)
        labels = np.asarray(mask.array).astype(np.int32)
        conf = case_confidence(workdir, name, record, case, labels, default_tau=tau)
        r = measure_case(case, np.asarray(image.array), labels, image.affine, classes, conf)
        folder = out / "cases" / cid
        before = set(folder.glob("*.png")) if folder.is_dir() else set()
        r["pictures"] = render_case(np.asarray(image.array), labels, image.affine, classes, folder)
        written = {out / "cases" / p["file"] for p in r["pictures"]["axial"]} | {folder / "thumb.png", folder / "coronal.png",
                                                                                 folder / "sagittal.png"}
        for stale in before - written:
            stale.unlink(missing_ok=True)
        reviews.append(r)
        del image, mask, labels
    reviews = add_cohort_flags(reviews, classes)

    key = hashlib.sha256(f"{workdir.resolve()}|{name}".encode()).hexdigest()[:16]
    final_dir = (out / "labels" / "final").resolve() if export else None
    recorded = {cid: {"decision": d["decision"], "comment": d.get("comment", "")}
                for cid, d in load_decisions(workdir).items() if cid in ids}
    page_data = {"key": key, "workdir": str(workdir.resolve()), "stage": name, "report": str(out.resolve()),
                 "final_dir": str(final_dir) if final_dir else None, "recorded": recorded,
                 "cases": [r["id"] for r in reviews]}
    common = {"stage": name, "workdir": str(workdir.resolve()), "classes": classes,
              "colours": class_colours(classes), "version": __version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "data": page_data, "short": SHORT, "weights": WEIGHTS, "out": str(out.resolve()), "export": export}
    env = environment()
    order = [r["id"] for r in reviews]
    for i, r in enumerate(reviews):
        html = env.get_template("case.html.j2").render(
            case=r, prev=order[i - 1] if i > 0 else None, next=order[i + 1] if i + 1 < len(order) else None,
            rank=i + 1, n=len(order), **common)
        write_text(out / "cases" / f"{r['id']}.html", html)
    write_text(out / "index.html", env.get_template("index.html.j2").render(cases=reviews, **common))
    for cid in old - set(order):  # cases of an earlier report that this stage no longer has
        (out / "cases" / f"{cid}.html").unlink(missing_ok=True)
        shutil.rmtree(out / "cases" / cid, ignore_errors=True)
    report = {"tool": "ccam", "version": __version__, "date": common["date"], "stage": name,
              "workdir": str(workdir.resolve()), "mask_folder": str(mask_folder), "classes": classes,
              "final_dir": page_data["final_dir"], "cases": reviews}
    write_json(out / "report.json", report)  # last: its presence marks a complete report
    flagged = sum(1 for r in reviews if r["flags"])
    log.info("review: %d case(s) of %s, %d flagged, worst %s (score %d); open %s", len(reviews), name, flagged,
             reviews[0]["id"], reviews[0]["score"], out / "index.html")
    return report


def _old_cases(out: Path) -> set[str]:
    p = out / "report.json"
    try:
        return {c["id"] for c in json.loads(p.read_text()).get("cases", [])}
    except (OSError, json.JSONDecodeError, TypeError, KeyError):
        return set()

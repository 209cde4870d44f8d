"""What ``ccam predict --input`` accepts: a volume file, a folder of them, a DICOM series folder (or a
folder of series folders) or a manifest; and ``--part i/n`` (nnU-Net's convention) to split cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ccam.errors import UserError
from ccam.io.paths import check_case_id
from ccam.io.volume import NIFTI_SUFFIXES, SITK_SUFFIXES

VOLUME_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: len(name) - len(suf)]
    return name


def _is_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns on stderr for every folder without a series
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    except RuntimeError:
        return False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _manifest_cases(path: Path) -> tuple[list[tuple[str, Path]], Optional[str]]:
    """(case id, image) of every case of a manifest, and its modality; tags and splits are not needed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"manifest is not valid UTF-8 JSON ({type(e).__name__})", path=str(path), fix="fix the JSON syntax")
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise UserError("manifest has no 'cases' list", path=str(path), fix="see DESIGN section 3 for the manifest format")
    out = []
    for i, c in enumerate(data["cases"]):
        if not isinstance(c, dict) or "id" not in c or "image" not in c:
            raise UserError(f"case #{i} needs 'id' and 'image'", path=str(path), fix="fix the manifest")
        out.append((check_case_id(c["id"], path), (path.parent / str(c["image"])).resolve()))
    return out, data.get("modality")


def find_inputs(path: Path) -> tuple[list[tuple[str, Path]], Optional[str]]:
    """(case id, image path) for --input, sorted by id, and the manifest's modality if any."""
    path = Path(path)
    if not path.exists():
        raise UserError("input not found", path=str(path), fix="pass a NIfTI/MHA/NRRD file, a folder of them, a DICOM series folder or a manifest")
    modality = None
    if path.is_file() and path.suffix.lower() == ".json":
        cases, modality = _manifest_cases(path)
    elif path.is_file():
        if not path.name.lower().endswith(VOLUME_SUFFIXES):
            raise UserError("input is not a volume file", path=str(path), fix="use .nii, .nii.gz, .mha, .mhd, .nrrd or .nhdr, a folder or a manifest")
        cases = [(_strip_suffix(path.name), path)]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
                       and not p.name.startswith(".") and not p.name.lower().endswith(".raw"))
        if files:
            cases = [(_strip_suffix(p.name), p) for p in files]
        elif _is_dicom_series(path):
            cases = [(path.name, path)]
        else:
            series = sorted(p for p in path.iterdir() if p.is_dir() and _is_dicom_series(p))
            if not series:
                raise UserError("folder holds no NIfTI/MHA/NRRD file and no DICOM series", path=str(path),
                                fix="point --input to volumes, a DICOM series folder or a manifest")
            cases = [(p.name, p) for p in series]
    for cid, p in cases:
        check_case_id(cid, p)
    ids = [c[0] for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"duplicate case id(s) {', '.join(dup)} in the input", path=str(path),
                        fix="give every volume a distinct file name (e.g. not both X.nii.gz and X.mha)")
    return sorted(cases), modality


def parse_part(text: Optional[str]) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--part {text!r} must look like i/n", fix="e.g. --part 0/4 ... --part 3/4 for four jobs")
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--part {text}: need 0 <= i < n", fix="e.g. --part 0/4 ... --part 3/4 for four jobs")
    return i, n

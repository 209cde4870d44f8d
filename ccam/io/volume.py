"""Volume I/O on exact geometry.

NIfTI goes through nibabel; MHA, NRRD and DICOM series go through SimpleITK. Arrays are always
returned in the file's own voxel order with a 4x4 RAS affine (nibabel convention), so a file
stored LPS, RAS or with the slice axis first describes the same anatomy.

Label maps are written as NIfTI-1, uint8 (uint16 above 255 classes), on exactly the source grid,
with the source affine as both qform and sform and a fresh header (no patient text fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ccam.errors import UserError
from ccam.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
MASK_SUFFIXES = (".nii.gz", ".nii")  # label maps users hand back (e.g. corrected in ITK-SNAP or Slicer)


def mask_file(folder, case_id: str):
    """``folder/<case_id>.nii.gz`` (or ``.nii``) when it exists, else None (also for folder None)."""
    if folder is None:
        return None
    for suffix in MASK_SUFFIXES:
        p = Path(folder) / f"{case_id}{suffix}"
        if p.is_file():
            return p
    return None
AXIS_OF_SLICE = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS world axis normal to the slice

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D volume: ``array`` (I, J, K) in file voxel order and its RAS ``affine`` (4, 4)."""

    array: np.ndarray
    affine: np.ndarray
    path: str
    qform_code: int = 1
    sform_code: int = 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def is_volume_path(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES + SITK_SUFFIXES) or path.is_dir()


def check_grid(shape: tuple, affine: np.ndarray, dtype, path: Path, case: str | None) -> None:
    """A volume ccam can slice: scalar real voxels, at least one voxel per axis, a finite invertible affine."""
    dt = np.dtype(dtype)
    if dt.fields is not None or dt.kind == "V":
        raise UserError("image has colour (RGB) voxels; a scalar volume is needed", case=case, path=str(path),
                        fix="convert it to a single-channel (grey) image")
    if dt.kind == "c":
        raise UserError("image has complex voxels", case=case, path=str(path), fix="save the magnitude image (np.abs) instead")
    if dt.kind not in "biuf":
        raise UserError(f"image voxels are of type {dt}, not numbers", case=case, path=str(path), fix="re-export the image")
    if min(shape) < 1:
        raise UserError(f"image has an empty axis (shape {tuple(shape)})", case=case, path=str(path), fix="re-export the volume")
    aff = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    if not np.isfinite(aff).all() or (spacing < 1e-6).any() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise UserError(f"image geometry is broken (voxel spacing {tuple(round(float(v), 6) for v in spacing)} mm)",
                        case=case, path=str(path), fix="fix the header's voxel size and orientation (pixdim / qform / sform)")


def _raw_pixdim(path: Path, img) -> np.ndarray:
    """Voxel sizes as stored: nibabel replaces a 0 by 1 on load, which would hide a broken header."""
    try:
        with nib.openers.ImageOpener(str(path)) as fobj:
            hdr = type(img.header).from_fileobj(fobj, check=False)
        return np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    except Exception:  # unreadable header: the normal load reports it
        return np.asarray(img.header["pixdim"][1:4], dtype=np.float64)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _squeeze_3d(shape: tuple, path: Path, case: str | None) -> tuple:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise UserError(
            f"image has {len(shape)} dimensions {shape}, a 3D volume is needed", case=case, path=str(path),
            fix="split 4D series into one 3D file per volume",
        )
    return shape


def _sitk_affine(img) -> np.ndarray:
    """RAS affine of a SimpleITK image whose array is transposed to (x, y, z) index order."""
    d = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    s = np.array(img.GetSpacing(), dtype=np.float64)
    o = np.array(img.GetOrigin(), dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = d * s[None, :]
    aff[:3, 3] = o
    return _LPS_TO_RAS @ aff


def _sitk_dtype(pixel_id: int, components: int) -> np.dtype:
    """The numpy dtype of a SimpleITK pixel type: colour -> a structured dtype, complex -> complex64."""
    import SimpleITK as sitk

    if components > 1:
        return np.dtype([("r", "u1"), ("g", "u1"), ("b", "u1")])
    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        return np.dtype(np.complex64)
    return np.dtype(np.float32)


def _read_sitk(path: Path, case: str | None, header_only: bool):
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if len(series) > 1:
                raise UserError(f"folder holds {len(series)} DICOM series ({', '.join(series[:4])}{', ...' if len(series) > 4 else ''})",
                                case=case, path=str(path), fix="move each series into its own folder and point to one")
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise UserError("folder holds no DICOM series", case=case, path=str(path), fix="point to a NIfTI/MHA/NRRD file or a DICOM series folder")
            reader.SetFileNames(files)
            img = reader.Execute()
        elif header_only:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = reader.GetSize()
            ndim = len(size)
            if ndim != 3 and not (ndim == 4 and size[3] == 1):
                _squeeze_3d(tuple(size), path, case)
            d = np.array(reader.GetDirection(), dtype=np.float64)
            k = int(round(np.sqrt(d.size)))
            d = d.reshape(k, k)[:3, :3]
            aff = np.eye(4)
            aff[:3, :3] = d * np.array(reader.GetSpacing()[:3])[None, :]
            aff[:3, 3] = reader.GetOrigin()[:3]
            return tuple(int(s) for s in size[:3]), _LPS_TO_RAS @ aff, _sitk_dtype(reader.GetPixelID(), reader.GetNumberOfComponents())
        else:
            img = sitk.ReadImage(str(path))
    except UserError:
        raise
    except Exception as e:  # SimpleITK raises RuntimeError with a long multi-line text
        last = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        if "No such file" in last and path.exists():  # ITK's words for a header whose pixel data is cut short or absent
            raise UserError("cannot read image: the file is truncated or its pixel data is missing", case=case, path=str(path),
                            fix="re-export the image (for .mhd, keep the .raw/.zraw file beside it)")
        raise UserError(f"cannot read image ({last})", case=case, path=str(path), fix="check the file is a valid, complete image")
    if img.GetNumberOfComponentsPerPixel() > 1:
        check_grid((1, 1, 1), np.eye(4), _sitk_dtype(img.GetPixelID(), img.GetNumberOfComponentsPerPixel()), path, case)
    if img.GetDimension() != 3:
        _squeeze_3d(tuple(img.GetSize()), path, case)
    if header_only:  # a DICOM series: its header comes with the read
        return tuple(int(v) for v in img.GetSize()), _sitk_affine(img), _sitk_dtype(img.GetPixelID(), img.GetNumberOfComponentsPerPixel())
    arr = sitk.GetArrayViewFromImage(img).transpose(2, 1, 0)  # (z,y,x) -> (x,y,z) = index order
    return np.array(arr), _sitk_affine(img)


def read_header(path: str | Path, case: str | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (I, J, K) and RAS affine without reading the voxels."""
    path = _existing(path, case)
    if _is_nifti(path):
        try:
            img = nib.load(str(path))
        except Exception as e:
            raise UserError(f"cannot read image header ({type(e).__name__}: {str(e)[:120]})", case=case, path=str(path), fix="check the file is a valid, complete NIfTI")
        shape, affine = _squeeze_3d(img.shape, path, case), np.asarray(img.affine, dtype=np.float64)
        pixdim = _raw_pixdim(path, img)
        if (np.abs(pixdim) < 1e-6).any():  # nibabel silently reads a 0 voxel size as 1 mm
            raise UserError(f"image geometry is broken (voxel size {tuple(float(v) for v in pixdim)} mm in the header)",
                            case=case, path=str(path), fix="fix the header's voxel size (pixdim)")
        check_grid(shape, affine, img.get_data_dtype(), path, case)
        return shape, affine
    shape, affine, dtype = _read_sitk(path, case, header_only=True)
    check_grid(shape, affine, dtype, path, case)
    return shape, affine


def _existing(path: str | Path, case: str | None) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", case=case, path=str(path), fix="check the path in the manifest")
    return path


def read_volume(path: str | Path, case: str | None = None, dtype=None) -> Volume:
    """Read a 3D volume; raise UserError naming the case and file for anything unreadable."""
    path = _existing(path, case)
    if _is_nifti(path):
        try:
            img = nib.load(str(path))
            shape = _squeeze_3d(img.shape, path, case)
            arr = np.asanyarray(img.dataobj)
            if dtype is not None:
                arr = arr.astype(dtype, copy=False)
            arr = arr.reshape(shape)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read image ({type(e).__name__}: {str(e)[:120]})", case=case, path=str(path), fix="the file is corrupt or truncated; re-export it")
        hdr = img.header
        qc, sc = int(hdr["qform_code"]), int(hdr["sform_code"])
        check_grid(arr.shape, img.affine, img.get_data_dtype() if dtype is None else arr.dtype, path, case)
        return Volume(arr, np.asarray(img.affine, dtype=np.float64), str(path), qc or (0 if sc else 1), sc or (0 if qc else 1))
    arr, aff = _read_sitk(path, case, header_only=False)
    check_grid(arr.shape, aff, arr.dtype, path, case)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return Volume(arr, aff, str(path))


def slice_axis_of(affine: np.ndarray, slice_axis: str) -> int:
    """Voxel axis (0..2) whose direction is closest to the world normal of ``slice_axis``."""
    ornt = nib.orientations.io_orientation(affine)
    world = AXIS_OF_SLICE[slice_axis]
    return int(np.flatnonzero(ornt[:, 0] == world)[0])


def label_dtype(n_labels: int):
    return np.uint8 if n_labels <= 255 else np.uint16


def write_label_map(path: str | Path, labels: np.ndarray, affine: np.ndarray, *, n_labels: int | None = None,
                    qform_code: int = 1, sform_code: int = 1) -> Path:
    """Write a label map (I, J, K) on the source grid; returns the path. Atomic."""
    path = Path(path)
    top = int(labels.max()) if labels.size else 0
    dtype = label_dtype(max(top, n_labels or 0))
    img = nib.Nifti1Image(np.asarray(labels).astype(dtype, copy=False), affine)
    img.set_qform(affine, code=int(qform_code) or 1)
    img.set_sform(affine, code=int(sform_code) or 1)
    img.header.set_xyzt_units("mm", "sec")
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        img.header[field] = b""
    with atomic_path(path, suffix=".nii.gz" if path.name.endswith(".gz") else ".nii") as tmp:
        nib.save(img, str(tmp))
    return path

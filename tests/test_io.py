"""Volume I/O and geometry: orientation independence, exact label-map writing, round trips."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ccam.data.phantom import CLASSES, make_phantom_volume
from ccam.io.geometry import SliceGeometry, labels_from_source, labels_to_source
from ccam.io.volume import read_header, read_volume, write_label_map
from ccam.metrics import dice_per_class

SHAPE = (96, 88, 20)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SLICE_FIRST"])
def test_canonical_view_is_orientation_independent(orientation):
    img_ras, _, aff_ras = make_phantom_volume(SHAPE, modality="CT", seed=3, orientation="RAS")
    img, _, aff = make_phantom_volume(SHAPE, modality="CT", seed=3, orientation=orientation)
    g_ras = SliceGeometry.from_affine(img_ras.shape, aff_ras, "axial", 64)
    g = SliceGeometry.from_affine(img.shape, aff, "axial", 64)
    ref = g_ras.canonical_view(img_ras)
    view = g.canonical_view(img)
    assert view.shape == ref.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    # same anatomy at the same pixel (these storages keep the file's slice order inferior->superior)
    assert np.array_equal(view, ref)
    # radiological view: the liver (patient's right) sits in the left half of the columns
    _, mask, _ = make_phantom_volume(SHAPE, modality="CT", seed=3, orientation=orientation)
    mv = g.canonical_view(mask)
    cols = np.nonzero(mv == CLASSES.index("liver") + 1)[2]
    assert cols.mean() < mv.shape[2] / 2


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_sitk_formats_match_nifti(tmp_path, suffix):
    img, _, aff = make_phantom_volume(SHAPE, modality="MR", seed=1, orientation="LPS")
    nii = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), nii)
    ref = read_volume(nii)
    s = sitk.ReadImage(str(nii))
    other = tmp_path / f"a{suffix}"
    sitk.WriteImage(s, str(other))
    v = read_volume(other)
    assert np.array_equal(v.array, ref.array)
    assert np.allclose(v.affine, ref.affine, atol=1e-4)
    shape, haff = read_header(other)
    assert shape == ref.array.shape and np.allclose(haff, ref.affine, atol=1e-4)


def test_label_map_written_exactly(tmp_path):
    img, mask, aff = make_phantom_volume(SHAPE, seed=2, orientation="LPS")
    src = tmp_path / "src.nii.gz"
    hdr_img = nib.Nifti1Image(img, aff)
    hdr_img.header["descrip"] = b"Patient^Jane 1970-01-01"
    hdr_img.header["db_name"] = b"MRN12345"
    nib.save(hdr_img, src)
    vol = read_volume(src)
    out = write_label_map(tmp_path / "lab.nii.gz", mask, vol.affine, qform_code=vol.qform_code, sform_code=vol.sform_code)
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(back.dataobj), mask)
    assert np.array_equal(back.affine, vol.affine)  # to the last bit
    assert np.allclose(back.get_qform(), vol.affine, atol=1e-5) and np.array_equal(back.get_sform(), vol.affine)
    assert int(back.header["qform_code"]) > 0 and int(back.header["sform_code"]) > 0
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        assert back.header[field].item() in (b"", "")
    big = np.zeros((4, 4, 4), np.int32)
    big[0, 0, 0] = 300
    assert nib.load(write_label_map(tmp_path / "big.nii.gz", big, np.eye(4))).get_data_dtype() == np.uint16


def test_4d_and_corrupt_files_are_user_errors(tmp_path):
    from ccam.errors import UserError

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(UserError, match="3D volume is needed"):
        read_header(tmp_path / "4d.nii.gz", case="x")
    good = tmp_path / "g.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(30, 30, 30).astype(np.float32), np.eye(4)), good)
    (tmp_path / "trunc.nii.gz").write_bytes(good.read_bytes()[:2000])
    with pytest.raises(UserError, match="case y.*trunc.nii.gz.*cannot read"):
        read_volume(tmp_path / "trunc.nii.gz", case="y")


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SLICE_FIRST"])
def test_mask_round_trip_through_slice_grid(orientation):
    """GT mask -> S x S stack -> source grid keeps Dice >= 0.97 per class (resampling loss only)."""
    _, mask, aff = make_phantom_volume((160, 160, 24), seed=4, orientation=orientation)
    g = SliceGeometry.from_affine(mask.shape, aff, "axial", 256)
    stack = labels_from_source(g, mask, len(CLASSES) + 1)
    assert stack.shape == (g.n_slices, 256, 256)
    back = labels_to_source(g, stack, len(CLASSES) + 1)
    assert back.shape == mask.shape
    d = dice_per_class(back, mask, len(CLASSES))
    assert np.nanmin(d) >= 0.97, d


def test_dicom_series_folder(tmp_path):
    """A DICOM series folder reads as the same volume and RAS affine as the NIfTI it came from."""
    img, _, aff = make_phantom_volume((48, 40, 8), modality="CT", seed=5, orientation="RAS")
    vol = sitk.GetImageFromArray(img.transpose(2, 1, 0))  # (z, y, x) for SimpleITK
    sp = [float(abs(aff[i, i])) for i in range(3)]
    vol.SetSpacing(sp)
    # RAS diagonal affine -> LPS direction diag(-1, -1, 1), origin negated in x and y
    vol.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    vol.SetOrigin((-float(aff[0, 3]), -float(aff[1, 3]), float(aff[2, 3])))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1"
    for z in range(vol.GetDepth()):
        sl = vol[:, :, z]
        pos = vol.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in {"0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".0",
                           "0020|0013": str(z + 1), "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
                           "0020|0037": "-1\\0\\0\\0\\-1\\0", "0028|0030": f"{sp[1]}\\{sp[0]}",
                           "0018|0050": str(sp[2])}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"{z:03d}.dcm"))
        writer.Execute(sl)
    v = read_volume(tmp_path)
    assert v.array.shape == img.shape
    assert np.array_equal(v.array.astype(np.int32), img.astype(np.int32))
    assert np.allclose(v.affine, aff, atol=1e-3)

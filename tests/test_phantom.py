"""Behaviour of the synthetic abdominal phantom (ccam.data.phantom) on small volumes."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ccam.data.phantom import CLASSES, make_phantom_cohort, make_phantom_volume

SMALL = (96, 96, 24)


def _canonical(image, mask, affine):
    ci = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
    cm = nib.as_closest_canonical(nib.Nifti1Image(mask, affine))
    return np.asanyarray(ci.dataobj), np.asanyarray(cm.dataobj), ci.affine


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_same_seed_same_arrays_different_seed_different(modality):
    a = make_phantom_volume(SMALL, modality=modality, seed=3)
    b = make_phantom_volume(SMALL, modality=modality, seed=3)
    c = make_phantom_volume(SMALL, modality=modality, seed=4)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert np.array_equal(a[2], b[2])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert a[0].dtype == (np.int16 if modality == "CT" else np.float32)
    assert a[1].dtype == np.uint8


def test_default_case_has_each_organ_as_one_plausible_component():
    image, mask, affine = make_phantom_volume()
    assert image.shape == mask.shape == (160, 160, 40)
    assert set(np.unique(mask)) == {0, 1, 2, 3, 4}
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    volume_ml = {name: (mask == k).sum() * voxel_ml for k, name in enumerate(CLASSES, start=1)}
    for k, name in enumerate(CLASSES, start=1):
        _, n = ndimage.label(mask == k)
        assert n == 1, f"{name} has {n} components"
    assert 700 < volume_ml["liver"] < 2500
    for name in ("right_kidney", "left_kidney", "spleen"):
        assert 50 < volume_ml[name] < 400, (name, volume_ml[name])
    # MR: positive intensities; organs brighter than the air outside the body
    assert image.min() >= 0 and image[mask == 1].mean() > 5 * image[:3, :3, :].mean()


def test_ct_intensities_are_hounsfield_like():
    image, mask, _ = make_phantom_volume(SMALL, modality="CT", seed=1)
    assert image.dtype == np.int16
    assert abs(np.median(image[:2, :2, :]) + 1000) < 60  # air outside the body
    assert 20 < np.median(image[mask == 1]) < 100  # liver
    kidney = np.median(image[(mask == 2) | (mask == 3)])
    assert kidney > np.median(image[mask == 1]) + 40  # contrast-enhanced kidneys
    assert image.max() > 500  # bone


@pytest.mark.parametrize("seed", [0, 5])
def test_storage_orientations_share_anatomy_and_laterality(seed):
    canon = {o: _canonical(*make_phantom_volume(SMALL, modality="CT", seed=seed, orientation=o))
             for o in ("RAS", "LPS", "SLICE_FIRST")}
    assert make_phantom_volume(SMALL, seed=seed, orientation="SLICE_FIRST")[0].shape == (24, 96, 96)
    ref_img, ref_mask, ref_aff = canon["RAS"]
    for o in ("LPS", "SLICE_FIRST"):
        img, mask, aff = canon[o]
        assert np.array_equal(img, ref_img) and np.array_equal(mask, ref_mask), o
        np.testing.assert_allclose(aff, ref_aff, atol=1e-6)
    # centre of the volume near the world origin
    centre = ref_aff @ np.r_[(np.array(ref_mask.shape) - 1) / 2.0, 1.0]
    assert np.abs(centre[:3]).max() < 1e-6
    # RAS canonical: +x is the patient's right; world x of each organ's centroid
    cx = {name: (ref_aff @ np.r_[ndimage.center_of_mass(ref_mask == k), 1.0])[0]
          for k, name in enumerate(CLASSES, start=1)}
    assert cx["liver"] > cx["spleen"] and cx["liver"] > 0 > cx["spleen"]
    assert cx["right_kidney"] > 0 > cx["left_kidney"]
    # organs sit in the posterior half except the liver; kidneys posterior to the liver
    cy = {name: ndimage.center_of_mass(ref_mask == k)[1] for k, name in enumerate(CLASSES, start=1)}
    assert cy["right_kidney"] < cy["liver"] and cy["left_kidney"] < cy["liver"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kidneys_and_liver_co_occur_in_axial_slices(seed):
    _, mask, _ = make_phantom_volume(SMALL, seed=seed)
    present = {k: (mask == k).any(axis=(0, 1)) for k in range(1, 5)}
    both = (present[2] & present[3]).sum()
    assert both >= 0.5 * max(present[2].sum(), present[3].sum())
    assert (present[1] & (present[2] | present[3])).sum() >= 2
    assert (present[1] & present[4]).sum() >= 2


def _slices_with(mask, value, axis):
    present = np.moveaxis(mask == value, axis, 0).reshape(mask.shape[axis], -1).any(axis=1)
    return set(np.flatnonzero(present).tolist())


def test_cohort_manifest_files_tags_and_splits(tmp_path):
    path = make_phantom_cohort(tmp_path / "cohort", n_cases=7, seed=2, modality="CT", shape=(64, 64, 16))
    manifest = json.loads(path.read_text())
    assert manifest["name"] == "phantom-CT-2" and manifest["modality"] == "CT"
    assert manifest["slice_axis"] == "axial" and manifest["classes"] == CLASSES
    assert manifest["tags_from_masks"] is False
    cases = manifest["cases"]
    assert [c["id"] for c in cases] == [f"case{i:03d}" for i in range(7)]
    assert {c["split"] for c in cases} == {"train", "val", "test"}
    shapes = set()
    for case in cases:
        assert set(case) == {"id", "image", "mask", "tags", "split"}
        img = nib.load(path.parent / case["image"])
        msk = nib.load(path.parent / case["mask"])
        assert img.header.get_data_dtype() == np.int16 and np.asanyarray(img.dataobj).dtype == np.int16
        assert img.shape == msk.shape and np.allclose(img.affine, msk.affine)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.header.get_zooms(), np.sqrt((img.affine[:3, :3] ** 2).sum(0)), rtol=1e-5)
        shapes.add(img.shape)
        mask = np.asanyarray(msk.dataobj)
        axis = int(np.argmax(np.abs(img.affine[2, :3])))  # the file's own axial axis
        for k, name in enumerate(CLASSES, start=1):
            expected = _slices_with(mask, k, axis)
            if not expected:
                assert name not in case["tags"]
                continue
            tagged = {s for a, b in case["tags"][name] for s in range(a, b + 1)}
            assert tagged == expected, (case["id"], name)
    assert len(shapes) > 1  # matrix size varies between cases
    # all three storages occur: SLICE_FIRST puts the 16ish slices first
    assert any(s[0] < s[2] for s in shapes) and any(s[0] > s[2] for s in shapes)


def test_cohort_is_reproducible_and_rejects_mixed_modality(tmp_path):
    a = make_phantom_cohort(tmp_path / "a", n_cases=2, seed=9, shape=(48, 48, 12))
    b = make_phantom_cohort(tmp_path / "b", n_cases=2, seed=9, shape=(48, 48, 12))
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ma["cases"] == mb["cases"] and all(c["split"] == "train" for c in ma["cases"])
    for c in ma["cases"]:
        xa = np.asanyarray(nib.load(a.parent / c["image"]).dataobj)
        xb = np.asanyarray(nib.load(b.parent / c["image"]).dataobj)
        assert xa.dtype == np.float32 and np.array_equal(xa, xb)
    with pytest.raises(ValueError):
        make_phantom_cohort(tmp_path / "c", n_cases=2, modality="mixed")

"""Reading CT in every supported format, with geometry, and refusing what is not a CT."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_CT, oblique_direction, shared, synthetic_ct
from dicom_series import write_ct_series
from LungNoduleAILib.imageio import read_ct, validate_ct


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_oblique_volume_world_coordinates_agree_across_formats(tmp_path, ext):
    img = synthetic_ct(direction=oblique_direction())
    path = tmp_path / f"oblique{ext}"
    sitk.WriteImage(img, str(path))
    ct = read_ct(path)
    assert ct.name == "oblique"
    assert ct.image.GetPixelID() == sitk.sitkInt16
    for index in [(0, 0, 0), (63, 0, 39), (10, 50, 20)]:
        expected = img.TransformIndexToPhysicalPoint(index)
        got = ct.image.TransformIndexToPhysicalPoint(index)
        # NIfTI stores the affine in float32: allow a few micrometres
        np.testing.assert_allclose(got, expected, atol=1e-3)
    np.testing.assert_allclose(sitk.GetArrayFromImage(ct.image), sitk.GetArrayFromImage(img), atol=0)


def test_padding_outside_field_of_view_is_air(tmp_path):
    img = synthetic_ct()
    arr = sitk.GetArrayFromImage(img)
    arr[:, :5, :] = -3024
    arr[:, -5:, :] = -2048
    padded = sitk.GetImageFromArray(arr)
    padded.CopyInformation(img)
    sitk.WriteImage(padded, str(tmp_path / "pad.nrrd"))
    out = sitk.GetArrayFromImage(read_ct(tmp_path / "pad.nrrd").image)
    assert out.min() >= -1024
    assert np.all(out[:, :5, :] == -1000)


def test_real_dicom_series_geometry_and_rescale():
    folder = shared("dicom", "ct-64")
    ct = read_ct(folder)
    assert ct.image.GetSize()[2] == 79
    assert ct.series_uid
    arr = sitk.GetArrayFromImage(ct.image)
    assert arr.min() >= -1024 and arr.max() > 100  # rescale slope/intercept applied: HU
    # geometry agrees with a direct GDCM read of the first file
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    first = sitk.ReadImage(files[0])
    np.testing.assert_allclose(ct.image.GetSpacing()[:2], first.GetSpacing()[:2])
    np.testing.assert_allclose(ct.image.GetOrigin(), first.GetOrigin(), atol=1e-3)


def test_dicom_folder_with_two_series_uses_the_largest(tmp_path):
    folder = shared("dicom", "ct-64")
    for f in folder.glob("*.dcm"):
        shutil.copy(f, tmp_path)
    # a second, smaller CT series written into the same folder
    small = write_ct_series(synthetic_ct(size_xyz=(32, 32, 20)), tmp_path)
    ct = read_ct(tmp_path)
    assert ct.image.GetSize()[2] == 79
    assert any("2 CT image stacks" in n and small["series_uid"] in n for n in ct.notes)


def test_sample_reads_as_ct():
    ct = read_ct(SAMPLE_CT)
    assert ct.image.GetSize() == (503, 376, 40)


def _img(arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sitk.Image(64, 64, sitk.sitkInt16), "2-D"),
        (lambda: _img(np.full((8, 64, 64), -1000, np.int16)), "fewer than 16"),
        (lambda: _img(np.full((20, 64, 64), -1000, np.int16), (1.0, 1.0, 1e-4)), "spacing"),
        (lambda: _img(np.full((20, 64, 64), -1000, np.int16), (1.0, 1.0, 55.0)), "spacing"),
        (lambda: _img(np.random.default_rng(0).integers(0, 1200, (20, 64, 64)).astype(np.int16)), "Hounsfield"),
        (lambda: _img(np.random.default_rng(0).integers(0, 255, (20, 64, 64)).astype(np.uint8)), "8-bit"),
        (lambda: _img(np.where(np.arange(20 * 64 * 64).reshape(20, 64, 64) % 7 == 0, np.nan, -500.0).astype(np.float32)), "NaN"),
        (lambda: sitk.Image([32, 32, 32], sitk.sitkVectorFloat32, 3), "components"),
    ],
)
def test_refusals_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        validate_ct(make(), "test")


def test_refuses_missing_path_unreadable_file_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_ct(tmp_path / "nope.nii.gz")
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read"):
        read_ct(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No DICOM series"):
        read_ct(tmp_path / "empty")


def test_mr_like_file_is_refused_on_read(tmp_path):
    img = _img(np.random.default_rng(1).integers(0, 3000, (24, 64, 64)).astype(np.int16))
    sitk.WriteImage(img, str(tmp_path / "mr.nrrd"))
    with pytest.raises(ValueError, match="do not look like CT"):
        read_ct(tmp_path / "mr.nrrd")

"""DICOM series input: choosing the CT among other objects, compression, missing slices, gantry tilt."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_CT, shared
from dicom_series import write_ct_series, write_localizer, write_secondary_capture, write_tilted_series
from LungNoduleAILib.imageio import read_ct


@pytest.fixture(scope="module")
def sample_image():
    return read_ct(SAMPLE_CT).image


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("compress", [None, "rle", "jpegls"])
def test_series_written_from_the_sample_reads_back_identically(tmp_path, sample_image, compress):
    info = write_ct_series(sample_image, tmp_path / "dcm", compress=compress)
    ct = read_ct(tmp_path / "dcm")
    _same_geometry(ct.image, sample_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct.image), sitk.GetArrayFromImage(sample_image))
    assert ct.series_uid == info["series_uid"]
    # slices sorted by position, not by (shuffled) file name; the instances are kept for export
    assert ct.dicom.sop_instance_uids == info["sop_uids"]
    assert ct.notes == []


def test_localizer_secondary_capture_and_other_files_are_set_aside_and_named(tmp_path, sample_image):
    info = write_ct_series(sample_image, tmp_path)
    write_localizer(tmp_path, info["series_uid"], info["study_uid"])
    write_secondary_capture(tmp_path, info["study_uid"])
    (tmp_path / "readme.txt").write_text("exported by PACS")
    ct = read_ct(tmp_path)
    assert ct.image.GetSize() == sample_image.GetSize()
    notes = " ".join(ct.notes)
    assert "localizer" in notes and "Secondary Capture" in notes and "not DICOM" in notes


def test_only_non_ct_objects_is_refused_with_what_was_found(tmp_path):
    write_secondary_capture(tmp_path, "1.2.3.4")
    with pytest.raises(ValueError, match=r"No DICOM series of CT images.*Secondary Capture"):
        read_ct(tmp_path)


def test_one_file_of_a_series_reads_that_series(tmp_path, sample_image):
    info = write_ct_series(sample_image, tmp_path / "a")
    other = write_ct_series(sample_image[:, :, :20], tmp_path / "a")  # a second, shorter series in the same folder
    ct = read_ct(other["files"][0])
    assert ct.series_uid == other["series_uid"] != info["series_uid"]
    assert ct.image.GetSize()[2] == 20


def test_missing_slices_are_interpolated_and_reported(tmp_path, sample_image):
    write_ct_series(sample_image, tmp_path, drop_slices=(10, 11))
    ct = read_ct(tmp_path)
    _same_geometry(ct.image, sample_image)
    got = sitk.GetArrayFromImage(ct.image).astype(np.float32)
    want = sitk.GetArrayFromImage(sample_image).astype(np.float32)
    np.testing.assert_array_equal(got[9], want[9])
    np.testing.assert_array_equal(got[12], want[12])
    # slice 10 lies a third of the way from slice 9 to slice 12
    np.testing.assert_allclose(got[10], np.round(want[9] * 2 / 3 + want[12] / 3), atol=1)
    assert any("2 missing slice" in n for n in ct.notes)


def test_a_gap_a_nodule_could_hide_in_is_refused(tmp_path, sample_image):
    write_ct_series(sample_image, tmp_path, drop_slices=(10, 11, 12, 13))  # 12.5 mm gap at 2.5 mm slices
    with pytest.raises(ValueError, match=r"gap of 12.5 mm.*Slices are missing"):
        read_ct(tmp_path)


def test_gantry_tilt_is_undone_so_a_sphere_lands_where_it_is(tmp_path):
    center = np.array([5.0, 8.0, 3.0])
    write_tilted_series(tmp_path, 20.0, tuple(center), 8.0)
    ct = read_ct(tmp_path)
    assert any("Gantry tilt of 20.0 degrees" in n for n in ct.notes)
    arr = sitk.GetArrayFromImage(ct.image)
    idx = np.argwhere(arr > 150)
    pts = np.array([ct.image.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in idx])
    np.testing.assert_allclose(pts.mean(0), center, atol=0.5)
    # read naively (stacked as if untilted) the centre would be off by several mm
    naive = sitk.ReadImage(sorted(str(p) for p in tmp_path.glob("*.dcm")))
    nidx = np.argwhere(sitk.GetArrayFromImage(naive) > 150)
    npts = np.array([naive.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in nidx])
    assert np.abs(npts.mean(0) - center).max() > 1.5


def test_real_series_copied_with_duplicates_keeps_one_slice_per_position(tmp_path):
    folder = shared("dicom", "ct-64")
    for f in folder.glob("*.dcm"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(folder / "IMG0010.dcm", tmp_path / "copy_of_10.dcm")
    ct = read_ct(tmp_path)
    assert ct.image.GetSize()[2] == 79
    assert any("repeat the position" in n for n in ct.notes)

"""Resampling geometry, intensity scaling, and the lung mask on real scans."""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk

from conftest import SAMPLE_CT, oblique_direction, shared, synthetic_ct
from LungNoduleAILib.imageio import read_ct
from LungNoduleAILib.preprocess import lung_crop, orient_lps, resample_to_spacing, scale_intensity, scale_intensity_uint8


def test_resample_keeps_world_extent_and_direction():
    img = sitk.Cast(synthetic_ct(spacing=(0.7, 0.7, 2.5), direction=oblique_direction()), sitk.sitkFloat32)
    out = resample_to_spacing(img, [1.0, 1.0, 1.0])
    assert out.GetSpacing() == (1.0, 1.0, 1.0)
    assert out.GetDirection() == img.GetDirection()
    assert out.GetSize() == (45, 45, 100)  # ceil(64*0.7), ceil(40*2.5)
    # the volume's outer corner stays in place (within half an output voxel)
    corner_in = np.array(img.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    corner_out = np.array(out.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    np.testing.assert_allclose(corner_in, corner_out, atol=1e-6)


def test_orient_lps_turns_flipped_axes_back():
    img = synthetic_ct(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-like axes
    out = orient_lps(img)
    np.testing.assert_allclose(out.GetDirection(), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # same world point, same value
    p = img.TransformIndexToPhysicalPoint((5, 7, 9))
    assert img[5, 7, 9] == out[out.TransformPhysicalPointToIndex(p)]


def test_scale_intensity():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    np.testing.assert_allclose(scale_intensity(hu, (-1000, 400)), [0, 0, 0.5, 1, 1])
    np.testing.assert_array_equal(scale_intensity_uint8(hu, (-1000, 400)), [0, 0, 128, 255, 255])
    from LungNoduleAILib.intensity import uint8_to_hu

    np.testing.assert_allclose(uint8_to_hu(np.array([0, 255], np.uint8), (-1000, 400)), [-1000.0, 400.0])
    levels = np.arange(256, dtype=np.uint8)  # back to HU and scaled again: every level unchanged
    np.testing.assert_array_equal(scale_intensity_uint8(uint8_to_hu(levels, (-1000, 400)), (-1000, 400)), levels)


def test_lung_crop_on_real_scan_contains_the_nodule():
    ct = read_ct(shared("scans", "LIDC-IDRI-0001.nii.gz"))
    res = resample_to_spacing(orient_lps(ct.image), [1.0, 1.0, 1.0])
    crop = lung_crop(res)
    assert crop.found
    size = np.array(list(reversed(res.GetSize())))
    box = np.array(crop.stop) - np.array(crop.start)
    assert np.all(box > 100) and np.prod(box) < 0.6 * np.prod(size)  # crops away air and body wall
    # lung volume is plausible for an adult (2-10 L)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(crop.mask)
    assert 2e6 < stats.GetPhysicalSize(1) < 1e7
    idx = res.TransformPhysicalPointToIndex((56.2, 86.3, -115.9))[::-1]
    assert all(a <= i < b for a, i, b in zip(crop.start, idx, crop.stop))


def test_lung_crop_on_bundled_sample():
    ct = read_ct(SAMPLE_CT)
    crop = lung_crop(resample_to_spacing(orient_lps(ct.image), [1.0, 1.0, 1.0]))
    assert crop.found


def test_lung_crop_falls_back_to_whole_volume_with_warning(caplog):
    img = sitk.Cast(synthetic_ct(), sitk.sitkFloat32)  # a phantom: no enclosed lung
    with caplog.at_level(logging.WARNING):
        crop = lung_crop(img)
    assert not crop.found
    assert crop.start == (0, 0, 0) and crop.stop == tuple(reversed(img.GetSize()))
    assert "No plausible lung" in caplog.text

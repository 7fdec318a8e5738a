"""Inputs that ITK reads wrong without a word: truncated, NaN, no spacing; and real CT without soft tissue (issue 24, part 3).

Every file is made from the bundled sample; each refusal is checked through the
command line too: exit status 1, the reason on stderr, nothing written.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk
from test_cli import run_cli

from conftest import SAMPLE_CT
from LungNoduleAILib.imageio import read_ct


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """The sample as uncompressed NIfTI, gzip NIfTI and float NIfTI."""
    d = tmp_path_factory.mktemp("inputs")
    img = sitk.ReadImage(str(SAMPLE_CT))
    sitk.WriteImage(img, str(d / "ct.nii"), useCompression=False)
    sitk.WriteImage(img, str(d / "ct.nii.gz"), useCompression=True)
    sitk.WriteImage(sitk.Cast(img, sitk.sitkFloat32), str(d / "float.nii"), useCompression=False)
    return d


def _truncate(src, dst, fraction=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _refused_by_cli(path, tmp_path, message):
    out = tmp_path / "out"
    proc = run_cli("detect", path, "--output-dir", out, "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_whole_files_read_as_before(sample_files):
    a = sitk.GetArrayFromImage(read_ct(sample_files / "ct.nii").image)
    b = sitk.GetArrayFromImage(read_ct(sample_files / "ct.nii.gz").image)
    np.testing.assert_array_equal(a, b)


def test_truncated_gzip_nifti_is_refused(sample_files, tmp_path):
    bad = _truncate(sample_files / "ct.nii.gz", tmp_path / "half.nii.gz")
    assert sitk.ReadImage(str(bad)).GetSize() == sitk.ReadImage(str(SAMPLE_CT)).GetSize()  # what ITK alone does: reads it, zeros filled in
    with pytest.raises(ValueError, match="truncated or damaged"):
        read_ct(bad)
    _refused_by_cli(bad, tmp_path, "half.nii.gz' is truncated")


def test_truncated_plain_nifti_is_refused_with_how_much_is_there(sample_files, tmp_path):
    bad = _truncate(sample_files / "ct.nii", tmp_path / "half.nii")
    with pytest.raises(ValueError, match=r"is truncated: its header announces 7565120 voxels .* \(50\.0 %\)"):
        read_ct(bad)
    one_slice_short = tmp_path / "short.nii"
    one_slice_short.write_bytes((sample_files / "ct.nii").read_bytes()[:-2])  # one voxel missing
    with pytest.raises(ValueError, match="truncated"):
        read_ct(one_slice_short)


def test_nan_voxels_are_refused_before_any_cast(sample_files, tmp_path):
    img = sitk.ReadImage(str(sample_files / "float.nii"))
    arr = sitk.GetArrayFromImage(img)
    arr[10, 100:105, 100:110] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(img)
    path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(nan_img, str(path))
    assert not np.isnan(sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))).any()  # ITK turns them into 0
    with pytest.raises(ValueError, match=r"contains NaN values \(50 voxels\)"):
        read_ct(path)
    _refused_by_cli(path, tmp_path, "NaN")
    read_ct(sample_files / "float.nii")  # a float CT without NaN is fine


def _patch_nifti(src, dst, offset, fmt, value):
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst


def test_zero_slice_spacing_without_sform_is_refused(sample_files, tmp_path):
    no_sform = _patch_nifti(sample_files / "ct.nii", tmp_path / "a.nii", 254, "<h", 0)  # sform_code = 0
    assert read_ct(no_sform).image.GetSpacing()[2] == pytest.approx(2.5)  # pixdim still there: read as before
    bad = _patch_nifti(no_sform, tmp_path / "zero.nii", 76 + 3 * 4, "<f", 0.0)  # pixdim[3] = 0
    assert sitk.ReadImage(str(bad)).GetSpacing()[2] == 1.0  # what ITK alone does
    with pytest.raises(ValueError, match=r"pixdim\[1..3\] = \[0.7031, 0.7031, 0.0\] mm\) is zero"):
        read_ct(bad)
    _refused_by_cli(bad, tmp_path, "voxel spacing")


def test_nrrd_without_spacing_is_refused(tmp_path):
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_CT)))
    path = tmp_path / "nospacing.nrrd"
    with open(path, "wb") as f:
        f.write(
            b"NRRD0004\ntype: short\ndimension: 3\n" + f"sizes: {arr.shape[2]} {arr.shape[1]} {arr.shape[0]}\n".encode() + b"endian: little\nencoding: raw\n\n"
        )
        f.write(arr.astype("<i2").tobytes())
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="NRRD header gives no voxel spacing"):
        read_ct(path)


def test_tight_lung_crop_is_real_ct(tmp_path):
    """Real CT that is lung only (no chest wall): air, lung and vessels, but under 1 % soft tissue."""
    img = read_ct(SAMPLE_CT).image
    crop = img[112:176, 144:208, 0:40]  # 45 mm inside the sample's right lung: lung and vessels
    arr = sitk.GetArrayViewFromImage(crop)
    assert (arr < -400).mean() > 0.95
    assert np.percentile(arr[::2, ::4, ::4], 99) < -200  # what the old rule refused as "not Hounsfield units"
    path = tmp_path / "lung_only.nrrd"
    sitk.WriteImage(crop, str(path))
    assert read_ct(path).image.GetSize() == (64, 64, 40)


@pytest.mark.parametrize("scale, offset", [(1 / 1000.0, 0.0), (1.0, 1024.0), (255 / 1400.0, 255 * 1000 / 1400)])
def test_rescaled_images_are_still_refused(tmp_path, scale, offset):
    img = read_ct(SAMPLE_CT).image
    arr = sitk.GetArrayFromImage(img).astype(np.float32) * scale + offset
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    path = tmp_path / "rescaled.nrrd"
    sitk.WriteImage(out, str(path))
    with pytest.raises(ValueError, match="do not look like CT Hounsfield units"):
        read_ct(path)

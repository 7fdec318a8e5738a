"""Synthetic follow-up scans made from real ones, with a known truth: move the body, change the slices, grow a nodule.

Used by ``Testing/test_compare.py`` and ``Testing/Scripts/make_followup.py``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


def grow_nodule(ct: sitk.Image, center_lps: Sequence[float], radius_mm: float, factor: float) -> sitk.Image:
    """``ct`` with the tissue within ``1.6 x radius`` of the centre scaled by ``factor`` about it (volume x factor³), blended smoothly into the rest."""
    scale = sitk.ScaleTransform(3, (1.0 / factor,) * 3)  # output point -> input point: content appears factor times larger
    scale.SetCenter([float(v) for v in center_lps])
    grown = sitk.Resample(ct, ct, scale, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    arr, big = sitk.GetArrayFromImage(ct).astype(np.float32), sitk.GetArrayFromImage(grown)
    ijk = np.indices(arr.shape)[::-1].reshape(3, -1).T.astype(np.float64)  # (i, j, k) of every voxel
    m = np.asarray(ct.GetDirection()).reshape(3, 3) * np.asarray(ct.GetSpacing())
    dist = np.linalg.norm(np.asarray(ct.GetOrigin()) + ijk @ m.T - np.asarray(center_lps), axis=1).reshape(arr.shape)
    inner, outer = 1.3 * radius_mm * factor, 1.6 * radius_mm * factor
    w = np.clip((outer - dist) / (outer - inner), 0.0, 1.0)
    out = sitk.GetImageFromArray(np.round(w * big + (1 - w) * arr).astype(np.int16))
    out.CopyInformation(ct)
    return out


def move_and_reslice(ct: sitk.Image, angle_deg: float, shift_mm: Sequence[float], spacing_mm: Sequence[float]) -> tuple[sitk.Image, sitk.Transform]:
    """The body moved rigidly (a rotation about the scan's z axis through its centre, then a shift) and resampled to other voxels.

    Returns:
        ``(moved CT, transform)``; the transform maps a point of the moved scan to the original one.
    """
    size = np.asarray(ct.GetSize())
    center = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in size])
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(center)
    rigid.SetRotation(0.0, 0.0, np.deg2rad(angle_deg))
    rigid.SetTranslation([float(v) for v in shift_mm])
    new_size = [int(round(n * s / t)) for n, s, t in zip(size, ct.GetSpacing(), spacing_mm)]
    ref = sitk.Image(new_size, sitk.sitkInt16)
    ref.SetSpacing([float(v) for v in spacing_mm])
    ref.SetOrigin(ct.GetOrigin())
    ref.SetDirection(ct.GetDirection())
    return sitk.Resample(ct, ref, rigid, sitk.sitkLinear, -1000.0, sitk.sitkInt16), rigid


def erase_nodule(ct: sitk.Image, center_lps: Sequence[float], radius_mm: float, seed: int = 0) -> sitk.Image:
    """``ct`` with the tissue within ``1.3 x radius`` of the centre replaced by lung (-850 HU with CT-like noise), blended in:
    the nodule is gone (a "resolved" nodule on the follow-up)."""
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    ijk = np.indices(arr.shape)[::-1].reshape(3, -1).T.astype(np.float64)
    m = np.asarray(ct.GetDirection()).reshape(3, 3) * np.asarray(ct.GetSpacing())
    dist = np.linalg.norm(np.asarray(ct.GetOrigin()) + ijk @ m.T - np.asarray(center_lps), axis=1).reshape(arr.shape)
    inner, outer = 1.3 * radius_mm, 1.6 * radius_mm
    w = np.clip((outer - dist) / (outer - inner), 0.0, 1.0)
    lung = -850.0 + np.random.default_rng(seed).normal(0.0, 30.0, arr.shape)
    out = sitk.GetImageFromArray(np.round(w * lung + (1 - w) * arr).astype(np.int16))
    out.CopyInformation(ct)
    return out

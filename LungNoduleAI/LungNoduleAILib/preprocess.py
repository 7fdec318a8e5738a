"""Preprocessing: orientation, resampling, intensity scaling, lung crop.

Arrays taken from SimpleITK images are indexed ``(z, y, x)`` i.e.
``(k, j, i)``; sizes and spacings given as SimpleITK lists are ``(x, y, z)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .intensity import scale_intensity, scale_intensity_uint8

__all__ = [
    "orient_lps",
    "resample_to_spacing",
    "resample_like",
    "scale_intensity",
    "scale_intensity_uint8",
    "compute_lung_mask",
    "LungCrop",
    "lung_crop",
]

log = logging.getLogger(__name__)


def orient_lps(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes so that the image axes point (nearly) along L, P, S.

    Oblique residual rotation is kept in the direction matrix; voxel values
    are not interpolated.
    """
    if sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "LPS":
        return image  # already so: no copy of a long CT
    return sitk.DICOMOrient(image, "LPS")


def resample_to_spacing(
    image: sitk.Image,
    spacing_mm: Sequence[float],
    interpolator: int = sitk.sitkLinear,
    default_value: float = -1000.0,
) -> sitk.Image:
    """Resample onto a grid with the given spacing covering the same extent.

    Args:
        image: input image (any orientation, geometry in LPS mm).
        spacing_mm: output spacing ``(x, y, z)`` in mm.
        interpolator: SimpleITK interpolator.
        default_value: value outside the input (HU for CT).

    Returns:
        Image with the same origin and direction, spacing ``spacing_mm`` and
        size ``ceil(size * old_spacing / spacing_mm)``.
    """
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    old_size = np.array(image.GetSize(), dtype=float)
    new_spacing = np.array(spacing_mm, dtype=float)
    new_size = [max(1, int(math.ceil(n))) for n in old_size * old_spacing / new_spacing]
    # Keep the centre of the first voxel's footprint aligned with the original extent.
    origin_shift_idx = (new_spacing / old_spacing - 1.0) / 2.0
    origin = image.TransformContinuousIndexToPhysicalPoint(origin_shift_idx.tolist())
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        interpolator,
        origin,
        new_spacing.tolist(),
        image.GetDirection(),
        default_value,
        image.GetPixelID(),
    )


def resample_like(image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkLinear, default_value: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference`` (physical space, LPS mm)."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default_value, image.GetPixelID())


def compute_lung_mask(image_hu: sitk.Image, work_spacing_mm: float = 2.0, closing_radius_mm: float = 10.0) -> sitk.Image | None:
    """A fast lung mask from thresholds and connected components (no network).

    Air (< -400 HU) that does not touch the left/right/anterior/posterior
    borders of the volume is lung or airway; the largest such components
    are kept, then closed with a ball of ``closing_radius_mm`` so that
    nodules and vessels inside the lung and nodules attached to the pleura
    are inside the mask, and holes are filled.

    Args:
        image_hu: CT in HU (any spacing; should be oriented LPS).
        work_spacing_mm: isotropic spacing the mask is computed at (coarser is faster).
        closing_radius_mm: radius of the morphological closing (mm).

    Returns:
        uint8 mask (1 = lung) on a ``work_spacing_mm`` grid covering the
        image, or ``None`` when nothing lung-like (0.3-15 L) is found.
    """
    small = resample_to_spacing(image_hu, [work_spacing_mm] * 3, sitk.sitkLinear, -1000.0)
    arr = sitk.GetArrayViewFromImage(small)
    air = arr < -400
    # Air outside the body: per axial slice, air components touching the slice
    # border. Interleaving empty slices makes 3-D face connectivity act per slice.
    nz = air.shape[0]
    stacked = np.zeros((2 * nz - 1,) + air.shape[1:], dtype=np.uint8)
    stacked[::2] = air
    lab2d = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(stacked), False))[::2]
    border = np.unique(np.concatenate([lab2d[:, 0, :].ravel(), lab2d[:, -1, :].ravel(), lab2d[:, :, 0].ravel(), lab2d[:, :, -1].ravel()]))
    inner = air & ~np.isin(lab2d, border)
    inner_img = sitk.GetImageFromArray(inner.astype(np.uint8))
    inner_img.CopyInformation(small)
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(inner_img, False))
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    voxel_ml = work_spacing_mm**3 / 1000.0
    order = np.argsort(counts)[::-1]
    keep = [int(lbl) for lbl in order[:2] if counts[lbl] * voxel_ml >= 50.0]
    if keep:
        # A second component much smaller than the first is bowel gas or similar, not a lung.
        keep = [k for k in keep if counts[k] >= 0.1 * counts[keep[0]]]
    total_ml = float(sum(counts[k] for k in keep) * voxel_ml)
    if not keep or not (300.0 <= total_ml <= 15000.0):
        log.info("No plausible lung found (%.0f mL of enclosed air).", total_ml)
        return None
    mask_arr = np.isin(lab, keep).astype(np.uint8)
    mask = sitk.GetImageFromArray(mask_arr)
    mask.CopyInformation(small)
    radius = max(1, int(round(closing_radius_mm / work_spacing_mm)))
    mask = sitk.BinaryMorphologicalClosing(mask, [radius] * 3, sitk.sitkBall)
    mask = sitk.BinaryFillhole(mask)
    return mask


@dataclass
class LungCrop:
    """Voxel box of an image that contains the lungs.

    Attributes:
        start: first voxel index ``(z, y, x)``.
        stop: one past the last voxel index ``(z, y, x)``.
        found: whether a lung was found (else the box is the whole image).
        mask: the lung mask (uint8, on its own coarse grid) or ``None``.
    """

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    found: bool
    mask: sitk.Image | None = None

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]


def lung_crop(image_hu: sitk.Image, margin_mm: float = 10.0, work_spacing_mm: float = 2.0) -> LungCrop:
    """Bounding box (with margin) of the lungs in ``image_hu``'s voxel grid.

    Falls back to the whole image (``found=False``, with a logged warning)
    when no plausible lung is found, e.g. a small crop or a phantom.
    """
    size_zyx = tuple(reversed(image_hu.GetSize()))
    mask = compute_lung_mask(image_hu, work_spacing_mm)
    if mask is None:
        log.warning("No plausible lung found: running on the whole volume (use --no-lung-mask to skip this search).")
        return LungCrop((0, 0, 0), size_zyx, False, None)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    corners = []
    for dx in (0, sx):
        for dy in (0, sy):
            for dz in (0, sz):
                pt = mask.TransformContinuousIndexToPhysicalPoint([x0 + dx - 0.5, y0 + dy - 0.5, z0 + dz - 0.5])
                corners.append(image_hu.TransformPhysicalPointToContinuousIndex(pt))
    corners_arr = np.array(corners)
    margin_vox = margin_mm / np.array(image_hu.GetSpacing())
    lo_xyz = np.floor(corners_arr.min(axis=0) - margin_vox).astype(int)
    hi_xyz = np.ceil(corners_arr.max(axis=0) + margin_vox).astype(int) + 1
    size_xyz = np.array(image_hu.GetSize())
    lo_xyz = np.clip(lo_xyz, 0, size_xyz)
    hi_xyz = np.clip(hi_xyz, 0, size_xyz)
    return LungCrop(tuple(int(v) for v in lo_xyz[::-1]), tuple(int(v) for v in hi_xyz[::-1]), True, mask)

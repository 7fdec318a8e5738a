"""The one place that converts between coordinate systems.

ITK/SimpleITK, NRRD, DICOM and LUNA16 use LPS world coordinates (mm);
3D Slicer's scene uses RAS. The two differ by the sign of x and y.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["lps_to_ras", "ras_to_lps", "index_to_lps", "lps_to_index"]

_FLIP = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(point_mm: Sequence[float]) -> list[float]:
    """Convert a point (or an (N, 3) array of points) from LPS mm to RAS mm."""
    return (np.asarray(point_mm, dtype=float) * _FLIP).tolist()


def ras_to_lps(point_mm: Sequence[float]) -> list[float]:
    """Convert a point (or an (N, 3) array of points) from RAS mm to LPS mm."""
    return (np.asarray(point_mm, dtype=float) * _FLIP).tolist()


def index_to_lps(image, index_ijk: Sequence[float]) -> list[float]:
    """World LPS mm of a (continuous) voxel index ``(i, j, k)`` of a SimpleITK image."""
    return list(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_ijk]))


def lps_to_index(image, point_lps_mm: Sequence[float]) -> list[float]:
    """Continuous voxel index ``(i, j, k)`` of an LPS mm point in a SimpleITK image."""
    return list(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps_mm]))

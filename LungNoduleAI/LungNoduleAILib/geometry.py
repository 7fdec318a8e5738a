"""The one place that converts between coordinate systems.

ITK/SimpleITK, NRRD, DICOM and LUNA16 use LPS world coordinates (mm);
3D Slicer's scene uses RAS. The two differ by the sign of x and y.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["lps_to_ras", "ras_to_lps", "index_to_lps", "lps_to_index", "ijk_to_ras_matrix", "ijk_to_lps_matrix", "geometry_from_ijk_to_ras"]

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


def ijk_to_ras_matrix(image) -> np.ndarray:
    """4x4 IJK->RAS matrix (Slicer's ``IJKToRASMatrix``) of a SimpleITK image (LPS geometry)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=float)
    m = np.eye(4)
    m[:3, :3] = (direction * spacing[None, :]) * _FLIP[:, None]
    m[:3, 3] = np.array(image.GetOrigin(), dtype=float) * _FLIP
    return m


def ijk_to_lps_matrix(ijk_to_ras) -> np.ndarray:
    """4x4 IJK->LPS matrix of a 4x4 IJK->RAS matrix (a Slicer volume's or a segment labelmap's image-to-world)."""
    m = np.array(ijk_to_ras, dtype=float).reshape(4, 4)
    m[:3, :] *= _FLIP[:, None]
    return m


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """``(origin_lps_mm, spacing_mm, direction_lps)`` of a 4x4 IJK->RAS matrix, for SimpleITK.

    ``direction_lps`` is the row-major 3x3 direction-cosine matrix (columns = axes).
    """
    m = np.asarray(matrix, dtype=float).reshape(4, 4)
    axes_lps = m[:3, :3] * _FLIP[:, None]
    spacing = np.linalg.norm(axes_lps, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"IJK->RAS matrix has a zero-length axis (spacing {spacing.tolist()} mm).")
    direction = axes_lps / spacing[None, :]
    origin = m[:3, 3] * _FLIP
    return origin.tolist(), spacing.tolist(), direction.ravel().tolist()

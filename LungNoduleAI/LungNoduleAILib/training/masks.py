"""Shapes on voxel grids that data preparation, patch drawing and validation share: balls, soft masks, thick tissue, components."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def soft_mask(mask: np.ndarray) -> np.ndarray:
    """A binary mask blurred (Gaussian, 1 voxel; it reaches 4 voxels past the mask) and raised so that it is about 1 inside: float32 in [0, 1], how much
    of a nodule shows at each voxel when it is pasted or faded.
    """
    return np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 1.0, mode="constant") * 1.6, 0, 1)


def ball(radius: int) -> np.ndarray:
    """Ball structuring element of ``radius`` voxels (the same voxels as ITK's flat ball kernel)."""
    r = np.arange(-radius, radius + 1)
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    return np.sqrt(x * x + y * y + z * z) <= radius + 0.5


def thick_tissue(vol_u8: np.ndarray, lung_max_u8: int) -> np.ndarray:
    """Chest wall, mediastinum and diaphragm of a uint8 patch: soft tissue (above the lung's upper bound) that survives an opening with a 3-voxel ball,
    which vessels do not.
    """
    return ndimage.binary_opening(vol_u8 > lung_max_u8, ball(3))


def components(binary: np.ndarray, min_voxels: int) -> list[tuple[np.ndarray, tuple]]:
    """Face-connected components of ``binary`` with at least ``min_voxels`` voxels: ``(centroid (z, y, x) voxels, voxel indices)``."""
    lab, n = ndimage.label(binary)
    out = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        voxels = np.nonzero(lab[sl] == k)
        if len(voxels[0]) < min_voxels:
            continue
        voxels = tuple(v + s.start for v, s in zip(voxels, sl))
        out.append((np.array([v.mean() for v in voxels]), voxels))
    return out

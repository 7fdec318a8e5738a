"""From candidate to reportable finding: nodule type, guideline diameters, solid component, Lung-RADS v2022 category, Brock risk.

Everything here works on one candidate's own voxels (a boolean mask and the CT's HU values
in its bounding box) or on plain numbers, with no network: it is what a reader would measure,
made repeatable.

Sources:

* ACR Lung-RADS v2022 (American College of Radiology, released November 2022; summarised in
  Christensen J et al., "ACR Lung-RADS v2022: Assessment Categories and Management
  Recommendations", Chest 2024;165(3):738-753): nodule size is the **mean diameter**, the mean
  of the long axis and the perpendicular short axis measured on the same image, each to one
  decimal (mm), in any plane that shows the nodule's true size; the baseline categories used
  in :func:`lung_rads_category`.
* Brock (PanCan) full model with spiculation: McWilliams A et al., "Probability of cancer in
  pulmonary nodules detected on first screening CT", N Engl J Med 2013;369:910-919,
  supplementary appendix, model 2b (:func:`brock_risk`).
* The type rule (:func:`nodule_type`) was chosen on the LIDC readers' texture and
  calcification ratings of the 689 matched training cubes, on the detector's own candidates,
  by 5-fold cross-validation by series: the thresholds below are the ones four or five of the
  five folds chose (``Testing/Scripts/characterisation_agreement.py``; figures in the README).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "SOLID_HU",
    "GROUND_GLASS_P90_HU",
    "PART_SOLID_MAX_SOLID_FRACTION",
    "CALCIUM_HU",
    "CALCIFIED_MIN_FRACTION",
    "NODULE_TYPES",
    "LUNG_RADS_CATEGORIES",
    "nodule_type",
    "axes_mm",
    "mean_diameter_mm",
    "solid_component",
    "characterise",
    "lung_rads_category",
    "brock_risk",
]

SOLID_HU = -300.0
"""Voxels at or above this are solid tissue (the solid component of a part-solid nodule)."""
GROUND_GLASS_P90_HU = -370.0
"""A nodule whose densest tenth of voxels (90th percentile) stays below this is ground glass throughout: non-solid."""
PART_SOLID_MAX_SOLID_FRACTION = 0.07
"""A nodule with some denser tissue but less than this fraction of its voxels at or above :data:`SOLID_HU` is part-solid."""
CALCIUM_HU = 200.0
CALCIFIED_MIN_FRACTION = 0.075
"""At least this fraction of the nodule's voxels at or above :data:`CALCIUM_HU`: calcified (a benign pattern; Lung-RADS 1)."""

NODULE_TYPES = ("solid", "part-solid", "non-solid", "calcified")
LUNG_RADS_CATEGORIES = ("1", "2", "3", "4A", "4B")


def nodule_type(hu: np.ndarray) -> str:
    """The nodule's type from the HU values of its own voxels.

    In order: ``calcified`` when at least :data:`CALCIFIED_MIN_FRACTION` of the voxels reach
    :data:`CALCIUM_HU`; ``non-solid`` when the 90th percentile stays below
    :data:`GROUND_GLASS_P90_HU`; ``part-solid`` when fewer than
    :data:`PART_SOLID_MAX_SOLID_FRACTION` of the voxels reach :data:`SOLID_HU`; else ``solid``.

    Args:
        hu: HU values of the nodule's voxels (any shape).

    Raises:
        ValueError: no voxels.
    """
    v = np.asarray(hu, dtype=np.float32).ravel()
    if v.size == 0:
        raise ValueError("nodule_type needs the HU values of at least one voxel; the mask is empty.")
    if float((v >= CALCIUM_HU).mean()) >= CALCIFIED_MIN_FRACTION:
        return "calcified"
    if float(np.percentile(v, 90)) < GROUND_GLASS_P90_HU:
        return "non-solid"
    if float((v >= SOLID_HU).mean()) < PART_SOLID_MAX_SOLID_FRACTION:
        return "part-solid"
    return "solid"


def _axes_2d(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Long axis (longest chord between pixel-centre pairs, plus the pixel extent along it) and the
    perpendicular extent (short axis) of a 2-D mask, in mm. ``spacing``: (row, column) mm."""
    pts = np.argwhere(mask).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    if len(pts) == 1:
        return float(min(spacing)), float(min(spacing))
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    edge = np.argwhere(mask & ~inner).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    if len(edge) > 300:
        edge = edge[:: int(math.ceil(len(edge) / 300))]
    d = ((edge[:, None, :] - edge[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmax(d), d.shape)
    vec = edge[j] - edge[i]
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        return float(min(spacing)), float(min(spacing))
    u = vec / norm
    perp = np.array([-u[1], u[0]])
    across = pts @ perp
    extent = np.abs(u) @ np.asarray(spacing)  # a pixel's extent along the long axis
    extent_perp = np.abs(perp) @ np.asarray(spacing)
    return norm + float(extent), float(across.max() - across.min()) + float(extent_perp)


def axes_mm(mask_zyx: np.ndarray, spacing_xyz: Sequence[float]) -> tuple[float, float]:
    """Long and short axis (mm) of a nodule, measured as Lung-RADS v2022 asks: on the one image
    (an axial, coronal or sagittal slice) where the long axis is longest, the short axis
    perpendicular to it on that same image.

    Args:
        mask_zyx: boolean mask ``(z, y, x)`` (e.g. cropped to the nodule's box).
        spacing_xyz: voxel spacing ``(x, y, z)`` mm.

    Returns:
        ``(long_axis_mm, short_axis_mm)``; ``(0, 0)`` for an empty mask.
    """
    mask = np.asarray(mask_zyx, dtype=bool)
    if not mask.any():
        return 0.0, 0.0
    sx, sy, sz = (float(v) for v in spacing_xyz)
    best = (0.0, 0.0)
    for axis, spacing in ((0, (sy, sx)), (1, (sz, sx)), (2, (sz, sy))):  # axial, coronal, sagittal slices
        for k in np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))):
            sl = np.take(mask, k, axis=axis)
            long_axis, short_axis = _axes_2d(sl, spacing)
            short_axis = min(short_axis, long_axis)
            if long_axis > best[0] + 1e-6 or (abs(long_axis - best[0]) <= 1e-6 and short_axis > best[1]):  # a tie: the image where it looks larger
                best = (long_axis, short_axis)
    return best


def mean_diameter_mm(long_axis_mm: float, short_axis_mm: float) -> float:
    """Lung-RADS v2022 nodule size: each axis to one decimal, their mean to one decimal (mm)."""
    return round((round(long_axis_mm, 1) + round(short_axis_mm, 1)) / 2.0 + 1e-9, 1)


def solid_component(mask_zyx: np.ndarray, hu_zyx: np.ndarray, spacing_xyz: Sequence[float]) -> tuple[float, float]:
    """The solid part of a nodule: its voxels at or above :data:`SOLID_HU`, largest connected piece.

    Returns:
        ``(mean_diameter_mm, volume_mm3)`` of that piece (Lung-RADS mean diameter); ``(0, 0)`` when there is none.
    """
    from scipy import ndimage

    solid = np.asarray(mask_zyx, dtype=bool) & (np.asarray(hu_zyx) >= SOLID_HU)
    if not solid.any():
        return 0.0, 0.0
    lab, n = ndimage.label(solid)
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        solid = lab == (1 + int(np.argmax(sizes)))
    long_axis, short_axis = axes_mm(solid, spacing_xyz)
    return mean_diameter_mm(long_axis, short_axis), round(float(solid.sum()) * float(np.prod(spacing_xyz)), 1)


def characterise(mask_zyx: np.ndarray, hu_zyx: np.ndarray, spacing_xyz: Sequence[float]) -> dict:
    """Type, guideline diameters, solid component and baseline Lung-RADS category of one nodule.

    Args:
        mask_zyx: boolean mask of the nodule ``(z, y, x)``.
        hu_zyx: CT values (HU) on the same voxels.
        spacing_xyz: voxel spacing ``(x, y, z)`` mm.

    Returns:
        The JSON contract's fields: ``type``, ``long_axis_mm``, ``short_axis_mm``, ``mean_diameter_mm``,
        ``solid_component_mean_diameter_mm``, ``solid_component_volume_mm3``, ``lung_rads``.
    """
    mask = np.asarray(mask_zyx, dtype=bool)
    kind = nodule_type(np.asarray(hu_zyx)[mask])
    long_axis, short_axis = axes_mm(mask, spacing_xyz)
    mean_d = mean_diameter_mm(long_axis, short_axis)
    volume = round(float(mask.sum()) * float(np.prod(spacing_xyz)), 1)
    if kind == "non-solid":
        solid_d, solid_v = 0.0, 0.0
    elif kind == "part-solid":
        solid_d, solid_v = solid_component(mask, hu_zyx, spacing_xyz)
    else:  # solid (and calcified): the whole nodule
        solid_d, solid_v = mean_d, volume
    return {
        "type": kind,
        "long_axis_mm": round(long_axis, 1),
        "short_axis_mm": round(short_axis, 1),
        "mean_diameter_mm": mean_d,
        "solid_component_mean_diameter_mm": solid_d,
        "solid_component_volume_mm3": solid_v,
        "lung_rads": lung_rads_category(kind, mean_d, solid_d),
    }


def lung_rads_category(kind: str, mean_diameter: float, solid_mean_diameter: float = 0.0) -> str:
    """The ACR Lung-RADS v2022 category one nodule suggests on a **baseline** screening CT.

    The v2022 assessment categories (baseline rows):

    * 1: nodules with specific calcifications (complete, central, popcorn, concentric rings) or fat;
    * 2: solid < 6 mm; part-solid < 6 mm total mean diameter; non-solid (GGN) < 30 mm;
    * 3: solid >= 6 to < 8 mm; part-solid >= 6 mm total with solid component < 6 mm; non-solid >= 30 mm;
    * 4A: solid >= 8 to < 15 mm; part-solid with solid component >= 6 to < 8 mm;
    * 4B: solid >= 15 mm; part-solid with solid component >= 8 mm.

    What the reader adds (0, 4X, S, juxtapleural and perifissural category 2, growth and new
    nodules on a follow-up, airway nodules, cysts) is the reader's to set.

    Args:
        kind: one of :data:`NODULE_TYPES`.
        mean_diameter: the nodule's mean diameter (mm, one decimal).
        solid_mean_diameter: the solid component's mean diameter (mm; part-solid only).

    Raises:
        ValueError: an unknown type or a negative size.
    """
    if kind not in NODULE_TYPES:
        raise ValueError(f"Unknown nodule type '{kind}': use one of {', '.join(NODULE_TYPES)}.")
    if mean_diameter < 0 or solid_mean_diameter < 0:
        raise ValueError(f"Diameters must be >= 0 mm, got {mean_diameter} and {solid_mean_diameter}.")
    if kind == "calcified":
        return "1"
    if kind == "non-solid":
        return "2" if mean_diameter < 30.0 else "3"
    if kind == "part-solid":
        if mean_diameter < 6.0:
            return "2"
        if solid_mean_diameter < 6.0:
            return "3"
        return "4A" if solid_mean_diameter < 8.0 else "4B"
    if mean_diameter < 6.0:
        return "2"
    if mean_diameter < 8.0:
        return "3"
    return "4A" if mean_diameter < 15.0 else "4B"


BROCK_COEFFICIENTS = {
    "intercept": -6.7892,
    "age": 0.0287,  # per year, centred at 62
    "female": 0.6011,
    "family_history": 0.2961,
    "emphysema": 0.2953,
    "size": -5.3854,  # times ((size / 10) ** -0.5 - 1.58113883), size in mm
    "part_solid": 0.377,
    "non_solid": -0.1276,
    "upper_lobe": 0.6581,
    "nodule_count": -0.0824,  # per nodule, centred at 4
    "spiculation": 0.7729,
}
"""McWilliams et al. 2013, full model with spiculation (model 2b)."""


def brock_risk(
    size_mm: float,
    kind: str,
    age: float | None,
    female: bool | None,
    family_history: bool = False,
    emphysema: bool = False,
    upper_lobe: bool = False,
    nodule_count: int = 1,
    spiculation: bool = False,
) -> float | None:
    """Probability of malignancy (0-1) from the Brock (PanCan) full model with spiculation.

    ``None`` when age or sex is unknown: never guessed. A calcified nodule is benign by pattern
    (Lung-RADS 1); the model was not made for it, so it gets ``None`` too.

    Args:
        size_mm: nodule size (mm; the mean diameter).
        kind: one of :data:`NODULE_TYPES`.
        age: years.
        female: sex.
        family_history: a first-degree relative with lung cancer.
        emphysema: emphysema on the CT.
        upper_lobe: the nodule lies in an upper lobe.
        nodule_count: nodules on the CT (the model centres it at 4).
        spiculation: the nodule is spiculated.
    """
    if age is None or female is None or kind == "calcified":
        return None
    if size_mm <= 0:
        raise ValueError(f"Brock risk needs a nodule size > 0 mm, got {size_mm}.")
    c = BROCK_COEFFICIENTS
    logit = (
        c["intercept"]
        + c["age"] * (age - 62.0)
        + c["female"] * float(female)
        + c["family_history"] * float(family_history)
        + c["emphysema"] * float(emphysema)
        + c["size"] * ((size_mm / 10.0) ** -0.5 - 1.58113883)
        + c["part_solid"] * float(kind == "part-solid")
        + c["non_solid"] * float(kind == "non-solid")
        + c["upper_lobe"] * float(upper_lobe)
        + c["nodule_count"] * (nodule_count - 4)
        + c["spiculation"] * float(spiculation)
    )
    return 1.0 / (1.0 + math.exp(-logit))

"""From a probability map to ranked nodule candidates with measurements."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Collection, Sequence

import numpy as np
import SimpleITK as sitk

from .characterise import characterise
from .geometry import lps_to_ras

__all__ = [
    "Candidate",
    "extract_candidates",
    "find_candidates",
    "split_at_necks",
    "measure_candidates",
    "longest_axial_diameter_mm",
    "restrict_to_lung",
    "relabel",
]


@dataclass
class Candidate:
    """One nodule candidate.

    Attributes:
        id: label value in the candidates labelmap (= rank).
        rank: 1 = most probable.
        probability: the candidate's peak probability (0-1): from
            :func:`extract_candidates`, the highest value that a core of the
            smallest candidate volume reaches (the n-th highest voxel, n voxels
            making ``min_volume_mm3``), so that a run at a threshold keeps
            the candidates that a run at a lower one lists at or above it.
        probability_mean: mean probability inside the candidate (0-1).
        center_lps_mm: centroid in world LPS mm ``[x, y, z]``.
        center_ras_mm: centroid in world RAS mm ``[x, y, z]`` (Slicer).
        center_ijk: centroid as continuous voxel index ``[i, j, k]`` of the CT.
        bbox_ijk: voxel bounding box ``[i0, j0, k0, i1, j1, k1]`` (inclusive) on the CT grid.
        volume_mm3: volume (mm³).
        diameter_mm: equivalent-sphere diameter ``(6 V / pi)^(1/3)`` (mm).
        longest_axial_diameter_mm: longest in-plane diameter over the CT's slices (mm).
        mean_hu: mean CT value inside the candidate (HU).
        voxels: number of CT voxels.
        score: second-stage (candidate-level) score 0-1 when the model has a rescorer, else ``None``.
        type: ``solid``, ``part-solid``, ``non-solid`` or ``calcified`` (:func:`.characterise.nodule_type`).
        long_axis_mm, short_axis_mm: Lung-RADS v2022 axes on the image where the nodule is longest (mm, one decimal).
        mean_diameter_mm: their mean, one decimal (the Lung-RADS size).
        solid_component_mean_diameter_mm, solid_component_volume_mm3: the solid part's size (mm) and volume (mm³).
        lung_rads: the v2022 baseline category this nodule alone suggests (``"1"`` ... ``"4B"``).
        location: ``{"side", "zone"}`` from the lung mask (thirds of the lung's height), ``None`` without one.
        pleural_distance_mm: centre to pleura (mm), ``None`` without a lung mask.
        brock_risk: Brock (PanCan) probability of malignancy, ``None`` when age or sex is unknown.
    """

    id: int
    rank: int
    probability: float
    probability_mean: float
    center_lps_mm: list
    center_ras_mm: list
    center_ijk: list
    bbox_ijk: list
    volume_mm3: float
    diameter_mm: float
    longest_axial_diameter_mm: float
    mean_hu: float
    voxels: int
    score: float | None = None
    type: str | None = None
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    mean_diameter_mm: float | None = None
    solid_component_mean_diameter_mm: float | None = None
    solid_component_volume_mm3: float | None = None
    lung_rads: str | None = None
    location: dict | None = None
    pleural_distance_mm: float | None = None
    brock_risk: float | None = None

    @classmethod
    def from_dict(cls, record: dict) -> "Candidate":
        """A candidate from its JSON record (:meth:`to_dict`, a ``_nodules.json`` entry); other keys are ignored."""
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})

    def to_dict(self) -> dict:
        return asdict(self)


def longest_axial_diameter_mm(mask_zyx: np.ndarray, spacing_xy_mm: Sequence[float]) -> float:
    """Longest distance between two voxel centres of the same slice (mm), over all slices.

    Voxel extent is accounted for by measuring between outer voxel corners of
    the extreme voxels along the found direction (adds one voxel width).

    Args:
        mask_zyx: binary mask ``(z, y, x)``.
        spacing_xy_mm: in-plane spacing ``(x, y)`` mm.
    """
    sx, sy = float(spacing_xy_mm[0]), float(spacing_xy_mm[1])
    best = 0.0
    for z in np.flatnonzero(mask_zyx.any(axis=(1, 2))):
        sl = mask_zyx[z]
        # boundary pixels only: the farthest pair lies on the boundary
        inner = np.zeros_like(sl)
        inner[1:-1, 1:-1] = sl[1:-1, 1:-1] & sl[:-2, 1:-1] & sl[2:, 1:-1] & sl[1:-1, :-2] & sl[1:-1, 2:]
        pts = np.argwhere(sl & ~inner).astype(np.float64)
        if len(pts) > 400:
            pts = pts[:: int(math.ceil(len(pts) / 400))]
        xy = np.stack([pts[:, 1] * sx, pts[:, 0] * sy], axis=1)
        d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
        i, j = np.unravel_index(np.argmax(d), d.shape)
        vec = xy[j] - xy[i]
        norm = float(np.linalg.norm(vec))
        if norm == 0:
            extent = min(sx, sy)
        else:
            u = np.abs(vec / norm)
            extent = norm + u[0] * sx + u[1] * sy
        best = max(best, extent)
    return float(best)


def measure_candidates(
    labelmap: sitk.Image,
    ct_hu: sitk.Image,
    probability: sitk.Image | None = None,
    labels: Collection[int] | None = None,
    peak_voxels: int = 1,
) -> list[Candidate]:
    """Measure every label of ``labelmap`` (on the CT grid).

    Args:
        labelmap: integer image, label i = candidate i, same grid as ``ct_hu``.
        ct_hu: CT in HU.
        probability: float probabilities on the same grid (optional: without
            it the probabilities are reported as 0).
        labels: measure only these labels (``None``: all); the others cost
            nothing (the per-slice diameter is the costly part).
        peak_voxels: a candidate's probability is the ``peak_voxels``-th
            highest probability among its voxels (1: the maximum).

    Returns:
        Candidates in label order (``id`` = label, ``rank`` = label).
    """
    lab = sitk.Cast(labelmap, sitk.sitkUInt32)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(lab)
    voxel_mm3 = float(np.prod(ct_hu.GetSpacing()))
    lab_arr = sitk.GetArrayViewFromImage(lab)
    hu_arr = sitk.GetArrayViewFromImage(ct_hu)
    p_arr = sitk.GetArrayViewFromImage(probability) if probability is not None else None
    out = []
    for lbl in shape.GetLabels():
        if labels is not None and lbl not in labels:
            continue
        n = int(shape.GetNumberOfPixels(lbl))
        x0, y0, z0, sx, sy, sz = shape.GetBoundingBox(lbl)
        box = (slice(z0, z0 + sz), slice(y0, y0 + sy), slice(x0, x0 + sx))  # HU and p statistics on the label's box, not the whole grid
        centre_lps = list(shape.GetCentroid(lbl))
        crop = np.asarray(lab_arr[box]) == lbl
        hu_box = np.asarray(hu_arr[box])
        vol = n * voxel_mm3
        peak = mean_p = 0.0
        if p_arr is not None:
            inside = np.asarray(p_arr[box])[crop]
            k = min(peak_voxels, inside.size)
            peak = float(np.partition(inside, inside.size - k)[inside.size - k])
            mean_p = float(inside.mean(dtype=np.float64))
        out.append(
            Candidate(
                id=int(lbl),
                rank=int(lbl),
                probability=peak,
                probability_mean=mean_p,
                center_lps_mm=[round(v, 3) for v in centre_lps],
                center_ras_mm=[round(v, 3) for v in lps_to_ras(centre_lps)],
                center_ijk=[round(v, 3) for v in ct_hu.TransformPhysicalPointToContinuousIndex(centre_lps)],
                bbox_ijk=[x0, y0, z0, x0 + sx - 1, y0 + sy - 1, z0 + sz - 1],
                volume_mm3=round(vol, 3),
                diameter_mm=round((6.0 * vol / math.pi) ** (1.0 / 3.0), 3),
                longest_axial_diameter_mm=round(longest_axial_diameter_mm(crop, ct_hu.GetSpacing()[:2]), 3),
                mean_hu=round(float(hu_box[crop].mean(dtype=np.float64)), 1),
                voxels=n,
                **characterise(crop, hu_box, ct_hu.GetSpacing()),
            )
        )
    return out


def extract_candidates(
    probability: sitk.Image,
    ct_hu: sitk.Image,
    threshold: float,
    min_volume_mm3: float = 0.0,
    max_candidates: int = 200,
    segment_threshold: float | None = None,
    split_depth_mm: float | None = None,
) -> tuple[sitk.Image, list[Candidate]]:
    """Threshold, split into 3-D connected components and rank them.

    Args:
        probability: float probabilities (0-1) on the CT grid.
        ct_hu: CT in HU (for mean HU and geometry).
        threshold: probability threshold (0-1): a candidate is a connected
            component of ``p >= threshold`` of at least ``min_volume_mm3``.
        min_volume_mm3: components (of ``p >= threshold``) smaller than this are dropped.
        max_candidates: keep at most this many (the most probable).
        segment_threshold: when given and lower than ``threshold``, each
            candidate's voxels (and so its measurements and centre) are its
            connected region of ``p >= segment_threshold``, the nodule's extent
            as the network draws it, rather than the core above ``threshold``.
            Which candidates exist is still decided at ``threshold``; a region
            holding several cores is one candidate.
        split_depth_mm: when given, candidate regions (under
            :data:`SPLIT_MAX_DIAMETER_MM`) made of blobs joined by a neck at
            least this much thinner (mm of depth) are split, one candidate
            per blob holding its own ``min_volume_mm3`` above ``threshold``
            (:func:`split_at_necks`): a small nodule touching a vessel gets its
            own centre instead of one between the two.

    Returns:
        ``(labelmap, candidates)``: uint16 labelmap on the CT grid with label
        i = candidate of rank i, and the candidates sorted by probability
        (highest first). A candidate's probability is the ``n``-th highest
        probability in it, ``n`` voxels making ``min_volume_mm3``: a lone
        voxel above the rest scores no candidate higher than the threshold
        that keeps it.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"Threshold {threshold} is outside (0, 1); give a probability such as 0.5.")
    components = sitk.ConnectedComponent(sitk.BinaryThreshold(probability, float(threshold), 1e9, 1, 0), True)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(components)
    voxel_mm3 = float(np.prod(probability.GetSpacing()))
    min_voxels = max(1, math.ceil(min_volume_mm3 / voxel_mm3 - 1e-9))  # the smallest core that makes a candidate
    kept = {int(lbl) for lbl in shape.GetLabels() if shape.GetNumberOfPixels(lbl) >= min_voxels}
    if segment_threshold is not None and segment_threshold < threshold:
        regions = sitk.ConnectedComponent(sitk.BinaryThreshold(probability, float(segment_threshold), 1e9, 1, 0), True)
        core_arr, region_arr = sitk.GetArrayViewFromImage(components), sitk.GetArrayViewFromImage(regions)
        cores, kept = kept, set()  # the regions that hold a core of at least min_volume_mm3
        for lbl in cores:
            x0, y0, z0, sx, sy, sz = shape.GetBoundingBox(lbl)
            box = (slice(z0, z0 + sz), slice(y0, y0 + sy), slice(x0, x0 + sx))
            kept.add(int(region_arr[box][core_arr[box] == lbl][0]))
        components = regions
    if split_depth_mm:
        components, kept = split_at_necks(components, kept, probability, threshold, min_volume_mm3, split_depth_mm)
    raw = measure_candidates(components, ct_hu, probability, labels=kept, peak_voxels=min_voxels)  # scored by that core
    raw.sort(key=lambda c: (-c.probability, -c.volume_mm3))
    raw = raw[:max_candidates]
    labelmap = relabel(components, raw)
    return labelmap, raw


SPLIT_MAX_DIAMETER_MM = 10.0
"""Regions of at least this equivalent diameter (mm) are never split: a nodule of 10 mm or more, or a mass, stays one candidate."""


def split_at_necks(
    labelmap: sitk.Image, labels: Collection[int], probability: sitk.Image, threshold: float, min_volume_mm3: float, depth_mm: float
) -> tuple[sitk.Image, set]:
    """Split candidate regions that are blobs joined by a neck (a small nodule touching a vessel or another blob).

    In each region the distance to its border (mm) is flooded from its maxima
    that stand at least ``depth_mm`` above the neck towards a higher one
    (h-maxima); a part becomes a candidate of its own when it holds at least
    ``min_volume_mm3`` of ``p >= threshold``. With fewer than two such parts
    the region is left whole; otherwise the region is shared among them
    (watershed from their maxima only), so no voxel is lost. Regions of at
    least :data:`SPLIT_MAX_DIAMETER_MM` equivalent diameter are left whole.

    Args:
        labelmap: integer labelmap of candidate regions.
        labels: the labels that are candidates (others are left as they are).
        probability: probabilities (0-1) on the same grid.
        threshold: probability threshold (0-1) of the candidates' cores.
        min_volume_mm3: a part needs this much core (mm³) to be a candidate.
        depth_mm: h of the h-maxima of the depth (distance to the border, mm).

    Returns:
        ``(labelmap, labels)``: a copy of ``labelmap`` with new labels for the parts (``labelmap``
        itself when nothing was split), and the candidate labels.
    """
    arr = sitk.GetArrayViewFromImage(labelmap)
    out = None  # a copy of the labelmap, made at the first split (most calls split nothing)
    prob = sitk.GetArrayViewFromImage(probability)
    spacing = labelmap.GetSpacing()
    voxel_mm3 = float(np.prod(spacing))
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(sitk.Cast(labelmap, sitk.sitkUInt32))
    max_voxels = math.pi / 6.0 * SPLIT_MAX_DIAMETER_MM**3 / voxel_mm3
    kept = set()
    for lbl in labels:
        if shape.GetNumberOfPixels(int(lbl)) >= max_voxels:
            kept.add(int(lbl))
            continue
        x0, y0, z0, sx, sy, sz = shape.GetBoundingBox(int(lbl))
        box = (slice(max(z0 - 1, 0), z0 + sz + 1), slice(max(y0 - 1, 0), y0 + sy + 1), slice(max(x0 - 1, 0), x0 + sx + 1))
        region = arr[box] == lbl
        mask = sitk.GetImageFromArray(region.astype(np.uint8))
        mask.SetSpacing(spacing)
        depth = sitk.SignedMaurerDistanceMap(mask, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
        depth = sitk.Mask(depth, mask)
        markers = sitk.ConnectedComponent(sitk.Mask(sitk.RegionalMaxima(sitk.HMaxima(depth, float(depth_mm)), 0, 1, True), mask), True)
        n_markers = int(sitk.GetArrayViewFromImage(markers).max())
        if n_markers < 2:
            kept.add(int(lbl))
            continue
        parts = _flood(depth, mask, markers)
        core = region & (prob[box] >= threshold)
        counts = np.bincount(parts[core].ravel(), minlength=n_markers + 1)
        good = [i for i in range(1, n_markers + 1) if counts[i] * voxel_mm3 >= min_volume_mm3]
        if len(good) < 2:
            kept.add(int(lbl))
            continue
        seeds = sitk.GetArrayFromImage(markers)
        seeds[~np.isin(seeds, good)] = 0
        seeds_img = sitk.GetImageFromArray(seeds.astype(np.uint32))
        seeds_img.CopyInformation(markers)
        parts = _flood(depth, mask, seeds_img)
        if out is None:
            out = arr.astype(np.uint32)
            next_label = int(out.max()) + 1
        view = out[box]
        for i in good:
            view[(parts == i) & region] = next_label
            kept.add(next_label)
            next_label += 1
    if out is None:
        return labelmap, kept
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(labelmap)
    return img, kept


def _flood(depth: sitk.Image, mask: sitk.Image, seeds: sitk.Image) -> np.ndarray:
    """Watershed of the inverted depth from ``seeds``, inside ``mask``: the label of the seed each voxel drains to."""
    return sitk.GetArrayFromImage(sitk.Mask(sitk.MorphologicalWatershedFromMarkers(sitk.InvertIntensity(depth, 1e3), seeds, False, True), mask))


def relabel(labelmap: sitk.Image, candidates: list[Candidate]) -> sitk.Image:
    """uint16 labelmap where the voxels of ``candidates[i]`` (label ``candidates[i].id``) get label i+1,
    everything else 0; the candidates' ``id`` and ``rank`` become i+1."""
    lut = np.zeros(max((c.id for c in candidates), default=0) + 1, dtype=np.uint16)
    for rank, c in enumerate(candidates, start=1):
        lut[c.id] = rank
    src = sitk.GetArrayViewFromImage(labelmap)
    out = np.zeros(src.shape, np.uint16)
    if candidates:
        valid = src < len(lut)
        out[valid] = lut[src[valid]]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(labelmap)
    for rank, c in enumerate(candidates, start=1):
        c.id = c.rank = rank
    return img


def restrict_to_lung(probability: sitk.Image, lung_mask: sitk.Image, dilate_mm: float = 4.0) -> sitk.Image:
    """Zero the probability outside the (closed, dilated) lung mask.

    The lung mask is closed so that nodules inside the lung and those attached
    to the pleura lie in it; this removes responses in the mediastinum, the
    chest wall or the abdomen. Thresholding the returned map gives the
    candidates, so re-thresholding a stored map later gives the same ones.

    Args:
        probability: float probabilities (0-1) on some grid.
        lung_mask: uint8 lung mask on any grid (physical space, LPS mm).
        dilate_mm: the mask is dilated by this much first (mm).
    """
    return sitk.Mask(probability, lung_mask_on_grid(lung_mask, probability, dilate_mm))  # p x 0/1 without a float copy of the mask


def lung_mask_on_grid(lung_mask: sitk.Image, reference: sitk.Image, dilate_mm: float = 4.0) -> sitk.Image:
    """The closed lung mask dilated by ``dilate_mm`` (mm) as uint8 0/1 on ``reference``'s grid: where :func:`restrict_to_lung` keeps p."""
    radius = [max(1, int(round(dilate_mm / s))) for s in lung_mask.GetSpacing()]
    mask = sitk.BinaryDilate(lung_mask, radius, sitk.sitkBall)
    return sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def find_candidates(probability: sitk.Image, ct_hu: sitk.Image, threshold: float, spec=None) -> tuple[sitk.Image, list[Candidate]]:
    """Probability map -> ranked candidates: components at ``threshold``, then the model's second stage when it has one.

    The one post-processing that detection and re-thresholding share.

    Args:
        probability: float probabilities (0-1), on the grid of ``ct_hu``.
        ct_hu: the CT in HU (measurements, second-stage features).
        threshold: probability threshold.
        spec: the model's :class:`.model.ModelSpec` (its candidate options and rescorer); ``None``: defaults, no second stage.

    Returns:
        ``(labelmap, candidates)``: uint16 labels on the grid (label = rank) and the ranked candidates.
    """
    labelmap, candidates = extract_candidates(probability, ct_hu, threshold, **(spec.candidate_options() if spec is not None else {}))
    if spec is not None and spec.rescoring:
        from .rescore import apply_rescorer

        labelmap, candidates = apply_rescorer(spec.rescoring, candidates, labelmap, ct_hu, probability)
    return labelmap, candidates

"""Training data: LUNA16 nodule cubes and full LIDC-IDRI scans read from the data folder, or from a compact data pack; split by series."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..intensity import scale_intensity_uint8
from ..model import ModelSpec
from .masks import components

log = logging.getLogger(__name__)


def lidc_marked_points_lps(xml_path: str | os.PathLike, image) -> list[list[float]]:
    """Centres (LPS mm) of everything any LIDC reader marked: nodules (any size) and non-nodules.

    Used to keep negative training patches away from real findings.
    """
    from ..evaluate import lidc_reader_marks

    return [list(m.center_mm) for m in lidc_reader_marks(xml_path, image)]


@dataclass
class TrainingData:
    """Training material at the model's spacing, intensities as uint8 (0..255 = hu_window).

    Attributes:
        cubes: ``(N, S, S, S)`` uint8 nodule cubes (cut-short cubes padded with air).
        masks: ``(N, S, S, S)`` uint8 nodule masks.
        diameters_mm: ``(N,)`` reference diameters.
        series: ``(N,)`` series UIDs.
        is_val: ``(N,)`` bool, validation split (by series).
        scans: list of ``(volume uint8 (z, y, x), lung mask uint8, exclusion points (M, 3) zyx voxels)``.
        meta: description (sources, split seed, counts).
        hard_cube: ``(K, 4)`` hard negatives in training cubes: ``(cube index, z, y, x)``.
        hard_scan: ``(K, 4)`` hard negatives in scans: ``(scan index, z, y, x)``.
        contexts: ``(N,)`` surroundings of each nodule (:data:`NODULE_CONTEXTS`), or empty when not computed.
        other_masks: ``(N, S, S, S)`` uint8 masks of the other LUNA16 nodules of the same series
            that lie in each cube (not in ``masks``), or empty when not computed (older packs).
        missed: ``(N,)`` bool, training nodules the mining model did not find at its threshold
            (:func:`mine_hard_negatives`), or empty when not mined.
    """

    cubes: np.ndarray
    masks: np.ndarray
    diameters_mm: np.ndarray
    series: np.ndarray
    is_val: np.ndarray
    scans: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    hard_cube: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    hard_scan: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    contexts: np.ndarray = field(default_factory=lambda: np.zeros((0,), "U20"))
    other_masks: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.uint8))
    missed: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    @property
    def has_other_masks(self) -> bool:
        """Whether ``other_masks`` was computed (older packs lack it)."""
        return self.other_masks.shape == self.masks.shape

    def all_masks(self, idx: np.ndarray | None = None) -> np.ndarray:
        """``(len(idx), S, S, S)`` uint8 (all cubes without ``idx``): each cube's nodule and the other nodules of its series that lie in it."""
        masks = self.masks if idx is None else self.masks[idx]
        if self.has_other_masks:
            return np.maximum(masks, self.other_masks if idx is None else self.other_masks[idx])
        return masks


def _fit_cube(arr: np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full((size, size, size), fill, dtype=arr.dtype)
    s = [min(size, d) for d in arr.shape]
    out[: s[0], : s[1], : s[2]] = arr[: s[0], : s[1], : s[2]]
    return out


def validation_series(series_uids: Sequence[str], val_fraction: float = 0.15, seed: int = 0) -> set[str]:
    """The series held out for validation: the split every training and evaluation script shares."""
    uniq = sorted(set(series_uids))
    random.Random(seed).shuffle(uniq)
    return set(uniq[: max(1, int(round(val_fraction * len(uniq))))])


def prepare_training_data(
    data_dir: str | os.PathLike,
    spec: ModelSpec,
    scan_names: Sequence[str] = ("LIDC-IDRI-0002",),
    val_fraction: float = 0.15,
    seed: int = 0,
    max_cubes: int | None = None,
) -> TrainingData:
    """Read cubes and full scans from ``data_dir`` (the layout of ``shared/data``).

    Args:
        data_dir: folder with ``cubes/cubes.csv`` and ``scans/``.
        spec: model spec (spacing and HU window).
        scan_names: full scans used for negatives and as pasting background
            (the others stay unseen for evaluation).
        val_fraction: fraction of series held out for validation.
        seed: split seed.
        max_cubes: use only the first N cubes (quick runs, tests).
    """
    import SimpleITK as sitk

    from ..preprocess import compute_lung_mask, orient_lps, resample_like, resample_to_spacing

    data_dir = Path(data_dir)
    if not (data_dir / "cubes" / "cubes.csv").is_file():
        raise ValueError(f"'{data_dir}' has no cubes/cubes.csv: give the folder laid out like shared/data (cubes/cubes.csv with the cubes, scans/*.nii.gz).")
    with open(data_dir / "cubes" / "cubes.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if max_cubes:
        rows = rows[:max_cubes]
    size = 50
    cubes = np.zeros((len(rows), size, size, size), np.uint8)
    masks = np.zeros((len(rows), size, size, size), np.uint8)
    contexts, grids = [], []
    air = int(scale_intensity_uint8(np.array([-1000.0]), spec.hu_window)[0])
    for n, row in enumerate(rows):
        img = sitk.ReadImage(str(data_dir / "cubes" / row["image"]))
        msk = sitk.ReadImage(str(data_dir / "cubes" / row["mask"]))
        if any(abs(s - t) > 1e-3 for s, t in zip(img.GetSpacing(), spec.spacing_mm)):
            img = resample_to_spacing(img, spec.spacing_mm, sitk.sitkLinear, -1000.0)
            msk = resample_like(msk, img, sitk.sitkNearestNeighbor)
        a = np.maximum(sitk.GetArrayFromImage(img).astype(np.float32), -1000.0)
        m = (sitk.GetArrayFromImage(msk) > 0).astype(np.uint8)
        cubes[n] = _fit_cube(scale_intensity_uint8(a, spec.hu_window), size, air)
        masks[n] = _fit_cube(m, size, 0)
        contexts.append(nodule_context(a, m, img.GetSpacing()))
        grids.append((img.GetSize(), img.GetOrigin(), img.GetSpacing(), img.GetDirection()))
    series = np.array([r["seriesuid"] for r in rows])
    other_masks = _other_nodule_masks(data_dir / "cubes", rows, grids, size)
    val_series = validation_series(series, val_fraction, seed)
    is_val = np.array([s in val_series for s in series])
    scans = []
    for name in scan_names:
        path = data_dir / "scans" / f"{name}.nii.gz"
        if not path.exists():
            log.warning("Scan %s not found, skipped", path)
            continue
        img = orient_lps(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32))
        img = sitk.Maximum(img, -1000.0)
        res = resample_to_spacing(img, spec.spacing_mm, sitk.sitkLinear, -1000.0)
        lung = compute_lung_mask(res)
        if lung is None:
            log.warning("No lung found in %s, skipped", path)
            continue
        lung = resample_like(lung, res, sitk.sitkNearestNeighbor)
        points = []
        xml = path.with_name(f"{name}.xml")
        if xml.exists():
            raw = sitk.ReadImage(str(path))
            for p in lidc_marked_points_lps(xml, raw):
                points.append(list(reversed(res.TransformPhysicalPointToContinuousIndex(p))))
        scans.append(
            (
                scale_intensity_uint8(sitk.GetArrayFromImage(res), spec.hu_window),
                sitk.GetArrayFromImage(lung).astype(np.uint8),
                np.array(points, dtype=np.float32).reshape(-1, 3),
            )
        )
    meta = {
        "cubes": len(rows),
        "train_cubes": int((~is_val).sum()),
        "val_cubes": int(is_val.sum()),
        "series": len(set(series)),
        "val_series": len(val_series),
        "split_seed": seed,
        "scans": [n for n in scan_names],
    }
    meta["other_nodules_in_cubes"] = int(sum(len(components(m > 0, 1)) for m in other_masks if m.any()))
    return TrainingData(
        cubes,
        masks,
        np.array([float(r["diameter_mm"]) for r in rows]),
        series,
        is_val,
        scans,
        meta,
        contexts=np.array(contexts, "U20"),
        other_masks=other_masks,
    )


def _other_nodule_masks(cube_dir: Path, rows: Sequence[dict], grids: Sequence[tuple], size: int) -> np.ndarray:
    """``(N, size, size, size)`` uint8: in each cube, the masks of the other cubes' nodules of its series (resampled, nearest).

    LUNA16 nodules of one series can lie a few centimetres apart, so a cube may
    hold a neighbour that its own mask leaves out; unmarked, it would be taught
    as background and mined as a false response.
    """
    import SimpleITK as sitk

    out = np.zeros((len(rows), size, size, size), np.uint8)
    by_series: dict[str, list[int]] = {}
    for n, row in enumerate(rows):
        by_series.setdefault(row["seriesuid"], []).append(n)
    for members in by_series.values():
        if len(members) < 2:
            continue
        masks = {n: sitk.Cast(sitk.ReadImage(str(cube_dir / rows[n]["mask"])) > 0, sitk.sitkUInt8) for n in members}
        for n in members:
            grid_size, origin, spacing, direction = grids[n]
            ref = sitk.Image([int(v) for v in grid_size], sitk.sitkUInt8)
            ref.SetOrigin(origin)
            ref.SetSpacing(spacing)
            ref.SetDirection(direction)
            for k in members:
                if k != n:
                    other = sitk.GetArrayFromImage(sitk.Resample(masks[k], ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
                    out[n] = np.maximum(out[n], _fit_cube(other, size, 0))
    return out


def save_pack(data: TrainingData, path: str | os.PathLike, bits: int = 8, cube_size: int | None = None, scan_margin: int | None = None) -> None:
    """Write a compact compressed data pack (an ``.npz`` whose members are LZMA-compressed), e.g. for a GPU machine.

    Args:
        data: what :func:`prepare_training_data` read.
        path: the ``.npz`` to write.
        bits: keep the top ``bits`` of each uint8 intensity (8 = lossless; 7
            halves the levels, a step of 1400/127 = 11 HU, which
            :func:`load_pack` dithers back; the noise augmentation alone is up
            to 42 HU). CT noise makes the lower bits incompressible, so this
            is what makes a pack small.
        cube_size: crop the nodule cubes (and masks) centrally to this many
            voxels (at least the training patch; the nodule stays central).
        scan_margin: crop each scan to its lung mask's bounding box plus this
            many voxels (at least half the patch, so that no patch centre is
            lost); ``None`` keeps the whole scan.
    """
    import zipfile

    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    cubes, masks, others = data.cubes, data.masks, data.other_masks
    if cube_size is not None and cube_size < cubes.shape[1]:
        lo = (cubes.shape[1] - cube_size) // 2
        sl = (slice(None),) + (slice(lo, lo + cube_size),) * 3
        cubes, masks = cubes[sl], masks[sl]
        others = others[sl] if data.has_other_masks else others
    shift = 8 - bits
    meta = dict(data.meta, pack={"bits": bits, "cube_size": int(cubes.shape[1]), "scan_margin": scan_margin})
    arrays = {
        "cubes": cubes >> shift,
        "masks": masks,
        "diameters_mm": data.diameters_mm,
        "series": data.series,
        "is_val": data.is_val,
        "meta": np.array(json.dumps(meta)),
        "hard_cube": data.hard_cube,
        "hard_scan": data.hard_scan,
        "contexts": np.asarray(data.contexts, "U20"),
        "other_masks": others,
    }
    for i, (vol, lung, pts) in enumerate(data.scans):
        if scan_margin is not None:
            nz = np.argwhere(lung)
            lo = np.maximum(nz.min(0) - scan_margin, 0)
            hi = np.minimum(nz.max(0) + 1 + scan_margin, vol.shape)
            sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            vol, lung, pts = vol[sl], lung[sl], np.asarray(pts, np.float32).reshape(-1, 3) - lo
        arrays[f"scan{i}"], arrays[f"lung{i}"], arrays[f"excl{i}"] = vol >> shift, lung, pts
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def load_pack(path: str | os.PathLike, seed: int = 0) -> TrainingData:
    """Read a pack written by :func:`save_pack` (intensities of a pack of fewer than 8 bits are dithered back to uint8 with ``seed``).

    Raises:
        ValueError: ``path`` is missing or is no such pack.
    """
    if not Path(path).is_file():
        raise ValueError(f"Data pack '{path}' does not exist: write one with 'lungnoduleai pack --data-dir DIR --output {path}', or train from --data-dir.")
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"'{path}' is not a data pack written by 'lungnoduleai pack' ({exc}).") from None
    shift = 8 - int(meta.get("pack", {}).get("bits", 8))
    rng = np.random.default_rng(seed)

    def intensities(a: np.ndarray) -> np.ndarray:
        if not shift:
            return a
        return (a << shift) | rng.integers(0, 1 << shift, size=a.shape, dtype=np.uint8)

    scans = []
    i = 0
    while f"scan{i}" in z:
        scans.append((intensities(z[f"scan{i}"]), z[f"lung{i}"], z[f"excl{i}"]))
        i += 1
    data = TrainingData(intensities(z["cubes"]), z["masks"], z["diameters_mm"], z["series"], z["is_val"], scans, meta)
    if "hard_cube" in z:
        data.hard_cube, data.hard_scan = z["hard_cube"], z["hard_scan"]
    if "contexts" in z:
        data.contexts = z["contexts"]
    if "other_masks" in z:
        data.other_masks = z["other_masks"]
    return data


# ----------------------------------------------------------------------------- sampling


NODULE_CONTEXTS = ("pleural/mediastinal", "vascular", "isolated")
NODULE_DENSITIES = ("faint", "dense")
FAINT_MEAN_HU = -450.0
"""A nodule whose mask averages below this (HU) is "faint": ground-glass or part-solid, or small enough that partial volume blurs it."""


def nodule_density(ct_hu: np.ndarray, mask: np.ndarray) -> str:
    """``"faint"`` when the mean CT value inside the nodule mask is below :data:`FAINT_MEAN_HU`, else ``"dense"``.

    Args:
        ct_hu: ``(z, y, x)`` HU around the nodule.
        mask: ``(z, y, x)`` nodule mask, same grid (not empty).
    """
    values = np.asarray(ct_hu)[np.asarray(mask) > 0]
    if values.size == 0:
        raise ValueError("The nodule mask is empty; its density is undefined.")
    return "faint" if float(values.mean()) < FAINT_MEAN_HU else "dense"


def nodule_context(ct_hu: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> str:
    """Where a nodule sits: against the pleura/mediastinum, against a vessel, or free in the lung.

    Looks at a 3 mm shell around the nodule mask. Soft tissue (> -500 HU)
    outside the nodule (1 mm margin) that survives an opening with a 4 mm
    ball is thick: chest wall, mediastinum, diaphragm ("pleural/mediastinal"
    when it makes at least 5 % of the shell); thinner tissue is vessels and
    airway walls ("vascular" when all tissue makes at least 5 % of the
    shell); otherwise "isolated". A heuristic, checked by eye on a few cubes
    of each kind.

    Args:
        ct_hu: ``(z, y, x)`` HU around the nodule (e.g. a nodule cube).
        mask: ``(z, y, x)`` nodule mask, same grid.
        spacing_mm: ``(x, y, z)`` voxel spacing.
    """
    import SimpleITK as sitk

    nod = sitk.GetImageFromArray((np.asarray(mask) > 0).astype(np.uint8))
    nod.SetSpacing(tuple(float(v) for v in spacing_mm))

    def vox(mm):
        return [max(1, int(round(mm / v))) for v in spacing_mm]

    shell = sitk.GetArrayFromImage(sitk.And(sitk.BinaryDilate(nod, vox(3.0)), sitk.Not(nod))) > 0
    tissue = sitk.GetImageFromArray((np.asarray(ct_hu) > -500).astype(np.uint8))
    tissue.CopyInformation(nod)
    tissue = sitk.And(tissue, sitk.Not(sitk.BinaryDilate(nod, vox(1.0))))
    thick = sitk.BinaryMorphologicalOpening(tissue, vox(4.0), sitk.sitkBall)
    n = max(1, int(shell.sum()))
    if (sitk.GetArrayViewFromImage(thick)[shell] > 0).sum() / n >= 0.05:
        return "pleural/mediastinal"
    if (sitk.GetArrayViewFromImage(tissue)[shell] > 0).sum() / n >= 0.05:
        return "vascular"
    return "isolated"

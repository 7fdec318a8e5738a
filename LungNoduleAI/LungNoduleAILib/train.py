"""Training the nodule segmentation network on real nodules in real lungs.

Data (see ``shared/data/README.md``): LUNA16 nodule cubes (50 mm, 1 mm, with
masks) and full LIDC-IDRI scans. Each training patch (``patch`` voxels, cubic)
is one of:

* a nodule cube cropped at a random offset (the nodule off-centre);
* a cube whose nodule was erased ("inpainted" with lung parenchyma) with a
  nodule from another training cube pasted at a random lung position,
  next to dense tissue (pleura, vessels) in 40 % of pastes, and leaning on
  the chest wall, mediastinum or diaphragm in a ``pleural_fraction`` of them;
* an erased cube alone (a nodule-free lung patch);
* a patch from a full scan's lungs (half the centres on dense tissue inside
  the lung: vessels, pleura, fissures), with a pasted nodule in some.

Validation is split by series (never by cube). The same command runs on the
CPU, on one GPU, and under ``torchrun`` on several GPUs
(DistributedDataParallel); with ``workers`` > 0, patches are drawn and
augmented by that many processes so that a GPU is not kept waiting.

SimpleITK is needed only to read the data folder (``prepare_training_data``)
and for :func:`nodule_context`; training from a data pack needs numpy,
scipy (scikit-learn's own dependency), torch and MONAI, so a pack can train
on a machine where SimpleITK is not installed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from .model import ModelSpec, build_network, read_weights, save_model
from .intensity import scale_intensity_uint8, uint8_to_hu

__all__ = ["mine_hard_negatives", "validation_series", "TrainingData", "prepare_training_data", "load_pack", "save_pack", "train", "cube_detection_stats", "lidc_marked_points_lps"]

log = logging.getLogger(__name__)



def lidc_marked_points_lps(xml_path: str | os.PathLike, image) -> list[list[float]]:
    """Centres (LPS mm) of everything any LIDC reader marked: nodules (any size) and non-nodules.

    Used to keep negative training patches away from real findings.
    """
    from .evaluate import lidc_reader_marks

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

    from .preprocess import compute_lung_mask, orient_lps, resample_like, resample_to_spacing

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
        scans.append((scale_intensity_uint8(sitk.GetArrayFromImage(res), spec.hu_window), sitk.GetArrayFromImage(lung).astype(np.uint8), np.array(points, dtype=np.float32).reshape(-1, 3)))
    meta = {
        "cubes": len(rows),
        "train_cubes": int((~is_val).sum()),
        "val_cubes": int(is_val.sum()),
        "series": len(set(series)),
        "val_series": len(val_series),
        "split_seed": seed,
        "scans": [n for n in scan_names],
    }
    meta["other_nodules_in_cubes"] = int(sum(len(_components(m > 0, 1)) for m in other_masks if m.any()))
    return TrainingData(
        cubes, masks, np.array([float(r["diameter_mm"]) for r in rows]), series, is_val, scans, meta, contexts=np.array(contexts, "U20"), other_masks=other_masks
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
        "cubes": cubes >> shift, "masks": masks, "diameters_mm": data.diameters_mm,
        "series": data.series, "is_val": data.is_val, "meta": np.array(json.dumps(meta)),
        "hard_cube": data.hard_cube, "hard_scan": data.hard_scan, "contexts": np.asarray(data.contexts, "U20"),
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


class PatchSampler:
    """Draws ``(image uint8 (P, P, P), label uint8 (P, P, P))`` training patches."""

    def __init__(
        self, data: TrainingData, patch: int, seed: int, lung_max_u8: int, mix: Sequence[float] = (0.3, 0.25, 0.15, 0.3), attached_weight: float = 1.0,
        hu_window: Sequence[float] = (-1000.0, 400.0), faint_fraction: float = 0.0, small_weight: float = 2.0, faint_weight: float = 1.0,
        pleural_fraction: float = 0.0, missed_weight: float = 1.0, fade_fraction: float = 0.0,
    ):
        self.patch = patch
        self.rng = np.random.default_rng(seed)
        idx = np.flatnonzero(~data.is_val)
        self.cubes = data.cubes[idx]
        self.masks = data.masks[idx]  # each cube's own nodule: sprites, sizes, contexts
        self.labels = data.all_masks(idx)  # and the other nodules of its series in it: labels, erasing
        d = data.diameters_mm[idx]
        w = np.where(d < 6, small_weight, 1.0)  # oversample nodules under 6 mm
        if attached_weight != 1.0:  # and nodules against the pleura or a vessel
            if len(data.contexts) == len(data.cubes):
                contexts = np.asarray(data.contexts)[idx]
            else:  # an older pack: tell them from the uint8 cubes
                contexts = np.array([nodule_context(uint8_to_hu(c, hu_window), m) for c, m in zip(self.cubes, self.masks)])
            attached = contexts != "isolated"
            w = w * np.where(attached, attached_weight, 1.0)
            log.info("%d of %d training nodules touch the pleura or a vessel; drawn %.1fx as often.", int(attached.sum()), len(attached), attached_weight)
        if faint_weight != 1.0:  # and faint ones (ground-glass, part-solid, small and blurred)
            faint = np.array([nodule_density(uint8_to_hu(c, hu_window), m) == "faint" for c, m in zip(self.cubes, self.masks)])
            w = w * np.where(faint, faint_weight, 1.0)
            log.info("%d of %d training nodules are faint (mean < %.0f HU); drawn %.1fx as often.", int(faint.sum()), len(faint), FAINT_MEAN_HU, faint_weight)
        if missed_weight != 1.0:  # and the ones the mining model missed (hard positives)
            if len(data.missed) != len(data.cubes):
                raise ValueError(f"missed_weight={missed_weight} needs the missed nodules of a mining run (mine_hard_negatives with found_threshold); this data has {len(data.missed)} flags for {len(data.cubes)} cubes")
            missed = data.missed[idx]
            w = w * np.where(missed, missed_weight, 1.0)
            log.info("%d of %d training nodules were missed by the mining model; drawn %.1fx as often.", int(missed.sum()), len(missed), missed_weight)
        self.nodule_p = w / w.sum()
        self.lung_max_u8 = lung_max_u8
        self.faint_fraction = faint_fraction  # pasted nodules made faint (35-70 % of their contrast), like ground-glass nodules
        self.pleural_fraction = pleural_fraction  # pasted nodules placed against thick tissue (chest wall, mediastinum, diaphragm)
        self.fade_fraction = fade_fraction  # real nodules made faint where they lie (35-70 % of their contrast), in their own pleura and vessels
        self.mix = np.array(mix) / np.sum(mix)
        self.scans = data.scans
        self.air = 0
        self.erased = np.stack([self._erase(c, m) for c, m in zip(self.cubes, self.labels)])
        self.sprites = [self._sprite(c, m) for c, m in zip(self.cubes, self.masks)]
        train_pos = {int(i): n for n, i in enumerate(idx)}
        self.hard_cube = np.array([[train_pos[int(c[0])], *c[1:]] for c in data.hard_cube if int(c[0]) in train_pos], np.int32).reshape(-1, 4)
        self.hard_scan = np.asarray(data.hard_scan, np.int32).reshape(-1, 4)
        self.scan_centres = []
        for vol, lung, pts in self.scans:
            r = patch // 2
            inner = np.zeros_like(lung, dtype=bool)
            inner[r:-r, r:-r, r:-r] = True
            lung_b = (lung > 0) & inner
            dense = lung_b & (vol > lung_max_u8)
            self.scan_centres.append((np.argwhere(lung_b)[:: 7], np.argwhere(dense)[:: 3], pts))

    def _erase(self, cube: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The cube without its nodule: the mask (dilated by 2 voxels) filled with lung parenchyma.

        Erased voxels clearly nearer thick tissue (chest wall, mediastinum,
        diaphragm: soft tissue surviving an opening with a 3-voxel ball)
        than lung take the nearest wall voxel's value instead, so a
        juxtapleural nodule leaves a smooth pleura, neither a lung-coloured
        dent in the wall nor a bump on it.
        """
        m = ndimage.binary_dilation(mask > 0, _ball(2))
        out = cube.copy()
        lung_vals = cube[(cube < self.lung_max_u8) & (m == 0)]
        fill = np.median(lung_vals) if lung_vals.size else self.lung_max_u8 // 2
        noise = self.rng.normal(0, 4, size=int(m.sum()))
        values = fill + noise
        nz = np.argwhere(m)
        box = tuple(slice(max(0, a - 8), b + 9) for a, b in zip(nz.min(0), nz.max(0)))  # the mask and 8 voxels around it
        c, mb = cube[box], m[box]
        thick = _thick_tissue(np.where(mb, 0, c), self.lung_max_u8)
        lung = (c < self.lung_max_u8) & ~mb
        if thick.any() and lung.any():
            to_wall, nearest = ndimage.distance_transform_edt(~thick, return_indices=True)
            to_lung = ndimage.distance_transform_edt(~lung)
            wall = to_wall[mb] + 1.0 < to_lung[mb]  # clearly on the wall's side: no bump grows out of the wall
            values = np.where(wall, c[tuple(i[mb] for i in nearest)] + noise, values)
        out[m] = np.clip(values, 0, 255).astype(np.uint8)
        return out

    def _fade(self, i: int) -> np.ndarray:
        """Training cube ``i`` with its nodules faded in place to 35-70 % of their contrast.

        Each voxel of a nodule mask and of its blurred rim in the lung moves
        from its value towards the erased cube's (lung parenchyma), keeping
        35-70 % of what it stands above it; the chest wall, mediastinum or
        diaphragm beside the mask is left as it is. An attached nodule so
        becomes a faint attached nodule in its own surroundings: the kind
        that the pasted faint nodules, placed in other lungs, rarely give.
        The labels do not change.
        """
        nz = np.argwhere(self.labels[i] > 0)
        # _soft_mask reaches 4 voxels past a mask, and the opening that finds the wall looks 6 further: the same result as on the whole cube
        box = tuple(slice(max(0, a - 10), b + 11) for a, b in zip(nz.min(0), nz.max(0)))
        mask = self.labels[i][box] > 0
        cube, erased = self.cubes[i][box].astype(np.float32), self.erased[i][box].astype(np.float32)
        blend = _soft_mask(mask)
        blend[_thick_tissue(np.where(mask, 0, self.cubes[i][box]), self.lung_max_u8) & ~mask] = 0.0  # the wall next to a nodule stays as it is
        alpha = self.rng.uniform(0.35, 0.7)
        faded = cube - (1.0 - alpha) * blend * np.maximum(cube - erased, 0.0)  # only what the nodule adds over its surroundings
        out = self.cubes[i].copy()
        out[box] = np.clip(np.rint(faded), 0, 255).astype(np.uint8)
        return out

    @staticmethod
    def _sprite(cube: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nz = np.argwhere(mask)
        lo = np.maximum(nz.min(0) - 3, 0)
        hi = np.minimum(nz.max(0) + 4, mask.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        m = mask[sl]
        blend = _soft_mask(m)
        return cube[sl], m, blend

    def _random_crop(self, vol: np.ndarray, lab: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.patch
        if pad:
            vol = np.pad(vol, pad, mode="reflect")
            lab = np.pad(lab, pad, mode="constant")
        off = [int(self.rng.integers(0, max(1, s - p + 1))) for s in vol.shape]
        sl = tuple(slice(o, o + p) for o in off)
        return vol[sl], lab[sl]

    def _paste(self, vol: np.ndarray, lab: np.ndarray) -> None:
        """Paste a random training nodule at a random lung position (in place)."""
        img, m, blend = self.sprites[int(self.rng.choice(len(self.sprites), p=self.nodule_p))]
        for ax in range(3):
            if self.rng.random() < 0.5:
                img, m, blend = np.flip(img, ax), np.flip(m, ax), np.flip(blend, ax)
        shape = np.array(img.shape)
        p = self.patch
        lo_allowed = -shape // 4
        hi_allowed = p - shape + shape // 4
        lung = np.argwhere(vol < self.lung_max_u8)
        if lung.size == 0:
            return
        thick = None
        if self.rng.random() < self.pleural_fraction:
            thick, spots = self._pleural_spots(vol, m)
            lung = spots if len(spots) else lung  # no chest wall in this patch: anywhere in the lung
        dense_near = thick is None and self.rng.random() < 0.4
        for _ in range(20):
            c = lung[int(self.rng.integers(len(lung)))]
            start = c - shape // 2
            if np.all(start >= lo_allowed) and np.all(start <= hi_allowed):
                if dense_near:
                    # prefer a spot whose surroundings contain dense tissue (pleura, vessel)
                    a = np.maximum(c - shape // 2 - 2, 0)
                    b = np.minimum(c + shape // 2 + 3, p)
                    if not (vol[a[0]:b[0], a[1]:b[1], a[2]:b[2]] > self.lung_max_u8 + 40).any():
                        continue
                break
        else:
            return
        dst_lo = np.maximum(start, 0)
        dst_hi = np.minimum(start + shape, p)
        src_lo = dst_lo - start
        src_hi = src_lo + (dst_hi - dst_lo)
        d = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
        s = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        bg = vol[d].astype(np.float32)
        fg = np.maximum(img[s].astype(np.float32), bg)
        alpha = self.rng.uniform(0.35, 0.7) if self.rng.random() < self.faint_fraction else 1.0
        vol[d] = np.clip(bg + alpha * blend[s] * (fg - bg), 0, 255).astype(np.uint8)
        label = m[s]
        if thick is not None:  # a juxtapleural nodule's mask stops at the wall it leans on
            label = label * (~thick[d])
        lab[d] = np.maximum(lab[d], label)

    def _pleural_spots(self, vol: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Thick tissue of a patch and the lung voxels where a nodule of ``mask``'s size would lean on it.

        Thick tissue is soft tissue (above the lung's upper bound) that survives
        an opening with a 3-voxel ball: chest wall, mediastinum, diaphragm, not
        vessels. A spot is a lung voxel whose distance to it is 0.6-1.0 of the
        nodule's equivalent radius, so the pasted nodule touches the wall.

        Returns:
            ``(thick (P, P, P) bool, spots (N, 3) int voxel indices)``.
        """
        thick = _thick_tissue(vol, self.lung_max_u8)
        if not thick.any():
            return thick, np.zeros((0, 3), int)
        radius = (3.0 * float((mask > 0).sum()) / (4.0 * np.pi)) ** (1.0 / 3.0)
        dist = ndimage.distance_transform_edt(~thick)
        near = (vol < self.lung_max_u8) & (dist >= 0.6 * radius) & (dist <= max(1.0 * radius, 0.6 * radius + 1.5))
        return thick, np.argwhere(near)

    def _hard_cube_patch(self) -> tuple[np.ndarray, np.ndarray]:
        """A patch of a training cube centred (with jitter) on a place the model wrongly fired."""
        i, z, y, x = self.hard_cube[int(self.rng.integers(len(self.hard_cube)))]
        pad = self.patch // 2
        vol = np.pad(self.cubes[i], pad, mode="reflect")
        lab = np.pad(self.labels[i], pad, mode="constant")
        c = np.array([z, y, x]) + pad + self.rng.integers(-6, 7, 3)
        lo = np.clip(c - self.patch // 2, 0, np.array(vol.shape) - self.patch)
        sl = tuple(slice(int(a), int(a) + self.patch) for a in lo)
        return np.ascontiguousarray(vol[sl]), np.ascontiguousarray(lab[sl])

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        kind = int(self.rng.choice(4, p=self.mix))
        if kind == 3 and not self.scans:
            kind = 1
        n = len(self.cubes)
        if kind == 0:
            if len(self.hard_cube) and self.rng.random() < 0.3:
                return self._hard_cube_patch()
            i = int(self.rng.choice(n, p=self.nodule_p))
            cube = self._fade(i) if self.fade_fraction and self.rng.random() < self.fade_fraction else self.cubes[i]
            vol, lab = self._random_crop(cube, self.labels[i], 8)
            return np.ascontiguousarray(vol), np.ascontiguousarray(lab)
        if kind in (1, 2):
            i = int(self.rng.integers(n))
            vol, lab = self._random_crop(self.erased[i], np.zeros_like(self.masks[i]), 0)
            vol, lab = vol.copy(), lab.copy()
            if kind == 1:
                self._paste(vol, lab)
            return vol, lab
        s = int(self.rng.integers(len(self.scans)))
        vol_full, _, _ = self.scans[s]
        anywhere, dense, pts = self.scan_centres[s]
        r = self.patch // 2
        hard = self.hard_scan[self.hard_scan[:, 0] == s][:, 1:] if len(self.hard_scan) else np.zeros((0, 3), np.int32)
        for _ in range(20):
            if len(hard) and self.rng.random() < 0.4:
                c = hard[int(self.rng.integers(len(hard)))] + self.rng.integers(-8, 9, 3)
                c = np.clip(c, r, np.array(vol_full.shape) - r - 1)
                break
            pool = dense if (self.rng.random() < 0.5 and len(dense)) else anywhere
            c = pool[int(self.rng.integers(len(pool)))]
            if len(pts) == 0 or np.min(np.max(np.abs(pts - c), axis=1)) > r + 12:
                break
        sl = tuple(slice(int(v) - r, int(v) - r + self.patch) for v in c)
        vol = vol_full[sl].copy()
        lab = np.zeros_like(vol)
        if self.rng.random() < 0.3:
            self._paste(vol, lab)
        return vol, lab


def _augment(x, y, gen, zoom: float = 0.0):
    """Batch augmentation on torch tensors ``(B, 1, P, P, P)``: flips, axial rot90,
    intensity scale/shift, noise, simulated thick slices and, with ``zoom`` > 0,
    half of the batches rescaled by :func:`_zoom`."""
    import torch
    import torch.nn.functional as F

    if zoom > 0 and torch.rand(1, generator=gen).item() < 0.5:
        u = torch.rand(1, generator=gen).item() * 2 - 1
        x, y = _zoom(x, y, float((1.0 + zoom) ** u))
    for ax in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            x, y = x.flip(ax), y.flip(ax)
    k = int(torch.randint(0, 4, (1,), generator=gen).item())
    if k:
        x, y = torch.rot90(x, k, (3, 4)), torch.rot90(y, k, (3, 4))
    b = x.shape[0]
    scale = 1.0 + 0.1 * (torch.rand(b, 1, 1, 1, 1, generator=gen) * 2 - 1)
    shift = 0.04 * (torch.rand(b, 1, 1, 1, 1, generator=gen) * 2 - 1)
    sigma = 0.03 * torch.rand(b, 1, 1, 1, 1, generator=gen)
    x = x * scale.to(x.device) + shift.to(x.device) + torch.randn(x.shape, generator=gen).to(x.device) * sigma.to(x.device)
    if torch.rand(1, generator=gen).item() < 0.25:  # thick slices: down/up-sample along z
        f = float(1.5 + 1.5 * torch.rand(1, generator=gen).item())
        p = x.shape[2]
        x = F.interpolate(F.interpolate(x, size=(max(8, int(p / f)), p, p), mode="trilinear", align_corners=False), size=(p, p, p), mode="trilinear", align_corners=False)
    return x, y


def _zoom(x, y, factor: float):
    """Rescale patches ``(B, 1, P, P, P)`` about their centre by ``factor`` (> 1: nodules and
    vessels look larger, as at finer voxels), keeping the patch size: an enlarged patch is
    cropped centrally, a shrunk one padded by mirroring. Labels follow (trilinear, >= 0.5)."""
    import torch.nn.functional as F

    p = x.shape[2]
    n = max(8, int(round(p * factor)))
    if n == p:
        return x, y
    x = F.interpolate(x, size=(n, n, n), mode="trilinear", align_corners=False)
    y = (F.interpolate(y, size=(n, n, n), mode="trilinear", align_corners=False) >= 0.5).to(y.dtype)
    if n > p:
        a = (n - p) // 2
        return x[:, :, a : a + p, a : a + p, a : a + p].contiguous(), y[:, :, a : a + p, a : a + p, a : a + p].contiguous()
    a, b = (p - n) // 2, p - n - (p - n) // 2
    pads = (a, b, a, b, a, b)
    mode = "reflect" if max(a, b) < n else "replicate"
    return F.pad(x, pads, mode=mode), F.pad(y, pads, mode=mode)


def peak_loss(logits, y, core: int = 3):
    """Detection term: ``-log sigmoid(peak)`` averaged over the patches that hold a labelled nodule.

    ``peak`` is the highest logit, averaged over a cube of ``core`` voxels a
    side, inside the patch's labels. Voxel-wise losses are content when most
    of a nodule's voxels are right; a candidate needs only a core above the
    threshold, and a faint nodule against the pleura can end with no such core
    at all. This term pushes up the best core of every labelled patch, however
    few voxels it has.

    Args:
        logits: network outputs ``(B, 1, P, P, P)``.
        y: labels ``(B, 1, P, P, P)`` (0/1).
        core: side of the averaging cube (voxels, 1 mm).

    Returns:
        A scalar (0, with a gradient, when no patch has a label).
    """
    import torch.nn.functional as F

    labelled = y > 0.5
    has = labelled.flatten(1).any(dim=1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    peak = _core_logits(logits, core).masked_fill(~labelled, float("-inf")).flatten(1).max(dim=1).values[has]
    return F.softplus(-peak).mean()


def background_peak_loss(logits, y, core: int = 3, margin: int = 3):
    """False-candidate term: ``-log(1 - sigmoid(peak))`` averaged over the patches.

    ``peak`` is the highest logit, averaged over a cube of ``core`` voxels a
    side, among the voxels more than ``margin`` voxels from any label: the
    core of the patch's most confident false candidate. The counterpart of
    :func:`peak_loss`. Voxel-wise cross-entropy spreads its push over every
    background voxel; a false candidate needs only one core above the
    threshold, and this term pushes down that core in each patch, whatever
    surrounds it.

    Args:
        logits: network outputs ``(B, 1, P, P, P)``.
        y: labels ``(B, 1, P, P, P)`` (0/1).
        core: side of the averaging cube (voxels, 1 mm).
        margin: voxels (1 mm) around the labels left out, so that a nodule's
            rim is not pushed down.

    Returns:
        A scalar (0, with a gradient, when no patch has a voxel that far from its labels).
    """
    import torch.nn.functional as F

    free = _dilate((y > 0.5).float(), margin) < 0.5
    has = free.flatten(1).any(dim=1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    peak = _core_logits(logits, core).masked_fill(~free, float("-inf")).flatten(1).max(dim=1).values[has]
    return F.softplus(peak).mean()


def _core_logits(logits, core: int):
    """Logits ``(B, 1, P, P, P)`` averaged over a cube of ``core`` voxels a side (padding left out at the faces)."""
    import torch.nn.functional as F

    return F.avg_pool3d(logits, core, stride=1, padding=core // 2, count_include_pad=False) if core > 1 else logits


def _dilate(v, r: int):
    """Max of ``v`` ``(B, 1, P, P, P)`` over a ``(2r + 1)^3`` cube, one axis at a time (3 (2r + 1) reads a voxel, not (2r + 1)^3)."""
    import torch.nn.functional as F

    for k in ((2 * r + 1, 1, 1), (1, 2 * r + 1, 1), (1, 1, 2 * r + 1)):
        v = F.max_pool3d(v, k, 1, tuple(n // 2 for n in k))
    return v


def size_balanced_weights(y, reference_voxels: float, max_weight: float = 10.0):
    """Cross-entropy weights ``(B, 1, P, P, P)`` that make small nodules count more.

    The labelled voxels of a patch with ``n`` of them weigh
    ``clip(reference_voxels / n, 1, max_weight)``; every other voxel weighs 1.

    Args:
        y: labels ``(B, 1, P, P, P)`` (0/1).
        reference_voxels: labelled voxels at which the weight reaches 1 (e.g. 500, a 10 mm nodule at 1 mm).
    """
    n = y.sum(dim=(2, 3, 4), keepdim=True).clamp(min=1.0)
    return 1.0 + (y > 0) * ((reference_voxels / n).clamp(1.0, max_weight) - 1.0)


def wall_negative_weights(x, y, wall_weight: float, lung_max: float, wall_voxels: int = 4, band_voxels: int = 2, near_nodule_voxels: int = 0):
    """Cross-entropy weights ``(B, 1, P, P, P)`` that let negatives press less on the lung's wall.

    Voxels without a nodule label that lie within ``band_voxels`` of both the
    lung (intensity <= ``lung_max``) and thick tissue weigh ``wall_weight``;
    every other voxel weighs 1. Thick tissue is tissue (> ``lung_max``) that
    survives an opening with a ``2 wall_voxels + 1`` cube: chest wall,
    mediastinum, diaphragm, not vessels (as :func:`nodule_context`, with a
    cube for the ball). Negatives (lung patches, erased cubes, mined false
    responses) are full of pleura; at full weight they teach the network that
    the lung's edge is never a nodule, which is what juxtapleural nodules pay for.

    Args:
        x: intensities ``(B, 1, P, P, P)`` scaled to [0, 1] (1 mm voxels).
        y: labels ``(B, 1, P, P, P)`` (0/1).
        wall_weight: weight of the negative voxels at the wall (0-1).
        lung_max: the scaled intensity of -500 HU: at or below it is lung.
        wall_voxels: half-width of the opening cube (voxels, 4 = 4 mm).
        band_voxels: how far from the interface a voxel still counts as at the wall (voxels).
        near_nodule_voxels: when > 0, only the wall within this many voxels
            of a labelled nodule is lightened (the rest of the pleura keeps
            teaching the network at full weight); 0 = the whole wall.
    """
    tissue = (x > lung_max).float()
    thick = _dilate(-_dilate(-tissue, wall_voxels), wall_voxels)  # opening: erode, then dilate
    at_wall = _dilate(thick, band_voxels) * _dilate(1.0 - tissue, band_voxels) * (y <= 0)
    if near_nodule_voxels > 0:
        at_wall = at_wall * _dilate((y > 0).float(), near_nodule_voxels)
    return 1.0 - (1.0 - wall_weight) * at_wall


def _draw_batch(sampler: PatchSampler, batch_size: int, gen, zoom: float = 0.0):
    """One augmented batch: ``(x float32 (B, 1, P, P, P) in [0, 1], y float32 (B, 1, P, P, P))``."""
    import torch

    batch = [sampler.sample() for _ in range(batch_size)]
    x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None].astype(np.float32) / 255.0)
    y = torch.from_numpy(np.stack([b[1] for b in batch])[:, None].astype(np.float32))
    return _augment(x, y, gen, zoom)


def _batch_stream(sampler: PatchSampler, batch_size: int, seed: int, workers: int, pin_memory: bool = False, zoom: float = 0.0):
    """An endless iterator of augmented batches.

    With ``workers`` = 0 the batches are drawn in this process (the CPU
    default, reproducible from ``seed``); otherwise ``workers`` forked
    processes draw them, each with its own random streams, so that a GPU is
    not kept waiting for patches.
    """
    import torch

    if workers <= 0:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield _draw_batch(sampler, batch_size, gen, zoom)

    class _Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid = info.id if info is not None else 0
            torch.set_num_threads(1)
            sampler.rng = np.random.default_rng([seed, wid])
            gen = torch.Generator().manual_seed(seed + 7 * (wid + 1))
            while True:
                yield _draw_batch(sampler, batch_size, gen, zoom)

    loader = torch.utils.data.DataLoader(
        _Stream(), batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=4, persistent_workers=True, multiprocessing_context="fork"
    )
    yield from loader


# ----------------------------------------------------------------------------- validation


def cube_detection_stats(
    prob: np.ndarray, mask: np.ndarray, diameter_mm: float, threshold: float, min_voxels: int, spacing_mm: float = 1.0, ignore: np.ndarray | None = None
) -> tuple[bool, int]:
    """Is the cube's nodule found, and how many other candidates are there?

    A candidate (connected component of ``prob >= threshold`` with at least
    ``min_voxels`` voxels) hits when its centroid lies within the nodule's
    radius (``diameter_mm / 2``) of the reference mask's centroid.

    Args:
        prob: ``(z, y, x)`` probabilities.
        mask: ``(z, y, x)`` reference nodule mask.
        ignore: ``(z, y, x)`` bool, other nodules in the cube: a candidate touching them is not counted.
    """
    ref = np.argwhere(mask).mean(axis=0)  # z, y, x
    radius = max(diameter_mm / 2.0, 1.0)
    found, others = False, 0
    for c, voxels in _components(prob >= threshold, min_voxels):
        if np.linalg.norm((c - ref) * spacing_mm) <= radius:
            found = True
        elif ignore is None or not ignore[voxels].any():
            others += 1
    return found, others


def _cube_probability(net, cube_u8: np.ndarray, device: str) -> np.ndarray:
    """Probabilities ``(z, y, x)`` of a whole cube (uint8, e.g. 50 voxels), mirror-padded by at least 7 voxels to a multiple of 16."""
    import torch

    extra = [-(-(n + 14) // 16) * 16 - n for n in cube_u8.shape]  # 14 for 50 voxels, 16 for 48
    pads = [(e // 2, e - e // 2) for e in extra]
    x = torch.from_numpy(np.pad(cube_u8, pads, mode="reflect")[None, None].astype(np.float32) / 255.0).to(device)
    prob = torch.sigmoid(net(x)).float().cpu().numpy()[0, 0]
    return prob[tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, cube_u8.shape))]


def _validate(net, data: TrainingData, device: str, threshold: float, min_voxels: int, limit: int = 200, scans: bool = False) -> dict:
    """Validation cubes: found, other candidates per cube, stray voxels; with ``scans``, also the false responses in the training scans' lungs."""
    import torch

    idx = np.flatnonzero(data.is_val)[:limit]
    labels = data.all_masks(idx)  # only the validation cubes: this runs every --val-every steps
    found, fps, small_found, small_n, fp_voxels = 0, 0, 0, 0, 0.0
    net.eval()
    with torch.inference_mode():
        for k, i in enumerate(idx):
            prob = _cube_probability(net, data.cubes[i], device)
            others = data.other_masks[i] > 0 if data.has_other_masks else None
            f, o = cube_detection_stats(prob, data.masks[i], float(data.diameters_mm[i]), threshold, min_voxels, ignore=others)
            found += f
            fps += o
            far = ~ndimage.binary_dilation(labels[k] > 0, _ball(3))
            fp_voxels += float(((prob >= threshold) & far).mean())
            if data.diameters_mm[i] < 6:
                small_n += 1
                small_found += f
        n = max(1, len(idx))
        stats = {"val_cubes": int(len(idx)), "sensitivity": found / n, "fp_per_cube": fps / n, "sensitivity_lt6mm": small_found / max(1, small_n), "n_lt6mm": small_n,
                 "fp_voxel_fraction": fp_voxels / n}
        if scans:
            stats["scan_false_responses"] = [len(_scan_false_responses(net, scan, device, threshold, min_voxels)) for scan in data.scans]
    net.train()
    return stats


def mine_hard_negatives(net, data: TrainingData, device: str, threshold: float, min_voxels: int, roi: int = 96, found_threshold: float | None = None) -> None:
    """Record where ``net`` fires wrongly in the training cubes and scans (in place).

    A false response is a connected component of ``p >= threshold`` (at least
    ``min_voxels``) that is not on the cube's nodule, or, in a scan, not within
    15 mm of anything an LIDC reader marked. With ``found_threshold`` it also
    records, in ``data.missed``, the training nodules that ``net`` does not
    find at that threshold (:func:`cube_detection_stats`): the hard positives.
    """
    import torch

    net.eval()
    hard_cube, hard_scan = [], []
    missed = np.zeros(len(data.cubes), bool)
    with torch.inference_mode():
        labels = data.all_masks()
        for i in np.flatnonzero(~data.is_val):
            prob = _cube_probability(net, data.cubes[i], device)
            for c in _false_components(prob, threshold, min_voxels, keep_out=labels[i] > 0):
                hard_cube.append([int(i), *c])
            if found_threshold is not None:
                missed[i] = not cube_detection_stats(prob, data.masks[i], float(data.diameters_mm[i]), found_threshold, min_voxels)[0]
        for s, scan in enumerate(data.scans):
            hard_scan.extend([s, *zyx] for zyx in _scan_false_responses(net, scan, device, threshold, min_voxels, roi))
    net.train()
    data.hard_cube = np.array(hard_cube, np.int32).reshape(-1, 4)
    data.hard_scan = np.array(hard_scan, np.int32).reshape(-1, 4)
    data.meta["hard_negatives"] = {"cubes": len(hard_cube), "scans": len(hard_scan), "threshold": threshold}
    log.info("hard negatives: %d in training cubes, %d in scans", len(hard_cube), len(hard_scan))
    if found_threshold is not None:
        data.missed = missed
        data.meta["missed_nodules"] = {"count": int(missed.sum()), "training_nodules": int((~data.is_val).sum()), "threshold": found_threshold}
        log.info("missed nodules: %d of %d training nodules not found at %.2f", int(missed.sum()), int((~data.is_val).sum()), found_threshold)


def _scan_false_responses(net, scan: tuple, device: str, threshold: float, min_voxels: int, roi: int = 96) -> list[list[int]]:
    """Centres ``[z, y, x]`` where ``net`` fires in a scan's lungs more than 15 mm from anything an LIDC reader marked.

    Args:
        scan: ``(volume uint8 (z, y, x), lung mask, reader marks (M, 3) zyx voxels)`` as in :class:`TrainingData`.
    """
    import torch
    from monai.inferers import sliding_window_inference

    vol, lung, pts = scan
    nz = np.argwhere(lung)
    lo, hi = nz.min(0), nz.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    x = torch.from_numpy(vol[box][None, None].astype(np.float32) / 255.0)
    with torch.inference_mode():
        prob = sliding_window_inference(x, (roi,) * 3, 2, lambda t: torch.sigmoid(net(t.to(device))).float().cpu(), overlap=0.25, mode="gaussian")[0, 0].numpy()
    prob *= lung[box] > 0
    out = []
    for c in _false_components(prob, threshold, min_voxels):
        zyx = np.array(c) + lo
        if len(pts) == 0 or np.min(np.linalg.norm(pts - zyx, axis=1)) > 15:
            out.append([int(v) for v in zyx])
    return out


def _false_components(prob: np.ndarray, threshold: float, min_voxels: int, keep_out: np.ndarray | None = None) -> list[list[int]]:
    """Centres ``[z, y, x]`` of components of ``prob >= threshold`` that do not touch ``keep_out``."""
    return [[int(round(v)) for v in c] for c, voxels in _components(prob >= threshold, min_voxels) if keep_out is None or not keep_out[voxels].any()]


def _soft_mask(mask: np.ndarray) -> np.ndarray:
    """A binary mask blurred (Gaussian, 1 voxel; it reaches 4 voxels past the mask) and raised so that it is about 1 inside: float32 in [0, 1], how much of a nodule shows at each voxel when it is pasted or faded."""
    return np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 1.0, mode="constant") * 1.6, 0, 1)


def _ball(radius: int) -> np.ndarray:
    """Ball structuring element of ``radius`` voxels (the same voxels as ITK's flat ball kernel)."""
    r = np.arange(-radius, radius + 1)
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    return np.sqrt(x * x + y * y + z * z) <= radius + 0.5


def _thick_tissue(vol_u8: np.ndarray, lung_max_u8: int) -> np.ndarray:
    """Chest wall, mediastinum and diaphragm of a uint8 patch: soft tissue (above the lung's upper bound) that survives an opening with a 3-voxel ball, which vessels do not."""
    return ndimage.binary_opening(vol_u8 > lung_max_u8, _ball(3))


def _components(binary: np.ndarray, min_voxels: int) -> list[tuple[np.ndarray, tuple]]:
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


# ----------------------------------------------------------------------------- training


def _init_record(init) -> dict | None:
    """The training record of the model a run started from (kept so the chain of runs stays documented)."""
    if not init:
        return None
    meta = Path(init).with_suffix(".json")
    if not meta.exists():
        return None
    record = json.loads(meta.read_text()).get("training", {})
    record.pop("history", None)
    return record


def train(
    data: TrainingData,
    output: str | os.PathLike,
    spec: ModelSpec | None = None,
    steps: int = 4000,
    max_minutes: float | None = None,
    batch_size: int = 16,
    patch: int = 48,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    val_every: int = 250,
    init: str | os.PathLike | None = None,
    command: str = "",
    mine_hard: bool = False,
    mine_threshold: float = 0.3,
    attached_weight: float = 1.0,
    workers: int = 0,
    mine_with: str | os.PathLike | None = None,
    mix: Sequence[float] = (0.3, 0.25, 0.15, 0.3),
    fp_weight: float = 0.05,
    scan_fp_weight: float = 0.0,
    faint_fraction: float = 0.0,
    small_weight: float = 2.0,
    ema: float = 0.0,
    size_balance_voxels: float = 0.0,
    faint_weight: float = 1.0,
    save_last: bool = False,
    pleural_fraction: float = 0.0,
    missed_weight: float = 1.0,
    wall_negative_weight: float = 1.0,
    wall_near_nodule_voxels: int = 0,
    fade_fraction: float = 0.0,
    zoom: float = 0.0,
    peak_weight: float = 0.0,
    background_peak_weight: float = 0.0,
) -> dict:
    """Train and save the best model (by validation sensitivity minus false candidates).

    Loss: binary cross-entropy with logits + soft Dice (batch-wise). AdamW
    with a cosine learning-rate decay over ``steps`` or ``max_minutes``,
    whichever ends first. Under ``torchrun`` each process trains on its own
    GPU with DistributedDataParallel; rank 0 validates and saves. With
    ``workers`` > 0 that many processes draw the patches (Linux, fork).

    The checkpoint kept is the one with the best validation score: sensitivity
    on the validation cubes - ``fp_weight`` x other candidates per cube - 5 x
    stray-voxel fraction - ``scan_fp_weight`` x false responses in the
    training scans' lungs (counted only when ``scan_fp_weight`` > 0; a
    training-data figure, so it steers the choice of checkpoint towards
    quiet full scans but says nothing about unseen scans).

    ``mix``: fractions of (nodule cube crops, pasted nodules in erased cubes,
    erased cubes alone, full-scan lung patches) in each batch.
    ``small_weight``: nodules under 6 mm are drawn (and pasted) this many times as often.
    ``faint_weight``: nodules whose mask averages below :data:`FAINT_MEAN_HU` are drawn (and pasted) this many times as often.
    ``missed_weight``: with ``mine_hard``, the training nodules that the
    mining model does not find at ``spec.threshold`` are drawn this many times
    as often (hard positives).
    ``pleural_fraction``: this fraction of pasted nodules is placed against
    the chest wall, mediastinum or diaphragm of the patch (juxtapleural), its
    mask cut at the wall.
    ``fade_fraction``: this fraction of the nodule-cube crops shows its real
    nodules faded in place to 35-70 % of their contrast
    (:meth:`PatchSampler._fade`): faint nodules against their own pleura and
    vessels.
    ``zoom``: when > 0, half of the batches are rescaled about their centre
    by a factor drawn log-uniformly in ``[1 / (1 + zoom), 1 + zoom]``
    (:func:`_zoom`), so that the network meets nodules, vessels and pleura
    at sizes and voxel spacings it would otherwise not.
    ``peak_weight``: when > 0, this times :func:`peak_loss` is added to the
    loss: the best 3 mm core inside each labelled patch is pushed up.
    ``background_peak_weight``: when > 0, this times
    :func:`background_peak_loss` is added to the loss: the best 3 mm core
    more than 3 mm from the labels of each patch is pushed down.
    ``size_balance_voxels``: when > 0, the cross-entropy weighs the labelled
    voxels of small nodules more (:func:`size_balanced_weights`).
    ``wall_negative_weight``: when < 1, the cross-entropy weighs the
    unlabelled voxels where lung meets chest wall, mediastinum or diaphragm
    this much (:func:`wall_negative_weights`); with
    ``wall_near_nodule_voxels`` > 0 only within that many voxels of a
    labelled nodule.
    ``ema``: when > 0, an exponential moving average of the weights (and of
    the batch-norm statistics) with this decay per step, starting at the
    initial weights, is what is validated and saved; it smooths the
    step-to-step swings of a short fine-tune.
    ``save_last``: also save the weights of the last step as
    ``<output stem>_last.json/.pt`` (record: ``checkpoint: "last"`` and
    ``last_validation``), chosen by nothing but the end of the run, e.g. as
    an ingredient of an average (``lungnoduleai average``).

    Returns:
        The final training record (also stored in the model's JSON).
    """
    import torch
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    from .model import resolve_device

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        dev = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
    else:
        dev = resolve_device(device)
    spec = spec or ModelSpec()
    torch.manual_seed(seed + rank)
    net = build_network(spec).to(dev)
    if init:
        net.load_state_dict(read_weights(Path(init).with_suffix(".pt")))
    min_voxels = max(1, int(round(spec.min_volume_mm3 / float(np.prod(spec.spacing_mm)))))
    if not 0.0 <= wall_negative_weight <= 1.0:
        raise ValueError(f"wall_negative_weight={wall_negative_weight} must lie between 0 and 1")
    if not 0.0 <= fade_fraction <= 1.0:
        raise ValueError(f"fade_fraction={fade_fraction} is a fraction of the nodule-cube crops and must lie between 0 and 1")
    if peak_weight < 0:
        raise ValueError(f"peak_weight={peak_weight} must be >= 0 (0 = off)")
    if background_peak_weight < 0:
        raise ValueError(f"background_peak_weight={background_peak_weight} must be >= 0 (0 = off)")
    if not 0.0 <= zoom <= 1.0:
        raise ValueError(f"zoom={zoom} must lie between 0 (off) and 1 (factors 0.5-2); e.g. 0.25 for factors 0.8-1.25")
    if wall_near_nodule_voxels < 0:
        raise ValueError(f"wall_near_nodule_voxels={wall_near_nodule_voxels} must be >= 0 (0 = the whole wall)")
    if missed_weight != 1.0 and not mine_hard:
        raise ValueError(f"missed_weight={missed_weight} needs mine_hard=True: the missed nodules are found by the mining run")
    if mine_hard:
        miner = net
        if mine_with:  # another model's false responses (e.g. the bundled model's, for a network trained afresh)
            miner = build_network(spec).to(dev)
            miner.load_state_dict(read_weights(Path(mine_with).with_suffix(".pt")))
        mine_hard_negatives(miner, data, dev, mine_threshold, min_voxels, found_threshold=spec.threshold if missed_weight != 1.0 else None)
        data.meta["hard_negatives"]["model"] = str(mine_with or init)
        del miner
    if distributed:
        if dev.startswith("cuda"):  # SyncBatchNorm works on GPUs only
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev] if dev.startswith("cuda") else None)
    model = getattr(net, "module", net)  # the network itself, also under DistributedDataParallel
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    dice = DiceLoss(sigmoid=True, batch=True)
    lung_max = int(scale_intensity_uint8(np.array([-500.0]), spec.hu_window)[0])
    sampler = PatchSampler(
        data, patch, seed * 7919 + rank, lung_max, mix=mix, attached_weight=attached_weight, hu_window=spec.hu_window, faint_fraction=faint_fraction, small_weight=small_weight,
        faint_weight=faint_weight, pleural_fraction=pleural_fraction, missed_weight=missed_weight, fade_fraction=fade_fraction,
    )
    averaged = None
    if ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
        averaged.update_parameters(model)  # the average starts at the initial (e.g. --init) weights
    use_amp = dev.startswith("cuda")
    if use_amp:
        torch.backends.cudnn.benchmark = True
    stream = _batch_stream(sampler, batch_size, seed * 1000 + rank, workers, pin_memory=use_amp, zoom=zoom)
    loss_terms = ["BCEWithLogits + soft Dice (batch)"]
    if size_balance_voxels > 0:
        loss_terms.append(f"nodule voxels weighted by clip({size_balance_voxels:g}/n, 1, 10)")
    if wall_negative_weight != 1.0:
        near = f" within {wall_near_nodule_voxels} voxels of a nodule" if wall_near_nodule_voxels > 0 else ""
        loss_terms.append(f"unlabelled voxels at the lung's wall weighted {wall_negative_weight:g}{near}")
    if peak_weight > 0:
        loss_terms.append(f"+ {peak_weight:g} x -log sigmoid(best 3 mm core inside the labels) per labelled patch")
    if background_peak_weight > 0:
        loss_terms.append(f"+ {background_peak_weight:g} x -log(1 - sigmoid(best 3 mm core over 3 mm from the labels)) per patch")
    loss_description = ", ".join(loss_terms)
    t0 = time.time()
    best, best_score, history = None, -1e9, []
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.stem + "_training_log.jsonl")
    for step in range(1, steps + 1):
        elapsed = (time.time() - t0) / 60.0
        frac = step / steps
        if max_minutes:
            frac = min(1.0, max(frac, elapsed / max_minutes))
        for g in opt.param_groups:
            g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        x, y = next(stream)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = net(x)
        logits = logits.float()
        weight = size_balanced_weights(y, size_balance_voxels) if size_balance_voxels > 0 else None
        if wall_negative_weight != 1.0:
            wall = wall_negative_weights(x, y, wall_negative_weight, lung_max / 255.0, near_nodule_voxels=wall_near_nodule_voxels)
            weight = wall if weight is None else weight * wall
        loss = F.binary_cross_entropy_with_logits(logits, y, weight=weight) + dice(logits, y)
        if peak_weight > 0:
            loss = loss + peak_weight * peak_loss(logits, y)
        if background_peak_weight > 0:
            loss = loss + background_peak_weight * background_peak_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if averaged is not None:
            averaged.update_parameters(model)
        last = step == steps or (max_minutes is not None and (time.time() - t0) / 60.0 >= max_minutes)
        if distributed:  # every rank stops at the same step (rank 0's clock decides)
            flag = torch.tensor([1.0 if last else 0.0], device=dev)
            torch.distributed.broadcast(flag, src=0)
            last = bool(flag.item())
        if rank == 0 and (step % val_every == 0 or last):
            kept = averaged.module if averaged is not None else model
            stats = _validate(kept, data, dev, spec.threshold, min_voxels, scans=scan_fp_weight > 0)
            stats.update(step=step, minutes=round((time.time() - t0) / 60.0, 2), loss=round(float(loss.item()), 4), lr=opt.param_groups[0]["lr"])
            history.append(stats)
            with open(log_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
            log.info("step %d: %s", step, stats)
            score = stats["sensitivity"] - fp_weight * stats["fp_per_cube"] - 5.0 * stats["fp_voxel_fraction"] - scan_fp_weight * sum(stats.get("scan_false_responses", []))
            if score > best_score:
                best_score, best = score, dict(stats)
                spec.training = {
                    "command": command,
                    "seed": seed,
                    "data": data.meta,
                    "patch": patch,
                    "batch_size": batch_size,
                    "lr": lr,
                    "loss": loss_description,
                    "optimizer": "AdamW, weight decay 1e-4, cosine decay",
                    "device": dev,
                    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                    "workers": workers,
                    "mix": [float(v) for v in mix],
                    "attached_weight": attached_weight,
                    "faint_fraction": faint_fraction,
                    "small_weight": small_weight,
                    "faint_weight": faint_weight,
                    "pleural_fraction": pleural_fraction,
                    "fade_fraction": fade_fraction,
                    "zoom": zoom,
                    "peak_weight": peak_weight,
                    "background_peak_weight": background_peak_weight,
                    "missed_weight": missed_weight,
                    "wall_negative_weight": wall_negative_weight,
                    "wall_near_nodule_voxels": wall_near_nodule_voxels,
                    "ema": ema,
                    "size_balance_voxels": size_balance_voxels,
                    "selection": {"fp_weight": fp_weight, "scan_fp_weight": scan_fp_weight, "threshold": spec.threshold},
                    "init": str(init) if init else None,
                    "init_training": _init_record(init),
                    "best_validation": best,
                }
                save_model(kept, spec, out)
        if last:
            break
    stream.close()  # stops the patch workers
    if rank == 0 and best is not None:
        spec.training["history"] = history
        spec.training["total_minutes"] = round((time.time() - t0) / 60.0, 2)
        spec.to_json(out)
        if save_last:
            last_record = {k: v for k, v in spec.training.items() if k != "best_validation"}
            last_record.update(checkpoint="last", last_validation=history[-1])
            save_model(kept, replace(spec, training=last_record), out.with_name(out.stem + "_last.json"))
    if distributed:  # tear down together: the other ranks wait here until rank 0 has validated and saved
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return spec.training

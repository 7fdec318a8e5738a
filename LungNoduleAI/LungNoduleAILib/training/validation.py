"""Validation on held-out cubes and hard-negative mining: what the network finds and what it wrongly finds."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from .data import TrainingData
from .masks import ball, components

log = logging.getLogger(__name__)


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
    for c, voxels in components(prob >= threshold, min_voxels):
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
            far = ~ndimage.binary_dilation(labels[k] > 0, ball(3))
            fp_voxels += float(((prob >= threshold) & far).mean())
            if data.diameters_mm[i] < 6:
                small_n += 1
                small_found += f
        n = max(1, len(idx))
        stats = {
            "val_cubes": int(len(idx)),
            "sensitivity": found / n,
            "fp_per_cube": fps / n,
            "sensitivity_lt6mm": small_found / max(1, small_n),
            "n_lt6mm": small_n,
            "fp_voxel_fraction": fp_voxels / n,
        }
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
    return [[int(round(v)) for v in c] for c, voxels in components(prob >= threshold, min_voxels) if keep_out is None or not keep_out[voxels].any()]

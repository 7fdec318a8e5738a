"""Training patches: nodule cubes cropped off-centre, nodules pasted into erased cubes and scan lungs, nodule-free patches; batches drawn in this process
or by workers.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..intensity import uint8_to_hu
from .augment import augment_batch
from .data import FAINT_MEAN_HU, TrainingData, nodule_context, nodule_density
from .masks import ball, soft_mask, thick_tissue

log = logging.getLogger(__name__)


class PatchSampler:
    """Draws ``(image uint8 (P, P, P), label uint8 (P, P, P))`` training patches."""

    def __init__(
        self,
        data: TrainingData,
        patch: int,
        seed: int,
        lung_max_u8: int,
        mix: Sequence[float] = (0.3, 0.25, 0.15, 0.3),
        attached_weight: float = 1.0,
        hu_window: Sequence[float] = (-1000.0, 400.0),
        faint_fraction: float = 0.0,
        small_weight: float = 2.0,
        faint_weight: float = 1.0,
        pleural_fraction: float = 0.0,
        missed_weight: float = 1.0,
        fade_fraction: float = 0.0,
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
                raise ValueError(
                    f"missed_weight={missed_weight} needs the missed nodules of a mining run (mine_hard_negatives with found_threshold); this data has "
                    f"{len(data.missed)} flags for {len(data.cubes)} cubes"
                )
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
            self.scan_centres.append((np.argwhere(lung_b)[::7], np.argwhere(dense)[::3], pts))

    def _erase(self, cube: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The cube without its nodule: the mask (dilated by 2 voxels) filled with lung parenchyma.

        Erased voxels clearly nearer thick tissue (chest wall, mediastinum,
        diaphragm: soft tissue surviving an opening with a 3-voxel ball)
        than lung take the nearest wall voxel's value instead, so a
        juxtapleural nodule leaves a smooth pleura, neither a lung-coloured
        dent in the wall nor a bump on it.
        """
        m = ndimage.binary_dilation(mask > 0, ball(2))
        out = cube.copy()
        lung_vals = cube[(cube < self.lung_max_u8) & (m == 0)]
        fill = np.median(lung_vals) if lung_vals.size else self.lung_max_u8 // 2
        noise = self.rng.normal(0, 4, size=int(m.sum()))
        values = fill + noise
        nz = np.argwhere(m)
        box = tuple(slice(max(0, a - 8), b + 9) for a, b in zip(nz.min(0), nz.max(0)))  # the mask and 8 voxels around it
        c, mb = cube[box], m[box]
        thick = thick_tissue(np.where(mb, 0, c), self.lung_max_u8)
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
        # soft_mask reaches 4 voxels past a mask, and the opening that finds the wall looks 6 further: the same result as on the whole cube
        box = tuple(slice(max(0, a - 10), b + 11) for a, b in zip(nz.min(0), nz.max(0)))
        mask = self.labels[i][box] > 0
        cube, erased = self.cubes[i][box].astype(np.float32), self.erased[i][box].astype(np.float32)
        blend = soft_mask(mask)
        blend[thick_tissue(np.where(mask, 0, self.cubes[i][box]), self.lung_max_u8) & ~mask] = 0.0  # the wall next to a nodule stays as it is
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
        blend = soft_mask(m)
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
                    if not (vol[a[0] : b[0], a[1] : b[1], a[2] : b[2]] > self.lung_max_u8 + 40).any():
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
        thick = thick_tissue(vol, self.lung_max_u8)
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


def _draw_batch(sampler: PatchSampler, batch_size: int, gen, zoom: float = 0.0):
    """One augmented batch: ``(x float32 (B, 1, P, P, P) in [0, 1], y float32 (B, 1, P, P, P))``."""
    import torch

    batch = [sampler.sample() for _ in range(batch_size)]
    x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None].astype(np.float32) / 255.0)
    y = torch.from_numpy(np.stack([b[1] for b in batch])[:, None].astype(np.float32))
    return augment_batch(x, y, gen, zoom)


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

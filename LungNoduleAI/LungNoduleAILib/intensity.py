"""HU windowing: the one intensity scaling of the network's input (numpy only, no SimpleITK)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["scale_intensity", "scale_intensity_uint8", "uint8_to_hu"]


def scale_intensity(array_hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """Clip HU to ``window_hu = (low, high)`` and scale linearly to [0, 1] (float32)."""
    low, high = float(window_hu[0]), float(window_hu[1])
    out = np.clip(array_hu, low, high).astype(np.float32, copy=False)
    out -= low
    out *= 1.0 / (high - low)
    return out


def scale_intensity_uint8(array_hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """Like :func:`scale_intensity` but quantised to uint8 0..255 (for compact data packs)."""
    return np.round(scale_intensity(array_hu, window_hu) * 255.0).astype(np.uint8)


def uint8_to_hu(array_u8: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """The inverse of :func:`scale_intensity_uint8`: 0..255 back to HU within ``window_hu`` (float32)."""
    low, high = float(window_hu[0]), float(window_hu[1])
    return np.asarray(array_u8).astype(np.float32) * ((high - low) / 255.0) + low

"""Sliding-window inference with progress and cancel callbacks."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["DetectionCancelled", "count_windows", "sliding_window_probability", "SlidingWindowPredictor"]

ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, stage)``."""
CancelCallback = Callable[[], bool]
"""``should_cancel() -> True`` to stop as soon as possible."""


class DetectionCancelled(Exception):
    """Raised when ``should_cancel()`` returned True; no output files are left behind."""


def count_windows(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's ``sliding_window_inference`` visits for one image.

    Args:
        image_size: spatial size ``(z, y, x)`` (after padding to ``roi_size``).
        roi_size: window size ``(z, y, x)``.
        overlap: overlap fraction in [0, 1).
    """
    total = 1
    for size, roi in zip(image_size, roi_size):
        size = max(size, roi)
        interval = max(int(roi * (1 - overlap)), 1)
        total *= int(math.ceil(max(size - roi, 0) / interval)) + 1
    return total


class SlidingWindowPredictor:
    """Probability map of a whole volume with a network, window by window.

    Args:
        network: ``torch.nn.Module`` mapping ``(B, 1, z, y, x)`` to logits of the same shape.
        roi_size: window size ``(z, y, x)`` in voxels.
        overlap: window overlap fraction.
        device: torch device string the network sits on (``cpu``, ``cuda``...).
        sw_batch_size: windows per forward pass; ``None`` picks from free GPU memory (1 on CPU).
        flip_axes: test-time flips: each entry is a tuple of spatial axes (0 = z, 1 = y,
            2 = x) to flip a window along; the window's probability is the mean over the
            unflipped window and each flipped one (flipped back). Each entry costs one more
            forward pass per window. Empty: no test-time augmentation.
    """

    def __init__(
        self,
        network,
        roi_size: Sequence[int],
        overlap: float = 0.25,
        device: str = "cpu",
        sw_batch_size: int | None = None,
        flip_axes: Sequence[Sequence[int]] = (),
    ):
        self.network = network
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = overlap
        self.device = device
        self.sw_batch_size = sw_batch_size or self._auto_batch()
        self.flip_axes = tuple(tuple(int(a) for a in axes) for axes in flip_axes)
        for axes in self.flip_axes:
            if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
                raise ValueError(f"Test-time flip axes {list(axes)} are not valid: give distinct spatial axes among 0 (z), 1 (y), 2 (x).")

    def _auto_batch(self) -> int:
        import torch

        if not self.device.startswith("cuda"):
            return 1
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        per_window = 1.2e3 * float(np.prod(self.roi_size))  # bytes, measured order of magnitude with fp16 activations
        return int(max(1, min(16, free * 0.5 // per_window)))

    def __call__(self, volume: np.ndarray, progress: ProgressCallback | None = None, should_cancel: CancelCallback | None = None) -> np.ndarray:
        """Run the network over ``volume``.

        Args:
            volume: ``(z, y, x)`` float32 intensities already scaled as the model expects.
            progress: called as ``progress(done_windows, total_windows, "inference")``.
            should_cancel: polled before each batch of windows.

        Returns:
            ``(z, y, x)`` float32 probabilities in [0, 1].

        Raises:
            DetectionCancelled: when ``should_cancel()`` returned True.
        """
        import torch
        from monai.inferers import sliding_window_inference

        # Volumes smaller than a window (e.g. a nodule cube) are padded here with mirrored
        # tissue rather than by MONAI with zeros: a wall of air around them looks like a
        # lung edge to the network and makes false candidates.
        shape = volume.shape
        pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(shape, self.roi_size)]
        if any(a or b for a, b in pads):
            mode = "reflect" if all(max(a, b) < s for (a, b), s in zip(pads, shape)) else "edge"
            volume = np.pad(volume, pads, mode=mode)
        padded = [max(s, r) for s, r in zip(volume.shape, self.roi_size)]
        total = count_windows(padded, self.roi_size, self.overlap)
        done = [0]
        use_amp = self.device.startswith("cuda")

        def predictor(x):
            if should_cancel is not None and should_cancel():
                raise DetectionCancelled("Detection cancelled by the user.")
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                prob = torch.sigmoid(self.network(x).float())
                for axes in self.flip_axes:
                    dims = [a + 2 for a in axes]
                    prob += torch.sigmoid(self.network(x.flip(dims)).float()).flip(dims)
            done[0] = min(total, done[0] + x.shape[0])
            if progress is not None:
                progress(done[0], total, "inference")
            return prob / (1 + len(self.flip_axes))

        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        with torch.inference_mode():
            prob = sliding_window_inference(
                x,
                roi_size=self.roi_size,
                sw_batch_size=self.sw_batch_size,
                predictor=predictor,
                overlap=self.overlap,
                mode="gaussian",
                sw_device=self.device,
                device="cpu",
            )
        out = prob[0, 0].numpy()
        if any(a or b for a, b in pads):
            out = out[tuple(slice(a, a + s) for (a, _), s in zip(pads, shape))]
        return np.ascontiguousarray(out, dtype=np.float32)


def sliding_window_probability(
    network,
    volume: np.ndarray,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    should_cancel: CancelCallback | None = None,
    sw_batch_size: int | None = None,
    flip_axes: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """Function form of :class:`SlidingWindowPredictor` (same arguments, same result)."""
    return SlidingWindowPredictor(network, roi_size, overlap, device, sw_batch_size, flip_axes)(volume, progress, should_cancel)

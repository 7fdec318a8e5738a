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
        flip_min_probability: when set, the flipped passes run only where they can
            matter: around each region of the plain pass's ``p >= 0.5`` that reaches
            this probability (its bounding box plus ``flip_context`` voxels of context).
            Elsewhere the probability is the plain pass's. With one flip, an averaged
            ``p >= t`` needs a plain ``p >= 2 t - 1``, so 0.8 serves a threshold of 0.9.
            ``None``, or a volume that fits in one window: flip every window (a full
            pass per flip).
        flip_context: voxels of context around each region for the flipped passes.
    """

    def __init__(
        self,
        network,
        roi_size: Sequence[int],
        overlap: float = 0.25,
        device: str = "cpu",
        sw_batch_size: int | None = None,
        flip_axes: Sequence[Sequence[int]] = (),
        flip_min_probability: float | None = None,
        flip_context: int = 24,
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
        if flip_min_probability is not None and not 0.5 <= flip_min_probability < 1.0:
            raise ValueError(
                f"flip_min_probability {flip_min_probability} is outside [0.5, 1): give the plain-pass probability a region must reach to be flipped, e.g. 0.8."
            )
        self.flip_min_probability = flip_min_probability
        self.flip_context = int(flip_context)

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
        if not self.flip_axes or self.flip_min_probability is None or all(s <= r for s, r in zip(volume.shape, self.roi_size)):
            return self._windows(volume, self.flip_axes, progress, should_cancel)  # everywhere (one window: as cheap, and padded alike)
        prob = self._windows(volume, (), progress, should_cancel)
        return self._flip_regions(volume, prob, should_cancel)

    def _flip_regions(self, volume: np.ndarray, plain: np.ndarray, should_cancel: CancelCallback | None) -> np.ndarray:
        """``plain`` with the flipped passes averaged in over each region of ``p >= 0.5`` that reaches ``flip_min_probability``."""
        from scipy import ndimage

        regions, _ = ndimage.label(plain >= 0.5)
        out = plain.copy()
        c = self.flip_context
        for k, box in enumerate(ndimage.find_objects(regions)):
            if box is None or plain[box][regions[box] == k + 1].max() < self.flip_min_probability:
                continue
            if should_cancel is not None and should_cancel():
                raise DetectionCancelled("Detection cancelled by the user.")
            outer = tuple(slice(max(0, b.start - c), min(n, b.stop + c)) for b, n in zip(box, volume.shape))
            flipped = self._flipped(volume[outer], should_cancel)
            inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))
            out[box] = (plain[box] + len(self.flip_axes) * flipped[inner]) / (1 + len(self.flip_axes))
        return out

    def _flipped(self, crop: np.ndarray, should_cancel: CancelCallback | None) -> np.ndarray:
        """Mean of the flipped passes over ``crop``: one network pass per flip, the crop mirror-padded to a multiple of
        the largest power of two dividing every window side; a crop bigger than a window goes window by window."""
        import torch

        m = min(r & -r for r in self.roi_size)
        target = [max(m, -(-s // m) * m) for s in crop.shape]
        if any(t > r for t, r in zip(target, self.roi_size)):
            return self._windows(crop, self.flip_axes, None, should_cancel, plain_pass=False)
        pads = [((t - s) // 2, t - s - (t - s) // 2) for s, t in zip(crop.shape, target)]
        mode = "reflect" if all(max(a, b) < s for (a, b), s in zip(pads, crop.shape)) else "edge"
        x = torch.from_numpy(np.pad(crop, pads, mode=mode).astype(np.float32))[None, None].to(self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.device.startswith("cuda")):
            prob = self._mean_of_passes(x, self.flip_axes, plain_pass=False)[0, 0].cpu().numpy()
        return np.ascontiguousarray(prob[tuple(slice(a, a + s) for (a, _), s in zip(pads, crop.shape))], dtype=np.float32)

    def _mean_of_passes(self, x, flip_axes: Sequence[Sequence[int]], plain_pass: bool):
        """Mean probability ``(B, 1, z, y, x)`` over the plain pass on ``x`` (when ``plain_pass``) and the passes flipped along each of ``flip_axes``
        (flipped back).
        """
        import torch

        prob = torch.sigmoid(self.network(x).float()) if plain_pass else torch.zeros(x.shape, device=x.device)
        for axes in flip_axes:
            dims = [a + 2 for a in axes]
            prob += torch.sigmoid(self.network(x.flip(dims)).float()).flip(dims)
        return prob / (int(plain_pass) + len(flip_axes))

    def _windows(
        self,
        volume: np.ndarray,
        flip_axes: Sequence[Sequence[int]],
        progress: ProgressCallback | None,
        should_cancel: CancelCallback | None,
        plain_pass: bool = True,
    ) -> np.ndarray:
        """Sliding-window mean of the plain pass (``plain_pass``) and the passes flipped along each of ``flip_axes``."""
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
                prob = self._mean_of_passes(x, flip_axes, plain_pass)
            done[0] = min(total, done[0] + x.shape[0])
            if progress is not None:
                progress(done[0], total, "inference")
            return prob

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
    flip_min_probability: float | None = None,
    flip_context: int = 24,
) -> np.ndarray:
    """Function form of :class:`SlidingWindowPredictor` (same arguments, same result)."""
    return SlidingWindowPredictor(network, roi_size, overlap, device, sw_batch_size, flip_axes, flip_min_probability, flip_context)(
        volume, progress, should_cancel
    )

"""Sliding-window inference with a real tiny network: shape, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest

from LungNoduleAILib.inference import DetectionCancelled, SlidingWindowPredictor, count_windows, sliding_window_probability


def test_probability_shape_range_and_progress(tiny_model):
    vol = np.random.default_rng(0).random((40, 70, 50)).astype(np.float32)
    calls = []
    prob = sliding_window_probability(tiny_model.network, vol, (32, 32, 32), 0.25, "cpu", progress=lambda d, t, s: calls.append((d, t, s)))
    assert prob.shape == vol.shape and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    total = count_windows(vol.shape, (32, 32, 32), 0.25)
    assert total == 2 * 3 * 2
    assert [c[0] for c in calls] == list(range(1, total + 1))
    assert all(c[1] == total and c[2] == "inference" for c in calls)


def test_function_and_class_agree(tiny_model):
    vol = np.random.default_rng(1).random((32, 40, 36)).astype(np.float32)
    a = sliding_window_probability(tiny_model.network, vol, (32, 32, 32))
    b = SlidingWindowPredictor(tiny_model.network, (32, 32, 32))(vol)
    np.testing.assert_array_equal(a, b)


def test_volume_smaller_than_window(tiny_model):
    vol = np.zeros((10, 20, 30), np.float32)
    prob = SlidingWindowPredictor(tiny_model.network, (32, 32, 32))(vol)
    assert prob.shape == (10, 20, 30)


def test_cancel_raises(tiny_model):
    vol = np.zeros((64, 64, 64), np.float32)
    seen = []

    def should_cancel():
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(DetectionCancelled):
        SlidingWindowPredictor(tiny_model.network, (32, 32, 32))(vol, should_cancel=should_cancel)
    assert len(seen) == 3

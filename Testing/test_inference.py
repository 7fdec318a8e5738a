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


def test_test_time_flips_average_the_flipped_passes(tiny_model):
    """flip_axes: one window's probability is the mean of the plain pass and each pass on the flipped window, flipped back."""
    vol = np.random.default_rng(2).random((32, 32, 32)).astype(np.float32)
    plain = SlidingWindowPredictor(tiny_model.network, (32, 32, 32))
    flipped_x = np.flip(plain(np.flip(vol, 2).copy()), 2)
    flipped_zy = np.flip(plain(np.flip(vol, (0, 1)).copy()), (0, 1))
    assert np.abs(flipped_x - plain(vol)).max() > 1e-3  # a random network is not symmetric: the test can tell
    tta = SlidingWindowPredictor(tiny_model.network, (32, 32, 32), flip_axes=[[2], [0, 1]])(vol)
    np.testing.assert_allclose(tta, (plain(vol) + flipped_x + flipped_zy) / 3, atol=1e-6)
    assert tta.shape == vol.shape and tta.dtype == np.float32


@pytest.mark.parametrize("axes", [[3], [], [1, 1]])
def test_test_time_flips_refuse_bad_axes(tiny_model, axes):
    with pytest.raises(ValueError, match="Test-time flip axes"):
        SlidingWindowPredictor(tiny_model.network, (32, 32, 32), flip_axes=[axes])


def _one_sided_conv():
    """A 3x3x3 convolution that looks at each voxel and its +x neighbour only: flipping along x changes its answer at a blob's x edges."""
    import torch

    net = torch.nn.Conv3d(1, 1, 3, padding=1)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0, 1, 1, 1] = 6.0
        net.weight[0, 0, 1, 1, 2] = 4.0
        net.bias.fill_(-5.0)
    return net.eval()


def test_local_flips_run_only_around_regions_that_reach_the_probability():
    """flip_min_probability: the flipped pass is averaged in over each p >= 0.5 region whose peak reaches it, and nowhere else."""
    vol = np.zeros((64, 64, 64), np.float32)
    vol[10:16, 10:16, 10:16] = 1.0  # plain p 0.99 inside: flipped
    vol[40:46, 40:46, 40:46] = 0.6  # plain p 0.73 at most: left as it is
    net = _one_sided_conv()
    plain = SlidingWindowPredictor(net, (32, 32, 32))(vol)
    full = SlidingWindowPredictor(net, (32, 32, 32), flip_axes=[[2]])(vol)
    local = SlidingWindowPredictor(net, (32, 32, 32), flip_axes=[[2]], flip_min_probability=0.8, flip_context=4)(vol)
    assert 0.8 <= plain[10:16, 10:16, 10:16].max() and 0.5 <= plain[40:46, 40:46, 40:46].max() < 0.8
    a = (slice(10, 16),) * 3  # the box of the strong blob's p >= 0.5 region
    assert np.abs(full[a] - plain[a]).max() > 0.1  # the flip matters there: the test can tell
    np.testing.assert_allclose(local[a], full[a], atol=1e-6)  # the network sees 1 voxel around, 4 voxels of context suffice
    outside = np.ones(vol.shape, bool)
    outside[a] = False
    assert np.abs(full - plain)[outside].max() > 0.1  # full flips change voxels outside the box ...
    np.testing.assert_array_equal(local[outside], plain[outside])  # ... local ones leave them
    b = (slice(38, 48),) * 3
    assert np.abs(full[b] - plain[b]).max() > 0.1  # the weak blob among them
    assert local.dtype == np.float32 and local.shape == vol.shape
    small = np.ascontiguousarray(vol[4:28, 4:28, 4:28])  # fits in one window: flipped everywhere, as without flip_min_probability
    np.testing.assert_array_equal(
        SlidingWindowPredictor(net, (32, 32, 32), flip_axes=[[2]], flip_min_probability=0.8, flip_context=4)(small),
        SlidingWindowPredictor(net, (32, 32, 32), flip_axes=[[2]])(small),
    )
    with pytest.raises(ValueError, match="flip_min_probability 1.2 is outside"):
        SlidingWindowPredictor(net, (32, 32, 32), flip_axes=[[2]], flip_min_probability=1.2)

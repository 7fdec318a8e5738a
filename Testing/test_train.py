"""The training command on real (few) data: it trains, saves, and the result loads and runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared
from LungNoduleAILib.model import ModelSpec, load_model
from LungNoduleAILib.training import PatchSampler, cube_detection_stats, load_pack, prepare_training_data, save_pack, train

TINY = {"channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2], "num_res_units": 0, "norm": "batch"}


@pytest.fixture(scope="module")
def few_cubes():
    data_dir = shared("cubes", "cubes.csv").parents[1]
    return prepare_training_data(data_dir, ModelSpec(), scan_names=(), max_cubes=24, seed=1)


@pytest.fixture(scope="module")
def synthetic_cubes():
    """Twelve CT-like 50-voxel cubes (noisy lung, a vessel, a soft-tissue nodule of 3-6 mm radius at the centre) from six series: runs without the shared
    data.
    """
    from LungNoduleAILib.intensity import scale_intensity_uint8
    from LungNoduleAILib.training import TrainingData, nodule_context, validation_series

    rng = np.random.default_rng(0)
    zz, yy, xx = np.indices((50, 50, 50))
    cubes, masks, contexts = [], [], []
    for n in range(12):
        hu = rng.normal(-850.0, 40.0, (50, 50, 50))
        hu[(yy - 10 - n) ** 2 + (xx - 30) ** 2 <= 4] = 40.0  # a vessel along z
        radius = 3 + n % 4
        sphere = (zz - 25) ** 2 + (yy - 25) ** 2 + (xx - 25) ** 2 <= radius**2
        hu[sphere] = rng.normal(30.0, 20.0, int(sphere.sum()))
        cubes.append(scale_intensity_uint8(hu, (-1000.0, 400.0)))
        masks.append(sphere.astype(np.uint8))
        contexts.append(nodule_context(hu, sphere))
    series = np.array([f"1.2.3.{n // 2}" for n in range(12)])
    val = validation_series(series, 0.3, 0)
    return TrainingData(
        np.stack(cubes),
        np.stack(masks),
        np.array([2.0 * (3 + n % 4) for n in range(12)]),
        series,
        np.array([s in val for s in series]),
        [],
        {"cubes": 12},
        contexts=np.array(contexts, "U20"),
    )


def test_split_is_by_series(few_cubes):
    train_series = set(few_cubes.series[~few_cubes.is_val])
    val_series = set(few_cubes.series[few_cubes.is_val])
    assert val_series and train_series and not (train_series & val_series)


def test_sampler_patches_contain_pasted_and_real_nodules(few_cubes):
    sampler = PatchSampler(few_cubes, 48, seed=0, lung_max_u8=91)
    patches = [sampler.sample() for _ in range(60)]
    assert all(v.shape == (48, 48, 48) and lab.shape == (48, 48, 48) for v, lab in patches)
    labelled = sum(1 for _, lab in patches if lab.any())
    assert 20 <= labelled <= 55  # both positives and negatives
    assert all(set(np.unique(lab)) <= {0, 1} for _, lab in patches)


def test_erasing_a_juxtapleural_nodule_leaves_a_smooth_wall(synthetic_cubes):
    """The erased cubes (negatives) keep the chest wall where a nodule leaned on it: no lung-coloured dent, and lung stays lung."""
    import dataclasses

    from scipy import ndimage

    from LungNoduleAILib.intensity import scale_intensity_uint8

    wall_u8 = scale_intensity_uint8(np.array([40.0]), (-1000.0, 400.0))[0]
    cubes = synthetic_cubes.cubes.copy()
    walls = []
    for n in range(12):  # each nodule (centre x 25, radius 3-6) overlaps a wall at x >= wall by 2 voxels
        wall = 25 + (3 + n % 4) - 1
        cubes[n][:, :, wall:] = wall_u8
        walls.append(wall)
    data = dataclasses.replace(synthetic_cubes, cubes=cubes)
    sampler = PatchSampler(data, 48, seed=0, lung_max_u8=91)
    x = np.arange(50)[None, None, :]
    in_wall, in_lung = [], []
    for k, n in enumerate(np.flatnonzero(~data.is_val)):
        erased = ndimage.binary_dilation(data.masks[n] > 0, iterations=2)
        in_wall.append(sampler.erased[k][erased & (x >= walls[n] + 2)] > 91)
        in_lung.append(sampler.erased[k][erased & (x <= walls[n] - 3)] < 91)
    assert np.concatenate(in_wall).mean() > 0.9  # the wall continues (before: all lung-coloured)
    assert np.concatenate(in_lung).mean() > 0.95  # the nodule's lung side is lung, no bump left


def test_pleural_pasting_puts_nodules_against_the_chest_wall(synthetic_cubes):
    """--pleural-fraction: pasted nodules lean on the chest wall, and their masks stop at it."""
    import dataclasses

    from LungNoduleAILib.intensity import scale_intensity_uint8

    cubes = synthetic_cubes.cubes.copy()
    cubes[:, :, :, 40:] = scale_intensity_uint8(np.array([40.0]), (-1000.0, 400.0))[0]  # chest wall: x >= 40 of every cube
    data = dataclasses.replace(synthetic_cubes, cubes=cubes)

    def pastes(fraction: float) -> list[np.ndarray]:
        sampler = PatchSampler(data, 48, seed=5, lung_max_u8=91, mix=(0, 1, 0, 0), pleural_fraction=fraction)
        labels = [lab for _, lab in (sampler.sample() for _ in range(40)) if lab.any()]
        assert len(labels) > 30
        return labels

    def touching(labels: list[np.ndarray]) -> float:
        # patches are cut at offsets 0-2 of the 50-voxel cubes: the wall starts at patch x 38-40
        return float(np.mean([np.nonzero(lab)[2].max() >= 36 for lab in labels]))

    against, anywhere = pastes(1.0), pastes(0.0)
    assert touching(against) >= 0.8 > 0.5 > touching(anywhere)
    assert max(np.nonzero(lab)[2].max() for lab in against) < 40  # no nodule voxel labelled inside the wall


def test_faint_pasting_lowers_nodule_contrast(synthetic_cubes):
    """--faint-fraction: pasted nodules keep 35-70 % of their contrast over the lung they are pasted into."""

    def contrast(faint: float) -> float:
        sampler = PatchSampler(synthetic_cubes, 48, seed=3, lung_max_u8=91, mix=(0, 1, 0, 0), faint_fraction=faint)
        values = [float(v[lab > 0].mean()) for v, lab in (sampler.sample() for _ in range(30)) if lab.sum() > 20]
        assert len(values) > 10
        return float(np.mean(values)) - 27.0  # lung background is about -850 HU = 27 of 255

    full, faint = contrast(0.0), contrast(1.0)
    assert full > 100 and 0.3 * full < faint < 0.75 * full


def test_fading_makes_real_nodules_faint_where_they_lie(synthetic_cubes):
    """--fade-fraction: a nodule-cube crop shows its own nodule at 35-70 % of its contrast; the chest wall it leans on, the vessel and the lung around it
    stay as they were.
    """
    import dataclasses

    from scipy import ndimage

    from LungNoduleAILib.intensity import scale_intensity_uint8

    wall_u8 = scale_intensity_uint8(np.array([40.0]), (-1000.0, 400.0))[0]
    cubes = synthetic_cubes.cubes.copy()
    walls = 25 + 3 + np.arange(12) % 4 + 1
    for n in range(12):  # a chest wall that each nodule (centre x 25, radius 3-6) touches
        cubes[n][:, :, walls[n] :] = wall_u8
    data = dataclasses.replace(synthetic_cubes, cubes=cubes)
    sampler = PatchSampler(data, 48, seed=3, lung_max_u8=91, mix=(1, 0, 0, 0), fade_fraction=1.0)
    ratios = []
    for k, n in enumerate(np.flatnonzero(~data.is_val)):
        cube, faded, mask = data.cubes[n].astype(float), sampler._fade(k).astype(float), data.masks[n] > 0
        lung_side = mask & (np.arange(50)[None, None, :] < 24)
        ratios.append((faded[lung_side].mean() - 27.0) / (cube[lung_side].mean() - 27.0))  # lung is about -850 HU = 27 of 255
        assert (faded[:, :, walls[n] :] == wall_u8).all()  # no dent in the wall where the nodule meets it
        away = ~ndimage.binary_dilation(mask, iterations=4)
        np.testing.assert_array_equal(faded[away], cube[away])  # lung and vessel untouched
    assert 0.3 < min(ratios) and max(ratios) < 0.75 and max(ratios) - min(ratios) > 0.1

    def contrast(fade: float) -> float:  # and the sampler's crops show them so
        s = PatchSampler(synthetic_cubes, 48, seed=3, lung_max_u8=91, mix=(1, 0, 0, 0), fade_fraction=fade)
        values = [float(v[lab > 0].mean()) for v, lab in (s.sample() for _ in range(30)) if lab.sum() > 20]
        assert len(values) > 20
        return float(np.mean(values)) - 27.0

    full, faded_crops = contrast(0.0), contrast(1.0)
    assert full > 100 and 0.3 * full < faded_crops < 0.75 * full


def test_small_nodules_are_drawn_small_weight_times_as_often(synthetic_cubes):
    import dataclasses

    data = dataclasses.replace(synthetic_cubes, diameters_mm=np.where(np.arange(12) % 2 == 0, 4.0, 8.0))  # every other nodule under 6 mm
    train_d = data.diameters_mm[~data.is_val]
    for weight in (1.0, 4.0):
        p = PatchSampler(data, 48, seed=0, lung_max_u8=91, small_weight=weight).nodule_p
        np.testing.assert_allclose(p[train_d < 6] / p[train_d >= 6].max(), weight)


def test_faint_nodules_are_drawn_faint_weight_times_as_often(synthetic_cubes):
    """--faint-weight: nodules whose mask averages below -450 HU (ground-glass-like) are drawn that many times as often."""
    import dataclasses

    from LungNoduleAILib.intensity import scale_intensity_uint8
    from LungNoduleAILib.training import nodule_density

    cubes = synthetic_cubes.cubes.copy()
    for n in range(0, 12, 3):  # every third nodule made ground-glass: -600 HU instead of +30 HU
        cubes[n][synthetic_cubes.masks[n] > 0] = scale_intensity_uint8(np.array([-600.0]), (-1000.0, 400.0))[0]
    data = dataclasses.replace(synthetic_cubes, cubes=cubes)
    faint = (np.arange(12) % 3 == 0)[~data.is_val]
    assert faint.any() and not faint.all()
    for weight in (1.0, 3.0):
        p = PatchSampler(data, 48, seed=0, lung_max_u8=91, small_weight=1.0, faint_weight=weight).nodule_p
        np.testing.assert_allclose(p[faint] / p[~faint].max(), weight, rtol=1e-6)
    hu = np.full((5, 5, 5), -850.0)
    ball = np.zeros_like(hu, bool)
    ball[1:4, 1:4, 1:4] = True
    hu[ball] = -600.0
    assert nodule_density(hu, ball) == "faint"
    hu[ball] = 20.0
    assert nodule_density(hu, ball) == "dense"
    with pytest.raises(ValueError, match="mask is empty"):
        nodule_density(hu, np.zeros_like(ball))


def test_size_balanced_weights_favour_small_nodules():
    import torch

    from LungNoduleAILib.training.losses import size_balanced_weights

    y = torch.zeros(3, 1, 8, 8, 8)
    y[0, 0, :2, :2, :2] = 1  # 8 voxels: weight 50 / 8
    y[1, 0, :5, :5, :5] = 1  # 125 voxels: above the reference, weight 1
    w = size_balanced_weights(y, 50.0)
    assert w.shape == y.shape
    assert float(w[0, 0, 0, 0, 0]) == 6.25 and float(w[0, 0, 5, 5, 5]) == 1.0
    assert torch.all(w[1] == 1.0) and torch.all(w[2] == 1.0)  # a big nodule and a patch without one
    assert float(size_balanced_weights(y, 5000.0)[0].max()) == 10.0  # capped


def test_zoom_rescales_patch_and_label_together_about_the_centre():
    """--zoom: a 16 mm sphere at the patch centre grows by the factor (voxels by its cube), stays centred and labelled where it is bright; the patch
    keeps its size.
    """
    import torch

    from LungNoduleAILib.training.augment import augment_batch, zoom_batch

    c = torch.arange(48.0) - 23.5
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    y = ((zz**2 + yy**2 + xx**2) <= 8.0**2).float()[None, None]
    x = 0.1 + 0.7 * y
    for factor in (1.25, 0.8):
        xz, yz = zoom_batch(x, y, factor)
        assert xz.shape == x.shape and yz.shape == y.shape
        assert abs(float(yz.sum() / y.sum()) - factor**3) < 0.1 * factor**3, factor
        idx = torch.nonzero(yz[0, 0]).float().mean(dim=0)
        assert torch.allclose(idx, torch.full((3,), 23.5), atol=0.6), idx
        assert float(xz[yz > 0].min()) > 0.45 and float(xz[yz == 0].max()) < 0.45  # the label follows the bright sphere
    assert zoom_batch(x, y, 1.001)[1] is y  # a factor that does not change the size: untouched
    # zoom 0 draws nothing more from the generator: batches of earlier runs (same seed) are unchanged
    a = augment_batch(x, y, torch.Generator().manual_seed(5))
    b = augment_batch(x, y, torch.Generator().manual_seed(5), zoom=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sizes = {int(augment_batch(x, y, torch.Generator().manual_seed(s), zoom=0.25)[1].sum()) for s in range(12)}
    assert min(sizes) < int(y.sum()) < max(sizes)  # some batches shrunk, some enlarged


def test_peak_loss_pushes_the_best_core_inside_each_labelled_patch():
    """--peak-weight: -log sigmoid of the best 3-voxel core inside the labels, per labelled patch; low when a core is confident, high when none is;
    patches without labels add nothing.
    """
    import torch

    from LungNoduleAILib.training.losses import peak_loss

    y = torch.zeros(3, 1, 16, 16, 16)
    y[0, 0, 6:10, 6:10, 6:10] = 1
    y[1, 0, 2:5, 2:5, 2:5] = 1
    logits = torch.full(y.shape, -6.0)
    logits[0, 0, 7:10, 7:10, 7:10] = 6.0  # a confident 3-voxel core in patch 0's nodule
    logits[2] = 6.0  # patch 2 has no label: its logits do not matter
    loss = peak_loss(logits, y)
    assert abs(float(loss) - 0.5 * (torch.nn.functional.softplus(torch.tensor(-6.0)) + torch.nn.functional.softplus(torch.tensor(6.0)))) < 1e-4
    logits.requires_grad_(True)
    peak_loss(logits, y).backward()
    grad = logits.grad
    assert float(grad[2].abs().sum()) == 0.0  # no label, no push
    assert float(grad[1][y[1] == 0].abs().sum()) < float(grad[1].abs().sum())  # the push lands on the nodule's core
    assert float(grad[1].sum()) < 0  # gradient descent raises it
    assert float(peak_loss(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8))) == 0.0


def test_background_peak_loss_pushes_down_the_best_core_away_from_the_labels():
    """--background-peak-weight: -log(1 - sigmoid) of the best 3-voxel core over 3 voxels from the labels, per patch;
    high where a false core is confident, low where none is; the nodule and its rim get no push."""
    import torch
    import torch.nn.functional as F

    from LungNoduleAILib.training.losses import background_peak_loss

    y = torch.zeros(2, 1, 16, 16, 16)
    y[0, 0, 6:10, 6:10, 6:10] = 1
    logits = torch.full(y.shape, -6.0)
    logits[0, 0, 5:11, 5:11, 5:11] = 6.0  # the nodule of patch 0 and a 1-voxel rim: confident, rightly
    logits[1, 0, 2:5, 2:5, 2:5] = 6.0  # a confident false core in patch 1
    loss = background_peak_loss(logits, y)
    assert abs(float(loss) - 0.5 * (F.softplus(torch.tensor(-6.0)) + F.softplus(torch.tensor(6.0)))) < 1e-4
    logits.requires_grad_(True)
    background_peak_loss(logits, y).backward()
    grad = logits.grad
    near = F.max_pool3d(y, 7, stride=1, padding=3) > 0
    assert float(grad[0][near[0]].abs().sum()) == 0.0  # nothing near the nodule is pushed
    assert float(grad[1, 0, 2:5, 2:5, 2:5].sum()) > 0  # gradient descent lowers the false core
    pushed = grad[1, 0] != 0
    assert int(pushed.sum()) == int(pushed[1:6, 1:6, 1:6].sum()) > 0  # and only around it
    full = torch.ones(1, 1, 8, 8, 8)
    assert float(background_peak_loss(torch.zeros(1, 1, 8, 8, 8), full)) == 0.0  # all labelled: nothing to push


def test_wall_negative_weights_lighten_the_wall_not_vessels_nor_nodules():
    """--wall-negative-weight: unlabelled voxels where lung meets a thick wall weigh less; a thin vessel's surroundings and nodule voxels do not."""
    import torch

    from LungNoduleAILib.training.losses import wall_negative_weights

    lung, tissue = 0.1, 0.7  # scaled intensities (-860 HU, -20 HU); -500 HU is 0.357
    x = torch.full((1, 1, 32, 32, 32), lung)
    x[..., :10] = tissue  # chest wall: 10 voxels thick, lung at x >= 10
    x[0, 0, 20:22, 20:22, :] = tissue  # a 2-voxel vessel, far from the wall
    y = torch.zeros_like(x)
    y[0, 0, 14:18, 14:18, 10:14] = 1.0  # a juxtapleural nodule on the wall
    w = wall_negative_weights(x, y, 0.25, lung_max=0.357)
    assert w.shape == x.shape
    assert [float(v) for v in w[0, 0, 5, 5, 8:12]] == [0.25] * 4  # 2 voxels either side of the pleura
    assert float(w[0, 0, 5, 5, 7]) == 1.0 and float(w[0, 0, 5, 5, 12]) == 1.0  # beyond the band
    assert float(w[0, 0, 5, 5, 2]) == 1.0  # inside the wall
    assert torch.all(w[0, 0, 14:18, 14:18, 10:14] == 1.0)  # the nodule keeps its weight
    assert torch.all(w[0, 0, 16:26, 16:26, 16:] == 1.0)  # around the vessel: thin tissue, not a wall
    assert torch.all(wall_negative_weights(x, y, 1.0, lung_max=0.357) == 1.0)
    near = wall_negative_weights(x, y, 0.25, lung_max=0.357, near_nodule_voxels=3)  # only the wall beside the nodule
    assert float(near[0, 0, 16, 12, 9]) == 0.25 and float(near[0, 0, 16, 17 + 3, 9]) == 0.25
    assert float(near[0, 0, 16, 17 + 4, 9]) == 1.0 and float(near[0, 0, 5, 5, 9]) == 1.0  # farther along the pleura: full weight


def test_ema_keeps_the_average_of_the_weights(tmp_path, synthetic_cubes):
    """--ema: what is saved is the moving average, which starts at the initial weights; with a decay near 1 it stays there."""
    from LungNoduleAILib.model import read_weights

    common = dict(batch_size=2, patch=32, device="cpu", lr=1e-2, seed=5)
    train(synthetic_cubes, tmp_path / "init.json", ModelSpec(architecture=TINY), steps=1, val_every=1, **common)
    init = str(tmp_path / "init.json")

    def saved(name, steps, ema):
        train(synthetic_cubes, tmp_path / f"{name}.json", ModelSpec(architecture=TINY), steps=steps, val_every=steps, init=init, ema=ema, **common)
        return read_weights(tmp_path / f"{name}.pt")

    start, raw, averaged = read_weights(tmp_path / "init.pt"), saved("raw", 6, 0.0), saved("ema", 6, 0.9999)

    def distance(a, b):
        return sum(float((a[k] - b[k]).abs().sum()) for k in a if a[k].is_floating_point() and "running" not in k)

    assert distance(raw, start) > 0
    assert distance(averaged, start) < 0.01 * distance(raw, start)
    assert distance(saved("ema_fast", 6, 0.5), start) > 0.1 * distance(raw, start)
    assert json.loads((tmp_path / "ema.json").read_text())["training"]["ema"] == 0.9999


def test_pack_round_trip(tmp_path, few_cubes):
    save_pack(few_cubes, tmp_path / "pack.npz")
    back = load_pack(tmp_path / "pack.npz")
    np.testing.assert_array_equal(back.cubes, few_cubes.cubes)
    np.testing.assert_array_equal(back.is_val, few_cubes.is_val)
    np.testing.assert_array_equal(back.contexts, few_cubes.contexts)
    assert set(few_cubes.contexts) <= {"pleural/mediastinal", "vascular", "isolated"} and len(few_cubes.contexts) == 24
    assert back.meta == dict(few_cubes.meta, pack={"bits": 8, "cube_size": 50, "scan_margin": None})


def test_small_pack_keeps_what_training_needs(tmp_path, synthetic_cubes):
    """Fewer bits, cropped cubes and a scan cropped to its lungs: smaller, and the same data within a quantisation step."""
    from LungNoduleAILib.training import TrainingData

    rng = np.random.default_rng(0)
    scan = rng.integers(0, 256, (80, 90, 100), dtype=np.uint8)
    lung = np.zeros_like(scan)
    lung[30:50, 20:60, 40:70] = 1
    marks = np.array([[40.0, 30.0, 50.0]], np.float32)
    data = TrainingData(
        synthetic_cubes.cubes,
        synthetic_cubes.masks,
        synthetic_cubes.diameters_mm,
        synthetic_cubes.series,
        synthetic_cubes.is_val,
        [(scan, lung, marks)],
        dict(synthetic_cubes.meta),
        contexts=synthetic_cubes.contexts,
    )
    save_pack(data, tmp_path / "full.npz")
    save_pack(data, tmp_path / "small.npz", bits=6, cube_size=48, scan_margin=10)
    assert (tmp_path / "small.npz").stat().st_size < 0.8 * (tmp_path / "full.npz").stat().st_size
    back = load_pack(tmp_path / "small.npz")
    assert back.cubes.shape == (12, 48, 48, 48) and back.cubes.dtype == np.uint8
    diff = back.cubes.astype(int) - synthetic_cubes.cubes[:, 1:49, 1:49, 1:49]
    assert diff.min() >= -3 and diff.max() <= 3 and abs(diff.mean()) < 0.5  # 6 bits: 4 levels a step, dithered
    np.testing.assert_array_equal(back.masks, synthetic_cubes.masks[:, 1:49, 1:49, 1:49])
    assert back.masks.sum() > 0.95 * synthetic_cubes.masks.sum()  # the nodules stay in the crop
    vol, lng, pts = back.scans[0]
    assert vol.shape == lng.shape == (40, 60, 50)  # lung box (20, 40, 30) + 10 voxels each side
    assert lng.sum() == lung.sum()
    np.testing.assert_allclose(pts, [[20.0, 20.0, 20.0]])  # the reader mark moved with the crop
    assert np.abs(vol.astype(int) - scan[20:60, 10:70, 30:80]).max() <= 3
    with pytest.raises(ValueError, match="bits"):
        save_pack(data, tmp_path / "bad.npz", bits=9)


def test_components_match_simpleitk():
    """The training-time connected components (scipy) are SimpleITK's: same count, sizes and centroids."""
    import SimpleITK as sitk

    from LungNoduleAILib.training.masks import components

    rng = np.random.default_rng(3)
    binary = rng.random((30, 32, 34)) > 0.7
    ours = components(binary, 3)
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    theirs = [(np.array(stats.GetCentroid(k))[::-1], stats.GetNumberOfPixels(k)) for k in stats.GetLabels() if stats.GetNumberOfPixels(k) >= 3]
    assert len(ours) == len(theirs) > 5
    for (c, voxels), (tc, tn) in zip(sorted(ours, key=lambda o: tuple(o[0])), sorted(theirs, key=lambda t: tuple(t[0]))):
        np.testing.assert_allclose(c, tc, atol=1e-9)
        assert len(voxels[0]) == tn


def test_train_saves_a_loadable_model_with_its_record(tmp_path, few_cubes):
    spec = ModelSpec(architecture=TINY)
    record = train(
        few_cubes,
        tmp_path / "m.json",
        spec,
        steps=4,
        batch_size=2,
        patch=32,
        val_every=2,
        device="cpu",
        command="test",
        size_balance_voxels=100.0,
        wall_negative_weight=0.3,
    )
    assert record["loss"].endswith("nodule voxels weighted by clip(100/n, 1, 10), unlabelled voxels at the lung's wall weighted 0.3")
    assert record["wall_negative_weight"] == 0.3 and np.isfinite(record["best_validation"]["loss"])
    assert record["best_validation"]["val_cubes"] == int(few_cubes.is_val.sum())
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["training"]["seed"] == 0 and meta["training"]["data"]["cubes"] == 24
    assert len(meta["training"]["history"]) == 2
    model = load_model(tmp_path / "m.json", "cpu")
    assert model.spec.architecture == TINY
    assert (tmp_path / "m_training_log.jsonl").exists()


def test_save_last_keeps_the_last_step_beside_the_best(tmp_path, few_cubes):
    """save_last: <stem>_last.json/.pt hold the last step's weights with their own record; the best model's files stay its own."""
    import torch

    spec = ModelSpec(architecture=TINY)
    train(few_cubes, tmp_path / "m.json", spec, steps=4, batch_size=2, patch=32, val_every=2, device="cpu", command="test", save_last=True)
    best, last = ModelSpec.from_json(tmp_path / "m.json"), ModelSpec.from_json(tmp_path / "m_last.json")
    assert (best.weights, last.weights) == ("m.pt", "m_last.pt")
    assert "checkpoint" not in best.training and best.training["best_validation"]["step"] in (2, 4)
    assert last.training["checkpoint"] == "last" and last.training["last_validation"]["step"] == 4
    assert "best_validation" not in last.training and len(last.training["history"]) == 2
    # the last weights are the network after step 4: not the initial ones
    torch.manual_seed(0)
    from LungNoduleAILib.model import build_network

    initial = build_network(spec).state_dict()
    trained = load_model(tmp_path / "m_last.json", "cpu").network.state_dict()
    assert any((trained[k].float() - initial[k].float()).abs().max() > 1e-4 for k in initial if initial[k].is_floating_point())


def test_cube_detection_stats():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[8:12, 8:12, 8:12] = 1
    prob = np.zeros((20, 20, 20), np.float32)
    prob[8:12, 8:12, 8:12] = 0.9  # on the nodule
    prob[0:3, 0:3, 0:3] = 0.8  # elsewhere
    assert cube_detection_stats(prob, mask, 4.0, 0.5, 1) == (True, 1)
    assert cube_detection_stats(prob, mask, 4.0, 0.85, 1) == (True, 0)
    assert cube_detection_stats(prob * 0, mask, 4.0, 0.5, 1) == (False, 0)


def test_hard_negative_mining_and_sampling(few_cubes):
    import torch

    from LungNoduleAILib.training import mine_hard_negatives

    # a one-layer network that fires on dense tissue (> about -300 HU): vessels and chest wall are false responses
    net = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        net.weight.fill_(40.0)
        net.bias.fill_(-20.0)
    mine_hard_negatives(net, few_cubes, "cpu", threshold=0.5, min_voxels=5)
    assert few_cubes.hard_cube.shape[1] == 4 and len(few_cubes.hard_cube) > 0
    assert set(few_cubes.hard_cube[:, 0]) <= set(np.flatnonzero(~few_cubes.is_val))  # never the validation cubes
    sampler = PatchSampler(few_cubes, 48, seed=0, lung_max_u8=91)
    vol, lab = sampler._hard_cube_patch()
    assert vol.shape == lab.shape == (48, 48, 48)
    few_cubes.hard_cube = few_cubes.hard_cube[:0]


def test_training_command_runs_under_torchrun_ddp(tmp_path, few_cubes):
    """Two CPU processes (gloo) through the real command line, from a data pack."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    save_pack(few_cubes, tmp_path / "pack.npz")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "LungNoduleAILib.cli",
            "train",
            "--pack",
            str(tmp_path / "pack.npz"),
            "--output",
            str(tmp_path / "ddp.json"),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--patch",
            "32",
            "--val-every",
            "3",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    # on failure, show what each rank said, not only the launcher's summary of rank 0's traceback
    other_ranks = "\n".join(line for line in proc.stderr.splitlines() if not line.lstrip().startswith("[rank0]"))
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n--- stderr without rank 0's lines:\n{other_ranks[-6000:]}\n--- stderr, end:\n{proc.stderr[-2000:]}"
    )
    meta = json.loads((tmp_path / "ddp.json").read_text())
    assert meta["training"]["world_size"] == 2
    load_model(tmp_path / "ddp.json", "cpu")


def test_training_from_a_pack_needs_no_simpleitk_and_feeds_from_workers(tmp_path, synthetic_cubes):
    """As on a GPU machine without SimpleITK: a pack, patches drawn by worker processes, hard negatives mined by another model."""
    import os
    import subprocess
    import sys

    spec = ModelSpec(architecture=TINY)
    train(synthetic_cubes, tmp_path / "miner.json", spec, steps=1, batch_size=2, patch=32, val_every=1, device="cpu")
    save_pack(synthetic_cubes, tmp_path / "pack.npz", bits=7, cube_size=48)
    code = (
        "import sys; sys.modules['SimpleITK'] = None\n"  # any import of SimpleITK now fails
        "from LungNoduleAILib.model import ModelSpec\n"
        "from LungNoduleAILib.training import load_pack, train\n"
        f"r = train(load_pack({str(tmp_path / 'pack.npz')!r}), {str(tmp_path / 'w.json')!r}, ModelSpec(architecture={TINY!r}), steps=3, batch_size=2, patch=32,"
        f" val_every=3, device='cpu', workers=2, mine_hard=True, mine_threshold=0.0, mine_with={str(tmp_path / 'miner.json')!r})\n"
        "print('hard', r['data']['hard_negatives']['model'], r['workers'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"hard {tmp_path / 'miner.json'} 2" in proc.stdout
    assert load_model(tmp_path / "w.json", "cpu").spec.training["best_validation"]["val_cubes"] == int(synthetic_cubes.is_val.sum())


def test_scan_false_responses_skip_reader_marks():
    """False responses in a scan's lungs are counted unless within 15 mm of something a reader marked."""
    import torch

    from LungNoduleAILib.training.validation import _scan_false_responses

    vol = np.full((60, 60, 60), 20, np.uint8)  # lung
    lung = np.ones_like(vol)
    vol[10:14, 10:14, 10:14] = 200  # a dense blob far from any mark
    vol[40:44, 40:44, 40:44] = 200  # a dense blob next to a reader mark
    net = torch.nn.Conv3d(1, 1, 1)  # fires on dense tissue
    with torch.no_grad():
        net.weight.fill_(40.0)
        net.bias.fill_(-20.0)
    marks = np.array([[45.0, 42.0, 42.0]], np.float32)
    assert _scan_false_responses(net, (vol, lung, marks), "cpu", 0.5, 5, roi=32) == [[12, 12, 12]]
    assert len(_scan_false_responses(net, (vol, lung, marks[:0]), "cpu", 0.5, 5, roi=32)) == 2


def test_missed_nodules_are_mined_and_drawn_missed_weight_times_as_often(synthetic_cubes):
    """--missed-weight: the training nodules the mining model does not find at the model's threshold are drawn that many times as often."""
    import dataclasses

    import torch

    from LungNoduleAILib.intensity import scale_intensity_uint8
    from LungNoduleAILib.training import mine_hard_negatives

    cubes = synthetic_cubes.cubes.copy()
    for n in range(0, 12, 3):  # every third nodule ground-glass (-600 HU): a net that fires on dense tissue misses it
        cubes[n][synthetic_cubes.masks[n] > 0] = scale_intensity_uint8(np.array([-600.0]), (-1000.0, 400.0))[0]
    data = dataclasses.replace(synthetic_cubes, cubes=cubes, meta={})
    with pytest.raises(ValueError, match="missed_weight=3.0 needs the missed nodules of a mining run"):
        PatchSampler(data, 48, seed=0, lung_max_u8=91, missed_weight=3.0)
    net = torch.nn.Conv3d(1, 1, 1)  # fires on dense tissue (> about -300 HU)
    with torch.no_grad():
        net.weight.fill_(40.0)
        net.bias.fill_(-20.0)
    mine_hard_negatives(net, data, "cpu", threshold=0.5, min_voxels=5, found_threshold=0.97)
    faint = np.arange(12) % 3 == 0
    np.testing.assert_array_equal(data.missed, faint & ~data.is_val)  # validation cubes are never looked at
    assert data.meta["missed_nodules"] == {"count": int((faint & ~data.is_val).sum()), "training_nodules": int((~data.is_val).sum()), "threshold": 0.97}
    missed = data.missed[~data.is_val]
    assert missed.any() and not missed.all()
    for weight in (1.0, 3.0):
        p = PatchSampler(data, 48, seed=0, lung_max_u8=91, small_weight=1.0, missed_weight=weight).nodule_p
        np.testing.assert_allclose(p[missed] / p[~missed].max(), weight, rtol=1e-6)


def test_train_command_refuses_a_bad_mix(tmp_path, capsys):
    from LungNoduleAILib.cli import main

    assert main(["pack", "--data-dir", str(tmp_path), "--output", str(tmp_path / "p.npz"), "--bits", "9"]) == 2
    assert "--bits must be 1..8" in capsys.readouterr().err
    assert not (tmp_path / "p.npz").exists()
    for extra, message in (
        (["--mix", "0.5,0.5"], "--mix needs 4 non-negative fractions"),
        (["--ema", "1.5"], "--ema is a decay per step in [0, 1)"),
        (["--faint-weight", "0"], "--faint-weight is how many times as often"),
        (["--pleural-fraction", "1.5"], "--pleural-fraction is a fraction of the pasted nodules and must be in [0, 1], got 1.5"),
        (["--fade-fraction", "-0.1"], "--fade-fraction is a fraction of the nodule-cube crops and must be in [0, 1], got -0.1"),
        (["--peak-weight", "-1"], "--peak-weight must be >= 0 (0 = off), got -1.0"),
        (["--background-peak-weight", "-0.5"], "--background-peak-weight must be >= 0 (0 = off), got -0.5"),
        (["--zoom", "1.5"], "--zoom must lie between 0 (off) and 1 (factors 0.5-2), e.g. 0.25 for factors 0.8-1.25, got 1.5"),
        (["--missed-weight", "3"], "--missed-weight 3.0 needs --mine-hard-negatives"),
        (["--wall-negative-weight", "1.5"], "--wall-negative-weight must lie between 0 and 1, got 1.5"),
        (["--wall-negative-weight", "0.3", "--wall-near-nodule", "-1"], "--wall-near-nodule is a distance in voxels and must be >= 0"),
    ):
        assert main(["train", "--pack", str(tmp_path / "none.npz"), "--output", str(tmp_path / "m.json"), *extra]) == 2, extra
        assert message in capsys.readouterr().err
        assert not (tmp_path / "m.json").exists()


def test_train_and_pack_refuse_missing_or_wrong_inputs(tmp_path, capsys, synthetic_cubes):
    """A wrong --pack, --data-dir or --init gets an error that says what to give, not a traceback, and no model is written."""
    from LungNoduleAILib.cli import main

    (tmp_path / "notes.npz").write_text("not a pack")
    save_pack(synthetic_cubes, tmp_path / "pack.npz")
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["train", "--pack", str(tmp_path / "none.npz")], "Data pack '" + str(tmp_path / "none.npz") + "' does not exist: write one with 'lungnoduleai pack"),
        (["train", "--pack", str(tmp_path / "notes.npz")], "is not a data pack written by 'lungnoduleai pack'"),
        (["train", "--data-dir", str(tmp_path / "empty")], "has no cubes/cubes.csv: give the folder laid out like shared/data"),
        (["pack", "--data-dir", str(tmp_path / "empty")], "has no cubes/cubes.csv"),
        (["train", "--pack", str(tmp_path / "pack.npz"), "--init", str(tmp_path / "gone.json")], "--init '" + str(tmp_path / "gone.json") + "': no weights"),
        (["train", "--pack", str(tmp_path / "pack.npz"), "--mine-hard-negatives", "--mine-with", str(tmp_path / "gone.json")], "--mine-with '"),
    ):
        assert main([*args, "--output", str(tmp_path / "m.json" if args[0] == "train" else tmp_path / "p.npz")]) == 2, args
        assert message in capsys.readouterr().err, args
        assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.npz").exists()


def test_nodule_context_tells_pleural_vascular_and_isolated_apart():
    from LungNoduleAILib.training import nodule_context

    zz, yy, xx = np.indices((40, 40, 40))
    lung = np.full((40, 40, 40), -850.0)
    sphere = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 16  # 8 mm nodule at the centre
    assert nodule_context(np.where(sphere, 30.0, lung), sphere) == "isolated"
    wall = lung.copy()
    wall[:, :, 24:] = 40.0  # chest wall touching the nodule's side
    assert nodule_context(np.where(sphere, 30.0, wall), sphere) == "pleural/mediastinal"
    vessel = lung.copy()
    vessel[((yy - 20) ** 2 + (xx - 26) ** 2) <= 4] = 40.0  # a 4 mm vessel running past it
    assert nodule_context(np.where(sphere, 30.0, vessel), sphere) == "vascular"


def test_a_fine_tune_keeps_its_models_thresholds(tmp_path, synthetic_cubes):
    """lungnoduleai train --init M: validated at M's threshold, and the result keeps M's threshold, segment threshold and neck split."""
    from LungNoduleAILib.cli import main
    from LungNoduleAILib.model import build_network, save_model

    spec = ModelSpec(threshold=0.9, segment_threshold=0.4, split_depth_mm=0.7)
    save_model(build_network(spec), spec, tmp_path / "init.json")
    save_pack(synthetic_cubes, tmp_path / "pack.npz")
    args = ["train", "--pack", str(tmp_path / "pack.npz"), "--output", str(tmp_path / "ft.json"), "--init", str(tmp_path / "init.json")]
    assert main(args + ["--steps", "1", "--batch-size", "2", "--patch", "32", "--val-every", "1", "--device", "cpu"]) == 0
    tuned = ModelSpec.from_json(tmp_path / "ft.json")
    assert (tuned.threshold, tuned.segment_threshold, tuned.split_depth_mm) == (0.9, 0.4, 0.7)
    assert tuned.training["selection"]["threshold"] == 0.9


@pytest.fixture(scope="module")
def neighbour_cubes(tmp_path_factory):
    """Three cubes written as files: A and B from one series, 15 mm apart, so each holds the other's nodule; C alone."""
    import SimpleITK as sitk

    root = tmp_path_factory.mktemp("neighbours")
    (root / "cubes").mkdir()
    zz, yy, xx = np.indices((50, 50, 50))
    rows = []
    for name, series, origin_x in (("a", "1.2.3", 0.0), ("b", "1.2.3", 15.0), ("c", "4.5.6", 0.0)):
        hu = np.full((50, 50, 50), -850.0, np.float32)
        own = (zz - 25) ** 2 + (yy - 25) ** 2 + (xx - 25) ** 2 <= 16
        hu[own] = 30.0
        if name != "c":  # the neighbour lies 15 mm along x (world), on the other side for b
            nx = 40 if name == "a" else 10
            hu[(zz - 25) ** 2 + (yy - 25) ** 2 + (xx - nx) ** 2 <= 16] = 30.0
        for array, suffix in ((hu, "dcm"), (own.astype(np.int32), "seg")):
            img = sitk.GetImageFromArray(array)
            img.SetOrigin((origin_x, 0.0, 0.0))
            sitk.WriteImage(img, str(root / "cubes" / f"{name}_{suffix}_0.mha"))
        rows.append(f"{name}_dcm_0.mha,{name}_seg_0.mha,{series},8")
    (root / "cubes" / "cubes.csv").write_text("image,mask,seriesuid,diameter_mm\n" + "\n".join(rows) + "\n")
    return prepare_training_data(root, ModelSpec(), scan_names=())


def test_other_nodules_of_the_series_in_a_cube_are_marked(tmp_path, neighbour_cubes):
    """A neighbour that the cube's own mask leaves out is labelled, erased from the negatives, and not a false candidate."""
    data = neighbour_cubes
    a, b, c = 0, 1, 2
    assert data.masks[a][25, 25, 40] == 0 and data.other_masks[a][25, 25, 40] == 1  # b's nodule, in a's grid
    assert data.other_masks[b][25, 25, 10] == 1 and data.other_masks[b][25, 25, 25] == 0
    assert not data.other_masks[c].any()
    assert data.other_masks[a].sum() == data.masks[b].sum()
    assert data.meta["other_nodules_in_cubes"] == 2
    assert data.all_masks()[a][25, 25, 40] == 1 and data.all_masks()[a][25, 25, 25] == 1

    save_pack(data, tmp_path / "pack.npz", cube_size=48)
    back = load_pack(tmp_path / "pack.npz")
    np.testing.assert_array_equal(back.other_masks, data.other_masks[:, 1:49, 1:49, 1:49])

    data.is_val[:] = False
    sampler = PatchSampler(data, 48, seed=0, lung_max_u8=91)
    assert sampler.labels[a][25, 25, 40] == 1  # a patch of cube a is labelled on both nodules
    assert sampler.erased[a][25, 25, 40] < 91 and sampler.erased[a][25, 25, 25] < 91  # a negative holds neither
    assert sampler.sprites[a][1].shape == (15, 15, 15)  # the pasted sprite is the own nodule alone (9 voxels + 3 each side)

    prob = (data.all_masks()[a] > 0).astype(np.float32)  # fires on both
    assert cube_detection_stats(prob, data.masks[a], 8.0, 0.5, 1) == (True, 1)
    assert cube_detection_stats(prob, data.masks[a], 8.0, 0.5, 1, ignore=data.other_masks[a] > 0) == (True, 0)

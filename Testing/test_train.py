"""The training command on real (few) data: it trains, saves, and the result loads and runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared
from LungNoduleAILib.model import ModelSpec, load_model
from LungNoduleAILib.train import PatchSampler, cube_detection_stats, load_pack, prepare_training_data, save_pack, train

TINY = {"channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2], "num_res_units": 0, "norm": "batch"}


@pytest.fixture(scope="module")
def few_cubes():
    data_dir = shared("cubes", "cubes.csv").parents[1]
    return prepare_training_data(data_dir, ModelSpec(), scan_names=(), max_cubes=24, seed=1)


def test_split_is_by_series(few_cubes):
    train_series = set(few_cubes.series[~few_cubes.is_val])
    val_series = set(few_cubes.series[few_cubes.is_val])
    assert val_series and train_series and not (train_series & val_series)


def test_sampler_patches_contain_pasted_and_real_nodules(few_cubes):
    sampler = PatchSampler(few_cubes, 48, seed=0, lung_max_u8=91)
    patches = [sampler.sample() for _ in range(60)]
    assert all(v.shape == (48, 48, 48) and l.shape == (48, 48, 48) for v, l in patches)
    labelled = sum(1 for _, l in patches if l.any())
    assert 20 <= labelled <= 55  # both positives and negatives
    assert all(set(np.unique(l)) <= {0, 1} for _, l in patches)


def test_pack_round_trip(tmp_path, few_cubes):
    save_pack(few_cubes, tmp_path / "pack.npz")
    back = load_pack(tmp_path / "pack.npz")
    np.testing.assert_array_equal(back.cubes, few_cubes.cubes)
    np.testing.assert_array_equal(back.is_val, few_cubes.is_val)
    assert back.meta == few_cubes.meta


def test_train_saves_a_loadable_model_with_its_record(tmp_path, few_cubes):
    spec = ModelSpec(architecture=TINY)
    record = train(few_cubes, tmp_path / "m.json", spec, steps=4, batch_size=2, patch=32, val_every=2, device="cpu", command="test")
    assert record["best_validation"]["val_cubes"] == int(few_cubes.is_val.sum())
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["training"]["seed"] == 0 and meta["training"]["data"]["cubes"] == 24
    assert len(meta["training"]["history"]) == 2
    model = load_model(tmp_path / "m.json", "cpu")
    assert model.spec.architecture == TINY
    assert (tmp_path / "m_training_log.jsonl").exists()


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

    from LungNoduleAILib.train import mine_hard_negatives

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
        [str(torchrun), "--nproc_per_node", "2", "-m", "LungNoduleAILib.cli", "train", "--pack", str(tmp_path / "pack.npz"),
         "--output", str(tmp_path / "ddp.json"), "--steps", "3", "--batch-size", "2", "--patch", "32", "--val-every", "3", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp.json").read_text())
    assert meta["training"]["world_size"] == 2
    load_model(tmp_path / "ddp.json", "cpu")


def test_nodule_context_tells_pleural_vascular_and_isolated_apart():
    from LungNoduleAILib.train import nodule_context

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

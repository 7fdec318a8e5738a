"""Shared fixtures: real data locations, a tiny real network, synthetic CTs with known geometry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LUNGNODULEAI_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE_CT = REPO / "LungNoduleAI" / "Resources" / "Sample" / "LIDC-IDRI-0001_sample.nii.gz"
# LUNA16 reference nodule of LIDC-IDRI-0001 (LPS mm, diameter mm); the sample is cut around it.
LIDC0001_NODULE_LPS = (56.20840547, 86.34341278, -115.8675792)
LIDC0001_NODULE_DIAMETER_MM = 23.35064438


def shared(*parts: str) -> Path:
    """Path inside ../shared/data; skips the test with a reason when absent (a user's fresh clone)."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available ({p}); the bundled sample covers this case elsewhere")
    return p


def synthetic_ct(size_xyz=(64, 64, 40), spacing=(0.8, 0.8, 1.5), origin=(-20.0, 10.0, -30.0), direction=None, seed=0) -> sitk.Image:
    """A CT-like int16 image in HU: air body with soft tissue and noise, geometry as given."""
    rng = np.random.default_rng(seed)
    arr = np.full(tuple(reversed(size_xyz)), -850, np.float32)
    arr[:, :, : size_xyz[0] // 4] = 40  # soft tissue slab
    arr += rng.normal(0, 20, arr.shape)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def oblique_direction(angle_deg: float = 20.0) -> tuple:
    a = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A real (randomly initialised, tiny) MONAI U-Net saved in the model format and loaded back."""
    import torch

    from LungNoduleAILib.model import ModelSpec, build_network, load_model, save_model

    torch.manual_seed(0)
    spec = ModelSpec(
        name="tiny-test-unet",
        version="test",
        architecture={"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0, "norm": "batch"},
        spacing_mm=[2.0, 2.0, 2.0],
        roi_size=[32, 32, 32],
        threshold=0.5,
        min_volume_mm3=0.0,
    )
    net = build_network(spec)
    path = save_model(net, spec, tmp_path_factory.mktemp("model") / "tiny.json")
    return load_model(path, "cpu")


@pytest.fixture(scope="session")
def bundled_model():
    from LungNoduleAILib.model import default_model_path, load_model

    path = default_model_path()
    if not path.exists():
        pytest.fail(f"bundled model missing: {path}")
    return load_model(path, "cpu")

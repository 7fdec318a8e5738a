"""Model files: averaging fine-tunes into one model (``lungnoduleai average``), with real tiny networks and real files."""

from __future__ import annotations

import numpy as np
import pytest

from LungNoduleAILib.cli import main
from LungNoduleAILib.inference import SlidingWindowPredictor
from LungNoduleAILib.model import ModelSpec, build_network, file_sha256, load_model, read_weights, save_model

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0, "norm": "batch"}


def _tiny(path, seed, architecture=TINY, threshold=0.8):
    import torch

    torch.manual_seed(seed)
    spec = ModelSpec(name="tiny", version=f"seed{seed}", architecture=architecture, roi_size=[32, 32, 32], threshold=threshold, split_depth_mm=0.5)
    spec.training = {"seed": seed}
    net = build_network(spec)
    with torch.no_grad():  # batch-norm statistics that differ between the two, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return save_model(net, spec, path)


def test_average_writes_the_mean_of_the_weights_and_records_its_ingredients(tmp_path, capsys):
    a, b = _tiny(tmp_path / "a" / "m.json", 1, threshold=0.8), _tiny(tmp_path / "b" / "m.json", 2, threshold=0.6)
    out = tmp_path / "soup" / "m.json"
    assert main(["average", str(a), str(b), "--output", str(out), "--version", "2.0.0"]) == 0
    assert "average of 2 models" in capsys.readouterr().out
    wa, wb, wc = (read_weights(p.with_suffix(".pt")) for p in (a, b, out))
    assert wc.keys() == wa.keys()
    for k, v in wc.items():
        if v.is_floating_point():
            np.testing.assert_allclose(v.numpy(), ((wa[k] + wb[k]) / 2).numpy(), rtol=2e-3, atol=2e-3)  # stored as float16
        else:
            assert (v == wa[k]).all()
    conv = "model.0.conv.weight"
    assert (wc[conv] - wa[conv]).abs().max() > 1e-2 and (wc[conv] - wb[conv]).abs().max() > 1e-2
    model = load_model(out, "cpu")
    spec = model.spec
    assert (spec.version, spec.threshold, spec.split_depth_mm) == ("2.0.0", 0.8, 0.5)  # settings from the first model
    ingredients = spec.training["ingredients"]
    assert [i["sha256"] for i in ingredients] == [file_sha256(a.with_suffix(".pt")), file_sha256(b.with_suffix(".pt"))]
    assert [i["training"] for i in ingredients] == [{"seed": 1}, {"seed": 2}]
    assert spec.training["command"].startswith("lungnoduleai average ")
    prob = SlidingWindowPredictor(model.network, spec.roi_size)(np.random.default_rng(0).random((32, 32, 32), dtype=np.float32))
    assert np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1


def test_average_refuses_what_cannot_be_averaged_and_never_overwrites_an_ingredient(tmp_path, capsys):
    a, b = _tiny(tmp_path / "a" / "m.json", 1), _tiny(tmp_path / "b" / "m.json", 2)
    other = _tiny(tmp_path / "c" / "m.json", 3, architecture={**TINY, "channels": [4, 8, 32]})
    before = file_sha256(a.with_suffix(".pt"))
    assert main(["average", str(a), "--output", str(tmp_path / "x.json")]) == 2
    assert "at least two models" in capsys.readouterr().err
    assert main(["average", str(a), str(other), "--output", str(tmp_path / "x.json")]) == 2
    assert "architecture" in capsys.readouterr().err
    assert main(["average", str(a), str(tmp_path / "missing.json"), "--output", str(tmp_path / "x.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["average", str(a), str(b), "--output", str(a)]) == 2
    assert "one of the models being averaged" in capsys.readouterr().err
    assert main(["average", str(a), str(b), "--output", str(a.with_suffix(".pt"))]) == 2
    assert "one of the models being averaged" in capsys.readouterr().err
    assert file_sha256(a.with_suffix(".pt")) == before and not (tmp_path / "x.json").exists()


def test_model_settings_carry_test_time_flips(tmp_path):
    path = _tiny(tmp_path / "m.json", 1)
    spec = ModelSpec.from_json(path)
    assert spec.tta_flips == []
    spec.tta_flips = [[2]]
    spec.to_json(path)
    assert load_model(path, "cpu").spec.tta_flips == [[2]]


@pytest.mark.parametrize("flips", [[[2]], []])
def test_detector_uses_the_models_test_time_flips(tmp_path, flips):
    from LungNoduleAILib.pipeline import Detector

    path = _tiny(tmp_path / "m.json", 1)
    spec = ModelSpec.from_json(path)
    spec.tta_flips = flips
    spec.tta_min_probability = 0.8 if flips else None
    spec.to_json(path)
    predictor = Detector(path, "cpu").predictor
    assert predictor.flip_axes == tuple(tuple(f) for f in flips)
    assert predictor.flip_min_probability == (0.8 if flips else None)

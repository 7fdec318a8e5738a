"""Output files written by the pipeline and read back: NRRD, labelmap, .seg.nrrd (slicerio), CSV, JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from test_candidates import _spheres

from conftest import oblique_direction
from LungNoduleAILib.candidates import extract_candidates
from LungNoduleAILib.inference import DetectionCancelled
from LungNoduleAILib.pipeline import Detector
from LungNoduleAILib.writers import (
    NODULE_TERMINOLOGY,
    OutputSet,
    output_paths,
    read_probability,
    write_candidates_csv,
    write_json,
    write_labelmap,
    write_overview_png,
    write_probability,
    write_segmentation,
)


@pytest.fixture()
def detected():
    prob, ct = _spheres([((40, 40, 30), 4.0, 0.9), ((110, 60, 50), 6.0, 0.75)], direction=oblique_direction())
    labelmap, cands = extract_candidates(prob, ct, 0.3)
    return prob, ct, labelmap, cands


def test_files_read_back(tmp_path, detected):
    prob, ct, labelmap, cands = detected
    write_probability(prob, tmp_path / "p.nrrd")
    write_labelmap(labelmap, tmp_path / "l.nrrd")
    write_segmentation(labelmap, cands, tmp_path / "s.seg.nrrd")
    write_candidates_csv(cands, tmp_path / "c.csv")
    write_overview_png(ct, prob, labelmap, cands, tmp_path / "o.png")

    p = sitk.ReadImage(str(tmp_path / "p.nrrd"))
    assert p.GetPixelID() == sitk.sitkUInt8
    back = read_probability(tmp_path / "p.nrrd")
    assert np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(prob)).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_allclose(back.GetDirection(), prob.GetDirection(), atol=1e-6)

    lab = sitk.ReadImage(str(tmp_path / "l.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(labelmap))
    np.testing.assert_allclose(lab.GetOrigin(), ct.GetOrigin(), atol=1e-6)

    seg = slicerio.read_segmentation(str(tmp_path / "s.seg.nrrd"))
    assert len(seg["segments"]) == 2
    for s, c in zip(seg["segments"], cands):
        assert s["name"] == f"Nodule {c.rank} ({c.diameter_mm:.1f} mm, p={c.probability:.2f})"
        assert s["labelValue"] == c.rank
        assert s["status"] == "notstarted"
        assert s["terminology"]["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
        assert s["terminology"]["type"] == ["SCT", "27925004", "Nodule"]
        assert s["tags"]["LungNoduleAI.Probability"] == f"{c.probability:.4f}"
        assert s["tags"]["LungNoduleAI.ReviewStatus"] == "pending"
        mask = slicerio.segment_mask(seg, s)  # voxels of this segment
        assert mask.sum() == c.voxels
    np.testing.assert_allclose(np.array(seg["ijkToLPS"])[:3, 3], ct.GetOrigin(), atol=1e-4)

    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [int(r["rank"]) for r in rows] == [1, 2]
    assert float(rows[0]["diameter_mm"]) == pytest.approx(cands[0].diameter_mm, abs=0.01)
    assert float(rows[0]["center_ras_x_mm"]) == pytest.approx(-float(rows[0]["center_lps_x_mm"]))
    assert (tmp_path / "o.png").stat().st_size > 10_000


def test_terminology_string_parses():
    from slicerio.segmentation import terminology_entry_from_string, terminology_entry_to_string

    term = terminology_entry_from_string(NODULE_TERMINOLOGY)
    assert term["type"] == ["SCT", "27925004", "Nodule"]
    assert term["anatomicRegion"] == ["SCT", "39607008", "Lung"]
    assert terminology_entry_to_string(term) == NODULE_TERMINOLOGY


def test_output_set_is_all_or_nothing(tmp_path):
    targets = output_paths(tmp_path / "out", "case")
    with pytest.raises(RuntimeError):
        with OutputSet(targets) as out:
            write_json({"a": 1}, out.tmp("json"))
            raise RuntimeError("boom")
    assert list((tmp_path / "out").iterdir()) == []
    with OutputSet(targets) as out:
        write_json({"a": 1}, out.tmp("json"))
        out.commit()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case_nodules.json"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        OutputSet(targets)
    OutputSet(targets, overwrite=True)


def _write_ct(tmp_path, name="phantom"):
    from conftest import synthetic_ct

    img = synthetic_ct(size_xyz=(48, 48, 32), spacing=(1.5, 1.5, 2.0))
    path = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(img, str(path))
    return path


def test_detect_to_files_writes_json_contract(tmp_path, tiny_model):
    path = _write_ct(tmp_path)
    stages = []
    result = Detector(tiny_model).detect_to_files(path, tmp_path / "out", threshold=0.5, png=True, progress=lambda d, t, s: stages.append(s))
    assert set(result.outputs) == {"probability", "labelmap", "segmentation", "csv", "json", "png"}
    assert all(p.exists() for p in result.outputs.values())
    assert stages[0] == "read" and stages[-1] == "write" and "inference" in stages
    report = json.loads(result.outputs["json"].read_text())
    for key in ("input", "model", "device", "timings_s", "candidates"):
        assert key in report
    assert report["model"]["name"] == "tiny-test-unet" and len(report["model"]["sha256"]) == 64
    assert set(report["timings_s"]) >= {"read", "preprocess", "inference", "candidates", "write"}
    for c in report["candidates"]:
        assert {"id", "probability", "center_lps_mm", "center_ras_mm", "diameter_mm", "volume_mm3"} <= set(c)
    prob = sitk.ReadImage(str(result.outputs["probability"]))
    assert prob.GetSize() == (48, 48, 32)  # on the CT grid, not the model's
    assert not list((tmp_path / "out").glob(".lungnoduleai-tmp-*"))


def test_cancel_leaves_no_files(tmp_path, tiny_model):
    path = _write_ct(tmp_path)
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 4  # cancel during inference

    with pytest.raises(DetectionCancelled):
        Detector(tiny_model).detect_to_files(path, tmp_path / "out", should_cancel=should_cancel)
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_outputs_are_kept_without_overwrite(tmp_path, tiny_model):
    path = _write_ct(tmp_path)
    out = tmp_path / "out"
    first = Detector(tiny_model).detect_to_files(path, out)
    before = first.outputs["json"].read_text()
    with pytest.raises(FileExistsError):
        Detector(tiny_model).detect_to_files(path, out)
    assert first.outputs["json"].read_text() == before


def test_background_loading_detects_alike_and_reports_a_bad_model_once_the_ct_is_read(tmp_path, tiny_model, capsys):
    """Detector(background=True), as `lungnoduleai detect` runs: its settings at once, the same outputs as a model loaded first;
    weights that do not fit are reported when detection needs them, with no output left, and the CLI stops with that error."""
    import shutil

    import torch

    from LungNoduleAILib.cli import main

    path = _write_ct(tmp_path)
    detector = Detector(tiny_model.path, "cpu", background=True)
    assert detector.spec.name == "tiny-test-unet" and detector.spec.threshold == 0.5
    background = detector.detect_to_files(path, tmp_path / "bg", threshold=0.3)
    first = Detector(tiny_model).detect_to_files(path, tmp_path / "first", threshold=0.3)
    assert np.array_equal(sitk.GetArrayFromImage(background.probability), sitk.GetArrayFromImage(first.probability))
    assert [c.to_dict() for c in background.candidates] == [c.to_dict() for c in first.candidates]
    assert "model_load_wait" in json.loads(background.outputs["json"].read_text())["timings_s"]
    assert detector.model.sha256 == tiny_model.sha256

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tiny_model.path, bad / "tiny.json")
    torch.save({"not.a.layer": torch.zeros(3)}, bad / "tiny.pt")
    detector = Detector(bad / "tiny.json", "cpu", background=True)  # the files exist: no error yet
    with pytest.raises(ValueError, match="do not fit the architecture"):
        detector.detect_to_files(path, tmp_path / "bad_out")
    assert detector.load_failed
    assert not (tmp_path / "bad_out").exists() or list((tmp_path / "bad_out").iterdir()) == []
    second = tmp_path / "phantom2.nrrd"
    shutil.copy(path, second)
    capsys.readouterr()
    assert main(["detect", str(path), str(second), "--model", str(bad / "tiny.json"), "--output-dir", str(tmp_path / "cli_out")]) == 2
    err = capsys.readouterr().err
    assert "do not fit the architecture" in err and "phantom" not in err  # the model's error, said once, not each input's
    assert main(["detect", str(path), "--model", str(bad / "tiny.json"), "--output-dir", str(tmp_path / "cli_out"), "--progress-lines"]) == 2
    from LungNoduleAILib.protocol import parse

    errors = [event[1] for line in capsys.readouterr().out.splitlines() if (event := parse(line)) and event[0] == "error"]
    assert len(errors) == 1 and "do not fit the architecture" in errors[0]["error"]  # the reason a program running the engine shows
    assert not (tmp_path / "cli_out").exists() or list((tmp_path / "cli_out").iterdir()) == []

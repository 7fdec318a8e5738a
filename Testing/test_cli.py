"""The lungnoduleai command line, end to end, as a user runs it (real processes, real files)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import LIDC0001_NODULE_DIAMETER_MM, LIDC0001_NODULE_LPS, REPO, SAMPLE_CT
from LungNoduleAILib.protocol import EVENT_PREFIXES, parse

PROGRESS_PREFIX, RESULT_PREFIX, ERROR_PREFIX = (EVENT_PREFIXES[k] for k in ("progress", "result", "error"))


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "LungNoduleAILib.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run_cli("demo", "--output-dir", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_demo_finds_the_sample_nodule_first(sample_run):
    out, proc = sample_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"LIDC-IDRI-0001_sample{s}" for s in ["_probability.nrrd", "_candidates.nrrd", ".seg.nrrd", "_nodules.csv", "_nodules.json", "_overview.png"]
    )
    report = json.loads((out / "LIDC-IDRI-0001_sample_nodules.json").read_text())
    top = report["candidates"][0]
    distance = np.linalg.norm(np.array(top["center_lps_mm"]) - np.array(LIDC0001_NODULE_LPS))
    assert distance <= LIDC0001_NODULE_DIAMETER_MM / 2, report["candidates"][:3]
    assert "candidate(s)" in proc.stdout and "outputs in" in proc.stdout
    # the labelmap's label 1 sits on the reference nodule
    lab = sitk.ReadImage(str(out / "LIDC-IDRI-0001_sample_candidates.nrrd"))
    idx = lab.TransformPhysicalPointToIndex(LIDC0001_NODULE_LPS)
    assert lab[idx] == 1
    # ... and is drawn to the nodule's extent: its connected region of p >= the model's segment threshold (0.5),
    # read back from the uint8 probability map (p x 255, rounded: one step of slack at the boundary)
    from scipy import ndimage

    from LungNoduleAILib.model import ModelSpec, default_model_path
    from LungNoduleAILib.writers import PROBABILITY_SCALE

    segment_u8 = ModelSpec.from_json(default_model_path()).segment_threshold / PROBABILITY_SCALE
    prob_u8 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "LIDC-IDRI-0001_sample_probability.nrrd"))).astype(float)
    label1 = sitk.GetArrayFromImage(lab) == 1
    zyx = tuple(reversed(idx))
    inner, _ = ndimage.label(prob_u8 >= segment_u8 + 1, np.ones((3, 3, 3)))
    outer, _ = ndimage.label(prob_u8 >= segment_u8 - 1, np.ones((3, 3, 3)))
    assert np.all(label1[inner == inner[zyx]]) and np.all((outer == outer[zyx])[label1])
    assert label1.sum() > 1.2 * (prob_u8[label1] * PROBABILITY_SCALE >= report["threshold"]).sum()  # well beyond the voxels above the detection threshold


def test_batch_with_a_bad_input_processes_the_others(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    small = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (20, 64, 64)).astype(np.uint8))
    sitk.WriteImage(small, str(tmp_path / "eightbit.nrrd"))
    out = tmp_path / "out"
    proc = run_cli(
        "detect", bad, tmp_path / "eightbit.nrrd", SAMPLE_CT, tmp_path / "missing.nii.gz", "--output-dir", out, "--device", "cpu", "--progress-lines"
    )
    assert proc.returncode == 1
    assert "broken.nii.gz" in proc.stderr and "8-bit" in proc.stderr and "does not exist" in proc.stderr
    assert "3 of 4 inputs failed" in proc.stderr
    assert (out / "LIDC-IDRI-0001_sample_nodules.json").exists()
    assert not (out / "broken_nodules.json").exists()
    lines = proc.stdout.splitlines()
    progress = [json.loads(line[len(PROGRESS_PREFIX) :]) for line in lines if line.startswith(PROGRESS_PREFIX)]
    assert progress and {"stage", "fraction", "done", "total", "input"} <= set(progress[0])
    fractions = [p["fraction"] for p in progress if p["input"] == 2]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    results = [json.loads(line[len(RESULT_PREFIX) :]) for line in lines if line.startswith(RESULT_PREFIX)]
    assert len(results) == 1 and results[0]["json"].endswith("LIDC-IDRI-0001_sample_nodules.json")
    errors = [json.loads(line[len(ERROR_PREFIX) :]) for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 3
    models = [event[1] for line in lines if (event := parse(line)) and event[0] == "model"]  # the device actually used, for the Slicer panel
    assert len(models) == 1 and models[0]["device"] == "cpu" and models[0]["model"] and models[0]["input"] == str(SAMPLE_CT)


def test_existing_outputs_need_overwrite(sample_run):
    out, _ = sample_run
    before = (out / "LIDC-IDRI-0001_sample_nodules.json").read_text()
    proc = run_cli("detect", SAMPLE_CT, "--output-dir", out, "--device", "cpu")
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    assert (out / "LIDC-IDRI-0001_sample_nodules.json").read_text() == before


def test_bad_options_are_refused():
    proc = run_cli("detect", SAMPLE_CT, "--output-dir", "x", "--threshold", "3")
    assert proc.returncode == 2 and "--threshold 3.0 is outside (0, 1)" in proc.stderr
    proc = run_cli("detect", SAMPLE_CT, "--output-dir", "x", "--model", "/nonexistent/model.json")
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = run_cli("detect", SAMPLE_CT, "--output-dir", "x", "--model", str(REPO / "README.md"))  # not a model at all
    assert proc.returncode == 2 and "README.md' is not a model: give a model's .json" in proc.stderr


def test_help_lists_every_command():
    proc = run_cli("--help")
    for cmd in ("detect", "demo", "train", "pack"):
        assert cmd in proc.stdout


def test_dicom_series_folder_end_to_end(tmp_path):
    from conftest import shared

    folder = shared("dicom", "ct-64")
    proc = run_cli("detect", folder, "--output-dir", tmp_path, "--device", "cpu", "--progress-lines")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "ct-64_nodules.json").read_text())
    assert report["input"]["series_uid"] and report["input"]["size_ijk"][2] == 79
    prob = sitk.ReadImage(str(tmp_path / "ct-64_probability.nrrd"))
    assert list(prob.GetSize()) == report["input"]["size_ijk"]
    np.testing.assert_allclose(prob.GetOrigin(), report["input"]["origin_lps_mm"], atol=1e-3)


def test_findings_for_a_report(sample_run, tmp_path):
    """Issue 25: each candidate's type, guideline diameters, Lung-RADS, location and Brock risk; the exam's category; the inputs' sources."""
    out, _ = sample_run
    report = json.loads((out / "LIDC-IDRI-0001_sample_nodules.json").read_text())
    top = report["candidates"][0]
    assert top["type"] in ("solid", "part-solid", "non-solid", "calcified") and top["mean_diameter_mm"] > 15  # the 23 mm nodule
    assert top["long_axis_mm"] >= top["short_axis_mm"] > 0 and top["lung_rads"] == "4B"
    assert top["location"]["side"] == "left" and top["pleural_distance_mm"] is not None  # LIDC-IDRI-0001: LPS x +56 mm, the patient's left
    assert top["brock_risk"] is None and any("No Brock risk" in n for n in report["notes"])  # no age or sex given: not guessed
    assert report["lung_rads"] == {"version": "v2022", "category": "4B", "candidate_id": top["id"]}
    assert set(report["emphysema"]) == {"laa950_percent", "present", "cut_off_percent"}
    proc = run_cli("detect", SAMPLE_CT, "-o", tmp_path, "--device", "cpu", "--patient-age", "65", "--patient-sex", "F", "--spiculated", "1")
    assert proc.returncode == 0, proc.stderr
    with_patient = json.loads((tmp_path / "LIDC-IDRI-0001_sample_nodules.json").read_text())
    assert with_patient["patient"]["sources"] == {"age": "command line", "sex": "command line", "spiculated": "command line"}
    risk = with_patient["candidates"][0]["brock_risk"]
    assert 0.0 < risk < 1.0
    header = (tmp_path / "LIDC-IDRI-0001_sample_nodules.csv").read_text().splitlines()[0].split(",")
    assert {"type", "mean_diameter_mm", "solid_component_mean_diameter_mm", "lung_rads", "side", "zone", "brock_risk"} <= set(header)
    seg = sitk.ReadImage(str(tmp_path / "LIDC-IDRI-0001_sample.seg.nrrd"))
    assert "LungNoduleAI.LungRADS:4B" in seg.GetMetaData("Segment0_Tags")
    proc = run_cli("detect", SAMPLE_CT, "-o", tmp_path / "x", "--spiculated", "first")
    assert proc.returncode == 2 and "--spiculated takes candidate ids" in proc.stderr

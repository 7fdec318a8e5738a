"""Every result knows its CT, and an export refuses another one (issue 24, parts 1 and 2).

Real files made from the bundled sample: the sample detected as a NIfTI file
and as a DICOM series, reviewed as an annotator would, then exported with the
right CT, another patient's series, other voxels, a moved segmentation.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom_export import detected, review  # noqa: F401  (the DICOM sample and its detection)

from conftest import REPO, SAMPLE_CT
from dicom_series import write_ct_series
from LungNoduleAILib.cli import main
from LungNoduleAILib.export import read_segmentation
from LungNoduleAILib.imageio import read_ct
from LungNoduleAILib.pipeline import Detector
from LungNoduleAILib.provenance import SOURCE_HEADER_KEY, TAG_SOURCE_SERIES, TAG_SOURCE_SHA256
from LungNoduleAILib.writers import write_segmentation_labelmap

OTHER_PATIENT = {"PatientName": "Other^Patient", "PatientID": "LNAI-OTHER-2", "PatientBirthDate": "19700101", "PatientSex": "M"}


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory, bundled_model):
    out = tmp_path_factory.mktemp("nifti_run")
    Detector(bundled_model).detect_to_files(SAMPLE_CT, out, threshold=0.1)
    return out / "LIDC-IDRI-0001_sample.seg.nrrd", out


def _export(seg, tmp_path, *args):
    out = tmp_path / "export"
    code = main(["export", str(seg), "-o", str(out), "--include-pending", *map(str, args)])
    return code, out


def _nothing_written(out):
    return not out.exists() or not any(out.iterdir())


def test_results_record_their_source(detected, nifti_run):  # noqa: F811
    seg_path, out = nifti_run
    report = json.loads((out / "LIDC-IDRI-0001_sample_nodules.json").read_text())
    ct = read_ct(SAMPLE_CT)
    assert report["input"]["voxel_sha256"] == ct.identity()["voxel_sha256"]
    assert report["input"]["series_uid"] is None and report["input"]["patient_id"] is None
    seg = read_segmentation(seg_path)
    assert seg.source["voxel_sha256"] == ct.identity()["voxel_sha256"] and seg.source["size_ijk"] == [503, 376, 40]
    assert all(s["tags"][TAG_SOURCE_SHA256] == ct.identity()["voxel_sha256"] for s in seg.segments)
    dicom_report = json.loads((detected["root"] / "out" / "dcm_nodules.json").read_text())
    assert dicom_report["input"]["patient_id"] == "LNAI-TEST-1"
    assert dicom_report["input"]["series_uid"] == detected["series_uid"] and dicom_report["input"]["study_uid"] == detected["study_uid"]
    assert dicom_report["input"]["frame_of_reference_uid"] == detected["frame_uid"]
    dicom_seg = read_segmentation(detected["seg"])
    assert dicom_seg.source["patient_id"] == "LNAI-TEST-1"
    assert {s["tags"][TAG_SOURCE_SERIES] for s in dicom_seg.segments} == {detected["series_uid"]}


def test_export_into_another_patients_series_is_refused(detected, tmp_path, capsys):  # noqa: F811
    """Same voxels, another patient: the UIDs decide, and nothing is written."""
    other = tmp_path / "other_patient"
    write_ct_series(read_ct(SAMPLE_CT).image, other, patient=OTHER_PATIENT)
    reviewed = tmp_path / "rev.seg.nrrd"
    review(detected["seg"], reviewed, {0: "accepted"})  # as Slicer saves it: segment tags kept, our header key gone
    assert read_segmentation(reviewed).source is None
    code, out = _export(reviewed, tmp_path, "--dicom", other, "--formats", "dcm-seg,dcm-sr")
    err = capsys.readouterr().err
    assert code == 1 and "was made on another CT than the DICOM series" in err and f"SeriesInstanceUID {detected['series_uid']}" in err
    assert _nothing_written(out)
    # the file as detect wrote it (header kept) also names the patients
    code, out = _export(detected["seg"], tmp_path, "--dicom", other, "--formats", "dcm-seg")
    err = capsys.readouterr().err
    assert code == 1 and "PatientID LNAI-TEST-1 vs LNAI-OTHER-2" in err and _nothing_written(out)
    # the right series still exports
    code, out = _export(reviewed, tmp_path, "--dicom", detected["dcm"], "--formats", "dcm-seg,json")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "rev_reviewed_nodules.json").read_text())
    assert report["source"]["patient_id"] == "LNAI-TEST-1" and report["source"]["series_uid"] == detected["series_uid"]


def test_export_with_another_ct_file_is_refused(nifti_run, tmp_path, capsys):
    seg_path, _ = nifti_run
    image = read_ct(SAMPLE_CT).image
    arr = sitk.GetArrayFromImage(image)
    arr[20, 100, 100] += 1  # one voxel differs: same grid, other CT
    other = sitk.GetImageFromArray(arr)
    other.CopyInformation(image)
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"))
    code, out = _export(seg_path, tmp_path, "--ct", tmp_path / "other.nrrd")
    err = capsys.readouterr().err
    assert code == 1 and "voxel checksum" in err and "Nothing was exported" in err and _nothing_written(out)
    code, out = _export(seg_path, tmp_path, "--ct", SAMPLE_CT)
    assert code == 0, capsys.readouterr().err


def _shifted_copy(seg_path, dst, shift_lps_mm, drop_source=False):
    """The .seg.nrrd moved in space (its origin changed), as a careless edit or a wrong transform leaves it."""
    seg = read_segmentation(seg_path)
    img = sitk.Image(seg.layers[0])
    img.SetOrigin(tuple(np.add(img.GetOrigin(), shift_lps_mm)))
    segments = [{**s, "tags": {k: v for k, v in s["tags"].items() if not (drop_source and k.startswith("LungNoduleAI.Source"))}} for s in seg.segments]
    for s in segments:
        s["tags"]["LungNoduleAI.ReviewStatus"] = "accepted" if s["label"] == 1 else "rejected"
    write_segmentation_labelmap(img, segments, dst, source=None if drop_source else seg.source)
    return dst


def test_segmentation_moved_partly_off_the_ct_is_refused_naming_the_segment(nifti_run, tmp_path, capsys):
    seg_path, _ = nifti_run
    first = read_segmentation(seg_path).segments[0]["name"]
    moved = _shifted_copy(seg_path, tmp_path / "moved.seg.nrrd", (0, 0, 40.0))
    code, out = _export(moved, tmp_path, "--ct", SAMPLE_CT)
    err = capsys.readouterr().err
    assert code == 1 and f"Segment(s) {first} reach outside the CT given" in err and _nothing_written(out)


def test_hand_made_segmentation_needs_the_cts_exact_grid(nifti_run, tmp_path, capsys):
    seg_path, _ = nifti_run
    same = _shifted_copy(seg_path, tmp_path / "hand.seg.nrrd", (0, 0, 0), drop_source=True)
    assert read_segmentation(same).recorded_source("x") is None
    code, out = _export(same, tmp_path, "--ct", SAMPLE_CT)
    assert code == 0, capsys.readouterr().err
    moved = _shifted_copy(seg_path, tmp_path / "hand_moved.seg.nrrd", (0.0, 1.0, 0.0), drop_source=True)  # inside the CT, 1 mm off
    code, out = _export(moved, tmp_path / "b", "--ct", SAMPLE_CT)
    err = capsys.readouterr().err
    assert code == 1 and "records no source CT, and its grid is not that of" in err and "origin (LPS mm)" in err
    assert _nothing_written(out)


def test_segments_of_two_cts_in_one_file_are_refused(nifti_run, tmp_path, capsys):
    seg_path, _ = nifti_run
    seg = read_segmentation(seg_path)
    segments = [dict(s, tags=dict(s["tags"])) for s in seg.segments]
    segments[-1]["tags"][TAG_SOURCE_SHA256] = "0" * 64
    for s in segments:
        s["tags"]["LungNoduleAI.ReviewStatus"] = "accepted"
    write_segmentation_labelmap(seg.layers[0], segments, tmp_path / "mixed.seg.nrrd")
    code, out = _export(tmp_path / "mixed.seg.nrrd", tmp_path, "--ct", SAMPLE_CT)
    err = capsys.readouterr().err
    assert code == 1 and "holds segments made on different CTs" in err and _nothing_written(out)
    assert SOURCE_HEADER_KEY not in sitk.ReadImage(str(tmp_path / "mixed.seg.nrrd")).GetMetaDataKeys()


# ---------------------------------------------------------------- the Logic (real MRML, slicer-core)


@pytest.fixture()
def logic_setup(bundled_model):
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (make test installs it)")
    sys.path.insert(0, str(REPO / "LungNoduleAI"))
    from LungNoduleAILogic import LungNoduleAILogic
    from test_logic import load_volume, save_and_reload

    scene = slicer.vtkMRMLScene()
    logic = LungNoduleAILogic(scene)
    logic._detectors[(None, "cpu")] = Detector(bundled_model)
    volume = load_volume(scene, SAMPLE_CT)
    seg = logic.detect(volume, device="cpu").segmentationNode
    for n, sid in enumerate(logic.candidateSegmentIds(seg)):
        logic.setCandidateStatus(seg, sid, "accepted" if n == 0 else "rejected")
    return slicer, scene, logic, volume, seg, load_volume, save_and_reload


def test_logic_refuses_another_volume_and_another_patients_series(logic_setup, tmp_path):
    slicer, scene, logic, volume, seg, load_volume, save_and_reload = logic_setup
    image = read_ct(SAMPLE_CT).image
    arr = sitk.GetArrayFromImage(image)
    arr[:, :, :5] = -1000  # another CT of the same grid
    other = sitk.GetImageFromArray(arr)
    other.CopyInformation(image)
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"))
    otherVolume = load_volume(scene, tmp_path / "other.nrrd", name="other")
    with pytest.raises(ValueError, match="was made on another CT than volume 'other': voxel checksum"):
        logic.exportReviewed(seg, otherVolume, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    # a volume not loaded through the DICOM module, with another patient's series as the DICOM source
    write_ct_series(other, tmp_path / "other_dcm", patient=OTHER_PATIENT)
    with pytest.raises(ValueError, match="Volume 'ct' was made on another CT than the DICOM series"):
        logic.exportReviewed(seg, volume, str(tmp_path / "b"), formats=("dcm-seg",), dicomSource=str(tmp_path / "other_dcm"))
    assert not (tmp_path / "b").exists()
    # the recorded source survives a .seg.nrrd round trip (segment tags) and still refuses
    back = save_and_reload(scene, seg, tmp_path / "saved.seg.nrrd")
    assert logic.recordedSource(back)["voxel_sha256"] == read_ct(SAMPLE_CT).identity()["voxel_sha256"]
    with pytest.raises(ValueError, match="voxel checksum"):
        logic.exportReviewed(back, otherVolume, str(tmp_path / "c"))
    assert logic.exportReviewed(back, volume, str(tmp_path / "d"), formats=("csv",))


def test_logic_refuses_a_hand_drawn_segment_reaching_outside_the_volume(logic_setup, tmp_path):
    slicer, scene, logic, volume, seg, _, _ = logic_setup
    import vtk
    from vtk.util import numpy_support

    hand = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "hand")
    dims = volume.GetImageData().GetDimensions()
    oriented = slicer.vtkOrientedImageData()
    oriented.SetExtent(10, 20, 10, 20, dims[2] - 3, dims[2] + 2)  # 3 slices inside, 3 beyond the last slice
    oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())[:] = 1
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    oriented.SetImageToWorldMatrix(m)
    sid = hand.AddSegmentFromBinaryLabelmapRepresentation(oriented, "hand drawn", (1.0, 0.0, 0.0))
    logic.setCandidateStatus(hand, sid, "accepted")
    assert logic.recordedSource(hand) is None
    with pytest.raises(ValueError, match="hand drawn reach outside volume 'ct'"):
        logic.exportReviewed(hand, volume, str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_logic_does_not_import_results_of_other_voxels(logic_setup, tmp_path, bundled_model):
    slicer, scene, logic, volume, seg, load_volume, _ = logic_setup
    Detector(bundled_model).detect_to_files(SAMPLE_CT, tmp_path / "run")
    assert logic.importResults(volume, str(tmp_path / "run")).candidates
    image = read_ct(SAMPLE_CT).image
    arr = sitk.GetArrayFromImage(image)
    arr[0] = -1000
    other = sitk.GetImageFromArray(arr)
    other.CopyInformation(image)
    sitk.WriteImage(other, str(tmp_path / "other.nrrd"))
    otherVolume = load_volume(scene, tmp_path / "other.nrrd", name="other")
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(
        ValueError, match="result set 'LIDC-IDRI-0001_sample_nodules.json' was made on another CT than volume 'other': voxel checksum.*Nothing was imported"
    ):
        logic.importResults(otherVolume, str(tmp_path / "run"))
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before

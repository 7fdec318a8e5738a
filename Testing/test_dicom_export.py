"""DICOM SEG and TID 1500 SR export of reviewed nodules: read back, compared voxel by voxel, validated by dciodvfy."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_CT, shared
from dicom_series import PATIENT, check_seg_matches_labels, dciodvfy_errors, sr_groups, write_ct_series, write_tilted_series
from LungNoduleAILib.cli import main
from LungNoduleAILib.dicomseg import seg_masks_on_slices
from LungNoduleAILib.export import read_segmentation
from LungNoduleAILib.imageio import read_ct
from LungNoduleAILib.pipeline import Detector
from LungNoduleAILib.writers import NODULE_TERMINOLOGY, write_segmentation_labelmap

hd = pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def detected(tmp_path_factory, bundled_model):
    """The bundled sample as a DICOM series, and the detector's outputs on it (several candidates at p >= 0.1)."""
    root = tmp_path_factory.mktemp("sample_dicom")
    info = write_ct_series(read_ct(SAMPLE_CT).image, root / "dcm")
    Detector(bundled_model).detect_to_files(root / "dcm", root / "out", threshold=0.1)
    seg = read_segmentation(root / "out" / "dcm.seg.nrrd")
    assert len(seg.segments) >= 3
    return {"root": root, "dcm": root / "dcm", "seg": root / "out" / "dcm.seg.nrrd", "prob": root / "out" / "dcm_probability.nrrd", **info}


def review(seg_path, out_path, statuses: dict, dilate: tuple = (), default: str = "rejected") -> None:
    """Write a copy of ``seg_path`` with review statuses (by segment index; the others get ``default``) and some segments grown by one voxel, as an
    annotator leaves it.
    """
    seg = read_segmentation(seg_path)
    arr = sitk.GetArrayFromImage(seg.layers[0])
    for i in dilate:
        grown = sitk.BinaryDilate(sitk.Cast(seg.layers[0] == seg.segments[i]["label"], sitk.sitkUInt8), [1, 1, 1])
        arr[(sitk.GetArrayViewFromImage(grown) > 0) & (arr == 0)] = seg.segments[i]["label"]
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(seg.layers[0])
    segments = []
    for i, s in enumerate(seg.segments):
        tags = dict(s["tags"])
        status = statuses.get(i, default)
        tags["LungNoduleAI.ReviewStatus"] = status
        tags["Segmentation.Status"] = {"accepted": "completed", "rejected": "completed", "flagged": "flagged"}.get(status, "notstarted")
        tags["LungNoduleAI.Reviewer"] = "Dr Test"
        segments.append({**s, "tags": tags})
    write_segmentation_labelmap(img, segments, out_path)


def test_reviewed_sample_exports_seg_and_sr_that_match_the_labels_and_csv(detected, tmp_path, bundled_model):
    reviewed = tmp_path / "dcm_reviewed.seg.nrrd"
    review(detected["seg"], reviewed, {0: "accepted", 1: "accepted", 2: "rejected"}, dilate=(1,))
    out = tmp_path / "export"
    assert main(["export", str(reviewed), "--dicom", str(detected["dcm"]), "-o", str(out), "--formats", "seg.nrrd,dcm-seg,dcm-sr,nii.gz,csv,json"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "dcm_reviewed.seg.nrrd",
        "dcm_reviewed_labels.nii.gz",
        "dcm_reviewed_nodules.csv",
        "dcm_reviewed_nodules.json",
        "dcm_reviewed_seg.dcm",
        "dcm_reviewed_sr.dcm",
    ]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "dcm_reviewed_labels.nii.gz")))
    assert labels.max() == 2  # the rejected candidate is left out
    series = read_ct(detected["dcm"]).dicom
    check_seg_matches_labels(out / "dcm_reviewed_seg.dcm", labels, series)

    seg = pydicom.dcmread(str(out / "dcm_reviewed_seg.dcm"))
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == detected["series_uid"]
    assert seg.StudyInstanceUID == detected["study_uid"] and seg.FrameOfReferenceUID == detected["frame_uid"]
    assert str(seg.PatientName) == PATIENT["PatientName"] and seg.PatientID == PATIENT["PatientID"]
    items = list(seg.SegmentSequence)
    assert [s.SegmentAlgorithmType for s in items] == ["AUTOMATIC", "SEMIAUTOMATIC"]  # #2 was edited
    for s in items:
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert s.AnatomicRegionSequence[0].CodeValue == "39607008"
        assert s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == bundled_model.spec.name == "lung_nodule_unet"
        assert s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == bundled_model.spec.version
    assert len({s.TrackingUID for s in items}) == 2

    rows = list(csv.DictReader(open(out / "dcm_reviewed_nodules.csv", encoding="utf-8")))
    groups = sr_groups(out / "dcm_reviewed_sr.dcm")
    assert len(groups) == len(rows) == 2
    for g, row, s in zip(groups, rows, items):
        assert g["seg_uid"] == seg.SOPInstanceUID and g["segment"] == int(row["rank"])
        assert g["tracking_uid"] == s.TrackingUID
        v = g["values"]
        assert v["103339001"] == pytest.approx(float(row["long_axis_mm"]), abs=0.06)  # the Lung-RADS long axis (issue 25)
        assert v["103340004"] == pytest.approx(float(row["short_axis_mm"]), abs=0.06)
        assert v["81827009"] == pytest.approx(float(row["mean_diameter_mm"]), abs=0.06)  # diameter, derivation mean
        assert v["SOLIDDIAM"] == pytest.approx(float(row["solid_component_mean_diameter_mm"]), abs=0.06)
        assert g["codes"]["NODTYPE"] in ("SOLID", "PARTSOLID", "112120", "237897009") and g["codes"]["111005"] == "LR2022-" + row["lung_rads"]
        assert v["EQDIAM"] == pytest.approx(float(row["diameter_mm"]), abs=0.006)
        assert v["118565006"] == pytest.approx(float(row["volume_mm3"]), abs=0.06)
        assert v["373098007"] == pytest.approx(float(row["mean_hu"]), abs=0.06)
        assert 0.1 <= v["DETPROB"] <= 1.0
    assert dciodvfy_errors(out / "dcm_reviewed_seg.dcm") == []
    assert dciodvfy_errors(out / "dcm_reviewed_sr.dcm") == []

    # the same nodule keeps its tracking UID when exported again
    again = tmp_path / "again"
    assert main(["export", str(out / "dcm_reviewed.seg.nrrd"), "--dicom", str(detected["dcm"]), "-o", str(again), "--formats", "dcm-seg"]) == 0
    assert [s.TrackingUID for s in pydicom.dcmread(str(again / "dcm_reviewed_seg.dcm")).SegmentSequence] == [s.TrackingUID for s in items]


def test_fractional_seg_holds_the_probability_inside_the_reviewed_masks(detected, tmp_path):
    reviewed = tmp_path / "r.seg.nrrd"
    review(detected["seg"], reviewed, {0: "accepted", 1: "rejected", 2: "rejected"})
    out = tmp_path / "frac"
    assert (
        main(["export", str(reviewed), "--dicom", str(detected["dcm"]), "-o", str(out), "--formats", "dcm-seg,nii.gz", "--probability", str(detected["prob"])])
        == 0
    )
    seg = pydicom.dcmread(str(out / "r_reviewed_seg.dcm"))
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "r_reviewed_labels.nii.gz")))
    series = read_ct(detected["dcm"]).dicom
    check_seg_matches_labels(out / "r_reviewed_seg.dcm", labels, series)
    masks, _ = seg_masks_on_slices(out / "r_reviewed_seg.dcm")
    values = np.concatenate([m[m > 0] for m in masks[1].values()])
    assert values.max() == 255 and len(np.unique(values)) > 10  # real probabilities, not a binary mask
    assert dciodvfy_errors(out / "r_reviewed_seg.dcm") == []


def _sphere_segmentation(ct: sitk.Image, centers_lps, radius_mm: float, path, tags: dict) -> None:
    arr = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    kk, jj, ii = np.indices(arr.shape)
    for n, c in enumerate(centers_lps, start=1):
        ci = np.asarray(ct.TransformPhysicalPointToContinuousIndex(c))
        d = np.sqrt(((ii - ci[0]) * ct.GetSpacing()[0]) ** 2 + ((jj - ci[1]) * ct.GetSpacing()[1]) ** 2 + ((kk - ci[2]) * ct.GetSpacing()[2]) ** 2)
        arr[d <= radius_mm] = n
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    segments = [
        {"id": f"S{n}", "name": f"Hand-drawn nodule {n}", "color": (0.2, 0.8, 0.3), "label": n, "tags": {"TerminologyEntry": NODULE_TERMINOLOGY, **tags}}
        for n in range(1, len(centers_lps) + 1)
    ]
    write_segmentation_labelmap(img, segments, path)


def test_real_dicom_series_manual_segments(tmp_path):
    folder = shared("dicom", "ct-64")
    ct = read_ct(folder)
    center = ct.image.TransformContinuousIndexToPhysicalPoint([v / 2 for v in ct.image.GetSize()])
    other = np.asarray(center) + [40.0, 0.0, 30.0]
    _sphere_segmentation(ct.image, [center, tuple(other)], 12.0, tmp_path / "ct64.seg.nrrd", {"Segmentation.Status": "completed"})
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "ct64.seg.nrrd"), "--dicom", str(folder), "-o", str(out)]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct64_reviewed_labels.nii.gz")))
    check_seg_matches_labels(out / "ct64_reviewed_seg.dcm", labels, ct.dicom)
    seg = pydicom.dcmread(str(out / "ct64_reviewed_seg.dcm"))
    assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["MANUAL", "MANUAL"]
    source = pydicom.dcmread(ct.dicom.files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    groups = sr_groups(out / "ct64_reviewed_sr.dcm")
    assert [g["segment"] for g in groups] == [1, 2] and all("DETPROB" not in g["values"] for g in groups)
    assert groups[0]["values"]["118565006"] == pytest.approx(4 / 3 * np.pi * 12.0**3, rel=0.25)
    assert dciodvfy_errors(out / "ct64_reviewed_seg.dcm") == []
    assert dciodvfy_errors(out / "ct64_reviewed_sr.dcm") == []


def test_seg_frames_of_a_tilted_series_lie_on_the_tilted_source_slices(tmp_path):
    center, radius = np.array([5.0, 8.0, 3.0]), 8.0
    write_tilted_series(tmp_path / "dcm", 20.0, tuple(center), radius)
    ct = read_ct(tmp_path / "dcm")
    # the annotator's segment: the sphere on the engine's regular grid
    _sphere_segmentation(ct.image, [tuple(center)], radius, tmp_path / "t.seg.nrrd", {"LungNoduleAI.ReviewStatus": "accepted"})
    from LungNoduleAILib.export import export_reviewed

    export_reviewed(tmp_path / "t.seg.nrrd", tmp_path / "out", dicom=tmp_path / "dcm", formats=["dcm-seg"])
    masks, _ = seg_masks_on_slices(tmp_path / "out" / "t_reviewed_seg.dcm")
    series = ct.dicom
    index = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    o = np.asarray(series.orientation)
    agree = total = 0
    for uid, mask in masks[1].items():
        k = index[uid]
        jj, ii = np.indices(mask.shape)
        pts = series.positions_lps_mm[k] + ii[..., None] * series.pixel_spacing_mm[1] * o[:3] + jj[..., None] * series.pixel_spacing_mm[0] * o[3:]
        truth = np.linalg.norm(pts - center, axis=-1) <= radius
        agree += int((truth & (mask > 0)).sum())
        total += int((truth | (mask > 0)).sum())
    assert agree / total > 0.8  # voxel-level agreement (IoU) of the SEG with the true sphere on the tilted planes


def test_refusals_say_what_is_wrong_and_write_nothing(detected, tmp_path, capsys):
    reviewed = tmp_path / "rev.seg.nrrd"
    review(detected["seg"], reviewed, {0: "accepted", 1: "accepted"}, default="pending")  # the others left pending
    out = tmp_path / "out"

    def refused(args, message, status=1):
        assert main(["export", str(reviewed), "-o", str(out), *args]) == status
        assert message in capsys.readouterr().err
        assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("keep"))

    refused(["--ct", str(SAMPLE_CT), "--formats", "dcm-seg"], "is not DICOM", status=2)  # a bad option: 2, as the README says
    refused(["--dicom", str(detected["dcm"])], "not yet accepted or rejected")
    refused(["--dicom", str(detected["dcm"]), "--formats", "dcm-seg,pdf"], "Unknown export format", status=2)
    all_rejected = tmp_path / "none.seg.nrrd"
    review(detected["seg"], all_rejected, {})
    assert main(["export", str(all_rejected), "--dicom", str(detected["dcm"]), "-o", str(out)]) == 1
    assert "No accepted segments" in capsys.readouterr().err
    assert main(["export", str(SAMPLE_CT), "--dicom", str(detected["dcm"]), "-o", str(out)]) == 1
    assert "no segment metadata" in capsys.readouterr().err
    ct64 = shared("dicom", "ct-64")
    assert main(["export", str(reviewed), "--dicom", str(ct64), "-o", str(out), "--include-pending"]) == 1
    assert "was made on another CT than the DICOM series" in capsys.readouterr().err  # before issue 24: "no voxel inside the CT given"

    # an earlier export is never overwritten unasked
    assert main(["export", str(reviewed), "--dicom", str(detected["dcm"]), "-o", str(out), "--include-pending", "--formats", "dcm-seg,csv"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(reviewed), "--dicom", str(detected["dcm"]), "-o", str(out), "--include-pending", "--formats", "dcm-seg,csv"]) == 1
    assert "already exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sr_marks_the_readers_type_and_the_category_that_follows():
    from LungNoduleAILib.dicomseg import ExportSegment, sr_evaluations

    def evaluations(measurements):
        seg = ExportSegment("Nodule 1", 0, 1, "SEMIAUTOMATIC", "Nodule 1", "2.25.1", measurements, (1.0, 0.0, 0.0))
        return [(concept.value, value.value, value.meaning) for concept, value in sr_evaluations(seg)]

    engine = evaluations({"type": "solid", "lung_rads": "4A"})
    assert engine == [("NODTYPE", "SOLID", "Solid nodule"), ("111005", "LR2022-4A", "Lung-RADS v2022 category 4A")]
    reader = evaluations({"type": "non-solid", "lung_rads": "2", "reader_overrides": {"type": "non-solid"}})
    assert reader == [("NODTYPERDR", "112120", "Ground glass opacity"), ("111005", "LR2022-2", "Lung-RADS v2022 category 2 (reader's type)")]
    assert evaluations({"longest_axial_diameter_mm": 5.0}) == []  # measured before the characterisation: nothing to evaluate

"""The MRML bridge (LungNoduleAILogic) headless with real MRML classes from slicer-core."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (make test installs it)")
import vtk  # noqa: E402

from conftest import LIDC0001_NODULE_DIAMETER_MM, LIDC0001_NODULE_LPS, REPO, SAMPLE_CT, oblique_direction  # noqa: E402

sys.path.insert(0, str(REPO / "LungNoduleAI"))
from LungNoduleAILib.geometry import lps_to_ras  # noqa: E402
from LungNoduleAILib.pipeline import Detector  # noqa: E402
from LungNoduleAILogic import LungNoduleAILogic  # noqa: E402

L = slicer.vtkSlicerSegmentationsModuleLogic
NODULE_RAS = lps_to_ras(LIDC0001_NODULE_LPS)


def load_volume(scene, path, name=None):
    """Load a volume file with Slicer's own storage node."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or "ct")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def save_and_reload(scene, segmentation, path):
    """Save a segmentation as .seg.nrrd with Slicer's own storage node and load it into a new node, as a reviewer's next session does."""
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    back = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(back)
    return back


def ras_to_ijk(volume, ras):
    m = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(m)
    return [int(round(v)) for v in m.MultiplyPoint([*ras, 1.0])[:3]]


@pytest.fixture(scope="module")
def detector(bundled_model):
    return Detector(bundled_model)


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def oblique_sample(tmp_path_factory):
    img = sitk.ReadImage(str(SAMPLE_CT))
    img.SetDirection(oblique_direction(15.0))
    path = tmp_path_factory.mktemp("oblique") / "oblique_sample.nrrd"
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def make_logic(scene, detector):
    logic = LungNoduleAILogic(scene)
    logic._detectors[(None, "cpu")] = detector  # reuse the loaded bundled model
    return logic


def test_detect_creates_nodes_in_ct_geometry(scene, detector):
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    result = logic.detect(volume, device="cpu")
    m_ct, m_prob, m_lab = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m_ct)
    result.probabilityNode.GetIJKToRASMatrix(m_prob)
    result.labelmapNode.GetIJKToRASMatrix(m_lab)
    for r in range(4):
        for c in range(4):
            assert m_prob.GetElement(r, c) == pytest.approx(m_ct.GetElement(r, c), abs=1e-6)
            assert m_lab.GetElement(r, c) == pytest.approx(m_ct.GetElement(r, c), abs=1e-6)
    seg = result.segmentationNode
    assert seg.GetSegmentation().GetNumberOfSegments() == len(result.candidates) >= 1
    top = result.candidates[0]
    assert np.linalg.norm(np.array(top["center_ras_mm"]) - NODULE_RAS) <= LIDC0001_NODULE_DIAMETER_MM / 2
    sid = logic.candidateSegmentIds(seg)[0]
    segment = seg.GetSegmentation().GetSegment(sid)
    assert segment.GetName().startswith("Nodule 1 (")
    assert logic.candidateStatus(seg, sid) == "pending" and L.GetSegmentStatus(segment) == L.NotStarted
    tag = vtk.mutable("")
    assert segment.GetTag("TerminologyEntry", tag) and "27925004^Nodule" in str(tag)
    # the segment's voxels sit on the probability peak near the nodule
    prob = slicer.util.arrayFromVolume(result.probabilityNode)
    mask, bbox = logic._segmentMask(seg, sid)
    i0, j0, k0, i1, j1, k1 = bbox
    region = prob[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1]
    assert region[mask > 0].max() == pytest.approx(region.max())
    assert region[mask > 0].max() == pytest.approx(top["probability"], abs=1e-4)
    # the candidate's centre maps into its own label
    assert slicer.util.arrayFromVolume(result.labelmapNode)[tuple(reversed(ras_to_ijk(volume, top["center_ras_mm"])))] == 1
    table = result.tableNode.GetTable()
    assert table.GetNumberOfRows() == len(result.candidates)
    assert table.GetColumnByName("status").GetValue(0) == "pending"
    assert result.probabilityNode.GetDisplayNode().GetLowerThreshold() == pytest.approx(result.report["threshold"])


def test_import_results_matches_engine_json(scene, detector, tmp_path, oblique_sample):
    out = detector.detect_to_files(oblique_sample, tmp_path)
    report = json.loads(out.outputs["json"].read_text())
    volume = load_volume(scene, oblique_sample, "oblique")
    result = LungNoduleAILogic(scene).importResults(volume, str(tmp_path))
    assert [c["center_ras_mm"] for c in result.candidates] == [c["center_ras_mm"] for c in report["candidates"]]
    labels = slicer.util.arrayFromVolume(result.labelmapNode)
    for c in report["candidates"][:5]:
        assert labels[tuple(reversed(ras_to_ijk(volume, c["center_ras_mm"])))] == c["rank"]
    # oblique: the top candidate is still the nodule (the world frame rotated with the image)
    assert result.segmentationNode.GetSegmentation().GetNumberOfSegments() == len(report["candidates"])


def test_status_survives_seg_nrrd_save_and_reload(scene, detector, tmp_path):
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    seg = logic.detect(volume, device="cpu", threshold=0.1).segmentationNode  # a low threshold gives 3 candidates on the sample
    ids = logic.candidateSegmentIds(seg)
    assert len(ids) >= 3
    logic.setCandidateStatus(seg, ids[0], "accepted", reviewer="dr.who")
    logic.setCandidateStatus(seg, ids[1], "rejected")
    assert not seg.GetDisplayNode().GetSegmentVisibility(ids[1])
    back = save_and_reload(scene, seg, tmp_path / "reviewed.seg.nrrd")
    assert logic.candidateStatus(back, ids[0]) == "accepted"
    assert L.GetSegmentStatus(back.GetSegmentation().GetSegment(ids[0])) == L.Completed
    tag = vtk.mutable("")
    assert back.GetSegmentation().GetSegment(ids[0]).GetTag("LungNoduleAI.Reviewer", tag) and str(tag) == "dr.who"
    assert logic.candidateStatus(back, ids[1]) == "rejected"
    assert logic.candidateStatus(back, ids[2]) == "pending"


def _grow_segment(logic, seg, sid, volume, voxels=2):
    """Edit a segment like the Segment Editor would: dilate it by a few voxels in-plane."""
    mask, (i0, j0, k0, i1, j1, k1) = logic._segmentMask(seg, sid)
    grown = np.pad(mask, ((0, 0), (voxels, voxels), (voxels, voxels)))
    from scipy import ndimage

    grown = ndimage.binary_dilation(grown, np.ones((1, 2 * voxels + 1, 2 * voxels + 1), bool)).astype(np.uint8)
    oriented = slicer.vtkOrientedImageData()
    oriented.SetExtent(i0 - voxels, i1 + voxels, j0 - voxels, j1 + voxels, k0, k1)
    oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    from vtk.util import numpy_support

    numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())[:] = grown.ravel()
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    oriented.SetImageToWorldMatrix(m)
    L.SetBinaryLabelmapToSegment(oriented, seg, sid, L.MODE_REPLACE, oriented.GetExtent())
    return int(grown.sum())


def test_export_reviewed_reflects_accept_reject_and_edit(scene, detector, tmp_path):
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    result = logic.detect(volume, device="cpu", threshold=0.1)  # a low threshold gives 3 candidates on the sample
    seg = result.segmentationNode
    ids = logic.candidateSegmentIds(seg)
    assert len(ids) >= 2
    with pytest.raises(ValueError, match="not yet accepted or rejected"):
        logic.exportReviewed(seg, volume, str(tmp_path / "x"))
    logic.setCandidateStatus(seg, ids[0], "accepted")
    for sid in ids[1:]:
        logic.setCandidateStatus(seg, sid, "rejected")
    assert not logic.isEdited(seg, ids[0])
    edited_voxels = _grow_segment(logic, seg, ids[0], volume)
    assert logic.isEdited(seg, ids[0])
    paths = logic.exportReviewed(seg, volume, str(tmp_path / "export"))
    names = sorted(p.split("/")[-1] for p in paths)
    assert names == ["ct_reviewed.seg.nrrd", "ct_reviewed_labels.nii.gz", "ct_reviewed_nodules.csv", "ct_reviewed_nodules.json"]
    labels = sitk.ReadImage(str(tmp_path / "export" / "ct_reviewed_labels.nii.gz"))
    arr = sitk.GetArrayFromImage(labels)
    assert set(np.unique(arr)) == {0, 1}
    assert int((arr == 1).sum()) == edited_voxels  # as edited, not as detected
    np.testing.assert_allclose(labels.GetOrigin(), sitk.ReadImage(str(SAMPLE_CT)).GetOrigin(), atol=1e-3)
    report = json.loads((tmp_path / "export" / "ct_reviewed_nodules.json").read_text())
    assert len(report["nodules"]) == 1
    nodule = report["nodules"][0]
    assert nodule["edited"] is True and nodule["review_status"] == "accepted"
    voxel_mm3 = float(np.prod(labels.GetSpacing()))
    assert nodule["volume_mm3"] == pytest.approx(edited_voxels * voxel_mm3, rel=1e-3)
    assert nodule["volume_mm3"] > result.candidates[0]["volume_mm3"]
    assert set(report["left_out"]) == set(ids[1:])
    import slicerio

    seg_file = slicerio.read_segmentation(str(tmp_path / "export" / "ct_reviewed.seg.nrrd"))
    assert [s["name"] for s in seg_file["segments"]] == [seg.GetSegmentation().GetSegment(ids[0]).GetName()]
    assert seg_file["segments"][0]["status"] == "completed"
    # an earlier export is never overwritten silently
    with pytest.raises(ValueError, match="already exist"):
        logic.exportReviewed(seg, volume, str(tmp_path / "export"))


def test_export_refusals(scene, detector, tmp_path):
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    seg = logic.detect(volume, device="cpu").segmentationNode
    ids = logic.candidateSegmentIds(seg)
    with pytest.raises(ValueError, match="Unknown export format"):
        logic.exportReviewed(seg, volume, str(tmp_path), formats=("png",))
    for sid in ids:
        logic.setCandidateStatus(seg, sid, "rejected")
    with pytest.raises(ValueError, match="No accepted candidates"):
        logic.exportReviewed(seg, volume, str(tmp_path))
    logic.setCandidateStatus(seg, ids[0], "accepted")
    # edited into emptiness
    empty = slicer.vtkOrientedImageData()
    empty.SetExtent(0, 0, 0, 0, 0, 0)
    empty.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    empty.GetPointData().GetScalars().Fill(0)
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    empty.SetImageToWorldMatrix(m)
    L.SetBinaryLabelmapToSegment(empty, seg, ids[0], L.MODE_REPLACE)
    with pytest.raises(ValueError, match="empty"):
        logic.exportReviewed(seg, volume, str(tmp_path / "e"))
    with pytest.raises(ValueError, match="Unknown review status"):
        logic.setCandidateStatus(seg, ids[0], "maybe")
    with pytest.raises(ValueError, match="is not in segmentation"):
        logic.setCandidateStatus(seg, "nope", "accepted")


def test_unwritable_export_folder(scene, detector, tmp_path):
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    seg = logic.detect(volume, device="cpu").segmentationNode
    for n, sid in enumerate(logic.candidateSegmentIds(seg)):
        logic.setCandidateStatus(seg, sid, "accepted" if n == 0 else "rejected")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ValueError, match="Cannot write to export folder"):
        logic.exportReviewed(seg, volume, str(blocker / "sub"))


def test_bad_inputs(scene, detector):
    logic = make_logic(scene, detector)
    with pytest.raises(ValueError, match="No input volume selected"):
        logic.detect(None)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label, np.zeros((20, 20, 20), np.uint8))
    with pytest.raises(ValueError, match="not a CT"):
        logic.detect(label)
    flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flat")
    slicer.util.updateVolumeFromArray(flat, np.full((1, 64, 64), -1000, np.int16))
    with pytest.raises(ValueError, match="fewer than 16"):
        logic.detect(flat)
    mr = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mr")
    slicer.util.updateVolumeFromArray(mr, np.random.default_rng(0).integers(0, 2000, (30, 64, 64)).astype(np.int16))
    with pytest.raises(ValueError, match="Hounsfield"):
        logic.detect(mr)
    nodes_before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError):
        logic.detect(mr)
    assert scene.GetNumberOfNodes() == nodes_before  # nothing added on failure


def test_rethreshold_keeps_reviewed_candidates(scene, detector):
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    result = logic.detect(volume, device="cpu")
    seg = result.segmentationNode
    ids = logic.candidateSegmentIds(seg)
    logic.setCandidateStatus(seg, ids[0], "accepted")
    before = seg.GetSegmentation().GetNumberOfSegments()
    new_ids = logic.rethreshold(seg, 0.1)
    after_ids = logic.candidateSegmentIds(seg)
    assert ids[0] in after_ids and logic.candidateStatus(seg, ids[0]) == "accepted"
    assert len(new_ids) >= 1 and seg.GetSegmentation().GetNumberOfSegments() > before  # a lower threshold finds more
    assert all(logic.candidateStatus(seg, s) == "pending" for s in new_ids)
    assert result.tableNode.GetTable().GetNumberOfRows() == len(after_ids)


def test_rethreshold_draws_candidates_at_the_models_segment_threshold(scene, detector):
    """Above the model's segment threshold (0.5), re-thresholding re-finds the nodule with the same outline, not a smaller core."""
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    seg = logic.detect(volume, device="cpu").segmentationNode
    detected = int(logic._segmentMask(seg, logic.candidateSegmentIds(seg)[0])[0].sum())
    new_ids = logic.rethreshold(seg, 0.99)
    assert len(new_ids) == 1
    assert int(logic._segmentMask(seg, new_ids[0])[0].sum()) == detected


@pytest.fixture(scope="module")
def sample_dicom(tmp_path_factory):
    from dicom_series import write_ct_series

    folder = tmp_path_factory.mktemp("sample_dicom")
    info = write_ct_series(sitk.ReadImage(str(SAMPLE_CT)), folder, shuffle_names=False)  # Slicer's archetype reader goes by file name
    return folder, info


def load_dicom_volume(scene, folder, info):
    """A CT as Slicer's DICOM module leaves it: read from the series, with the instance UIDs it came from."""
    volume = load_volume(scene, sorted(folder.glob("*.dcm"))[0], name="Chest CT")
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(info["sop_uids"]))
    return volume


def test_export_dicom_seg_and_sr_from_a_dicom_volume(scene, detector, tmp_path, sample_dicom):
    import pydicom

    from dicom_series import check_seg_matches_labels, dciodvfy_errors, sr_groups

    folder, info = sample_dicom
    volume = load_dicom_volume(scene, folder, info)
    assert volume.GetImageData().GetDimensions()[2] == 40
    # as the DICOM module files it: patient > study > series
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Test^Nodule"), "Chest CT study")
    item = sh.GetItemByDataNode(volume)
    sh.SetItemParent(item, study) if item else sh.CreateItem(study, volume)
    logic = make_logic(scene, detector)
    result = logic.detect(volume, device="cpu", threshold=0.1)
    seg = result.segmentationNode
    assert volume.GetAttribute("DICOM.instanceUIDs") == " ".join(info["sop_uids"])  # the link to the instances is kept
    for node in (result.segmentationNode, result.probabilityNode, result.labelmapNode):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study  # results sit in the CT's study
    ids = logic.candidateSegmentIds(seg)
    logic.setCandidateStatus(seg, ids[0], "accepted", reviewer="Doe^Jane")
    logic.setCandidateStatus(seg, ids[1], "accepted", reviewer="Doe^Jane")
    for sid in ids[2:]:
        logic.setCandidateStatus(seg, sid, "rejected")
    _grow_segment(logic, seg, ids[1], volume)
    out = tmp_path / "dicom"
    paths = logic.exportReviewed(seg, volume, str(out), formats=("dcm-seg", "dcm-sr", "nii.gz", "csv"), dicomSource=str(folder))
    assert sorted(p.split("/")[-1] for p in paths) == [
        "Chest CT_reviewed_labels.nii.gz",
        "Chest CT_reviewed_nodules.csv",
        "Chest CT_reviewed_seg.dcm",
        "Chest CT_reviewed_sr.dcm",
    ]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "Chest CT_reviewed_labels.nii.gz")))
    from LungNoduleAILib.imageio import read_ct

    check_seg_matches_labels(out / "Chest CT_reviewed_seg.dcm", labels, read_ct(folder).dicom)
    ds = pydicom.dcmread(str(out / "Chest CT_reviewed_seg.dcm"))
    assert [s.SegmentAlgorithmType for s in ds.SegmentSequence] == ["AUTOMATIC", "SEMIAUTOMATIC"]
    assert str(ds.ContentCreatorName) == "Doe^Jane"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == info["series_uid"]
    groups = sr_groups(out / "Chest CT_reviewed_sr.dcm")
    assert [g["segment"] for g in groups] == [1, 2] and all(g["seg_uid"] == ds.SOPInstanceUID for g in groups)
    assert dciodvfy_errors(out / "Chest CT_reviewed_seg.dcm") == [] and dciodvfy_errors(out / "Chest CT_reviewed_sr.dcm") == []
    # the tracking UIDs stay with the segments: a second export (here fractional) reuses them
    logic.exportReviewed(seg, volume, str(tmp_path / "again"), formats=("dcm-seg",), dicomSource=str(folder), segmentationType="fractional")
    again = pydicom.dcmread(str(tmp_path / "again" / "Chest CT_reviewed_seg.dcm"))
    assert again.SegmentationType == "FRACTIONAL"
    assert [s.TrackingUID for s in again.SegmentSequence] == [s.TrackingUID for s in ds.SegmentSequence]


def test_dicom_export_refusals(scene, detector, tmp_path, sample_dicom):
    folder, info = sample_dicom
    logic = make_logic(scene, detector)
    nifti = load_volume(scene, SAMPLE_CT)
    seg = logic.detect(nifti, device="cpu").segmentationNode
    for n, sid in enumerate(logic.candidateSegmentIds(seg)):
        logic.setCandidateStatus(seg, sid, "accepted" if n == 0 else "rejected")
    with pytest.raises(ValueError, match="was not loaded from DICOM.*DICOM module"):
        logic.exportReviewed(seg, nifti, str(tmp_path / "a"), formats=("dcm-seg", "csv"))
    assert not (tmp_path / "a").exists()
    volume = load_dicom_volume(scene, folder, info)
    with pytest.raises(ValueError, match="not in Slicer's DICOM database"):
        logic.exportReviewed(seg, volume, str(tmp_path / "b"), formats=("dcm-sr",))
    from conftest import shared

    with pytest.raises(ValueError, match="lacks 40 of the 40 instances"):
        logic.exportReviewed(seg, volume, str(tmp_path / "c"), formats=("dcm-seg",), dicomSource=str(shared("dicom", "ct-64")))
    with pytest.raises(ValueError, match="Unknown DICOM segmentation type"):
        logic.exportReviewed(seg, volume, str(tmp_path / "d"), formats=("dcm-seg",), dicomSource=str(folder), segmentationType="soft")


def test_default_threshold_is_the_models_own(scene, tmp_path):
    """The GUI starts at the threshold the chosen model was validated at, not at a fixed 0.5."""
    from LungNoduleAILib.model import ModelSpec, default_model_path

    logic = LungNoduleAILogic(scene)
    assert logic.defaultThreshold() == ModelSpec.from_json(default_model_path()).threshold != 0.5
    spec = ModelSpec(threshold=0.42)
    spec.to_json(tmp_path / "other.json")
    assert logic.defaultThreshold(str(tmp_path / "other.json")) == 0.42
    assert LungNoduleAILogic(scene, modelPath=str(tmp_path / "other.json")).defaultThreshold() == 0.42
    with pytest.raises(ValueError, match="missing.json' not found"):
        logic.defaultThreshold(str(tmp_path / "missing.json"))

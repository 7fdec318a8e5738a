"""The Slicer module in real use (issue 23): save and reload, switch segmentations, change the model, export twice, cancel.

Headless with real MRML classes from slicer-core, a real engine process and the bundled model;
what only a running Slicer can show is in LungNoduleAITest (LungNoduleAI.py).
"""

from __future__ import annotations

import csv
import datetime
import json
import shutil
import sys
import time

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (make test installs it)")

from conftest import REPO, SAMPLE_CT  # noqa: E402
from test_logic import _grow_segment, load_volume, make_logic, save_and_reload  # noqa: E402

sys.path.insert(0, str(REPO / "LungNoduleAI"))
from LungNoduleAILib.pipeline import Detector  # noqa: E402
from LungNoduleAILogic.dependencies import dicomExportRequirement, missingForDetection, pipConstraints  # noqa: E402
from LungNoduleAILogic.names import ATTR_MODEL, ATTR_THRESHOLD, REF_PROBABILITY, REF_TABLE, REF_VOLUME  # noqa: E402
from LungNoduleAILogic.process import EngineEvent, EngineProcess  # noqa: E402
from LungNoduleAILogic.session import ReviewSession, exportFolderName  # noqa: E402


@pytest.fixture(scope="module")
def detector(bundled_model):
    return Detector(bundled_model)


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def _detected(scene, detector, threshold=0.1):
    volume = load_volume(scene, SAMPLE_CT)
    logic = make_logic(scene, detector)
    result = logic.detect(volume, device="cpu", threshold=threshold)  # 0.1: several candidates on the sample
    return volume, logic, result.segmentationNode


def _reloaded(scene, seg, path):
    """The segmentation as a reviewer's next session has it: saved as .seg.nrrd (Slicer merges the segments into shared layers) and
    loaded into a new node, which the saved scene links to the same probability map, CT and table."""
    back = save_and_reload(scene, seg, path)
    for role in (REF_PROBABILITY, REF_VOLUME, REF_TABLE):
        back.SetNodeReferenceID(role, seg.GetNodeReferenceID(role))
    for attr in (ATTR_MODEL, ATTR_THRESHOLD):
        back.SetAttribute(attr, seg.GetAttribute(attr))
    return back


def test_after_save_and_reload_untouched_candidates_are_not_edited(scene, detector, tmp_path):
    """Defect 1: the shared labelmap layers of a saved .seg.nrrd made every candidate read as edited."""
    volume, logic, seg = _detected(scene, detector)
    ids = logic.candidateSegmentIds(seg)
    assert len(ids) >= 3
    back = _reloaded(scene, seg, tmp_path / "session1.seg.nrrd")
    segmentation = back.GetSegmentation()
    assert segmentation.GetNumberOfLayers() < segmentation.GetNumberOfSegments()  # the case at hand: layers are shared
    assert [logic.isEdited(back, sid) for sid in ids] == [False] * len(ids)
    _grow_segment(logic, back, ids[1], volume)
    assert logic.isEdited(back, ids[1]) and not logic.isEdited(back, ids[0]) and not logic.isEdited(back, ids[2])
    logic.setCandidateStatus(back, ids[0], "accepted")
    logic.setCandidateStatus(back, ids[1], "accepted")
    for sid in ids[2:]:
        logic.setCandidateStatus(back, sid, "rejected")
    logic.exportReviewed(back, volume, str(tmp_path / "export"), formats=("json",))
    report = json.loads(next((tmp_path / "export").glob("*_reviewed_nodules.json")).read_text())
    kinds = {n["segment_id"]: (n["algorithm_type"], n["edited"]) for n in report["nodules"]}
    assert kinds == {ids[0]: ("AUTOMATIC", False), ids[1]: ("SEMIAUTOMATIC", True)}


def test_after_reload_rethreshold_replaces_only_pending_untouched_candidates(scene, detector, tmp_path):
    volume, logic, seg = _detected(scene, detector)
    ids = logic.candidateSegmentIds(seg)
    back = _reloaded(scene, seg, tmp_path / "session1.seg.nrrd")
    logic.setCandidateStatus(back, ids[0], "accepted")
    _grow_segment(logic, back, ids[1], volume)  # edited, still pending
    pending_untouched = set(ids[2:])
    new_ids = logic.rethreshold(back, 0.3)
    after = set(logic.candidateSegmentIds(back))
    assert {ids[0], ids[1]} <= after  # reviewed and edited ones stay
    assert not (pending_untouched & after)  # the untouched pending ones were re-derived
    assert set(new_ids) <= after and all(logic.candidateStatus(back, s) == "pending" for s in new_ids)


def _model_copy(tmp_path, **changes):
    """A copy of the bundled model (same weights) with other candidate settings."""
    from LungNoduleAILib.model import default_model_path

    src = default_model_path()
    meta = json.loads(src.read_text())
    meta.update(changes)
    folder = tmp_path / "other_model"
    folder.mkdir()
    shutil.copy(src.with_suffix(".pt"), folder / meta["weights"])
    path = folder / "other.json"
    path.write_text(json.dumps(meta))
    return path


def test_rethreshold_uses_the_settings_of_the_model_that_detected(scene, detector, tmp_path):
    """Defect 4: re-thresholding used the bundled model's candidate settings whatever model made the candidates,
    and choosing another model in the panel re-derived the shown candidates."""
    volume, logic, seg = _detected(scene, detector, threshold=None)
    segment = seg.GetSegmentation().GetSegment(logic.candidateSegmentIds(seg)[0])
    detected_voxels = int(logic._segmentMask(seg, logic.candidateSegmentIds(seg)[0])[0].sum())
    # the candidates were made by a model whose segments are drawn at p >= 0.98 (not 0.5): record it as theirs
    other = _model_copy(tmp_path, segment_threshold=0.98)
    recorded = json.loads(seg.GetAttribute(ATTR_MODEL))
    seg.SetAttribute(ATTR_MODEL, json.dumps({**recorded, "path": str(other)}))
    logic.modelPath = None  # the panel's model: the bundled one
    assert logic.modelSpecFor(seg).segment_threshold == 0.98
    new_ids = logic.rethreshold(seg, 0.99)
    assert len(new_ids) == 1 and segment is not None
    assert int(logic._segmentMask(seg, new_ids[0])[0].sum()) < detected_voxels  # drawn at 0.98, not at the bundled 0.5
    # a model that is nowhere any more (other weights under the recorded name): refused, naming it
    seg.SetAttribute(ATTR_MODEL, json.dumps({**recorded, "path": str(tmp_path / "gone.json"), "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="is not available, so they cannot be re-derived with its settings"):
        logic.rethreshold(seg, 0.5)


def test_session_rows_follow_the_segmentation_the_selector_passes(scene, detector):
    """Defect 3: the table was rebuilt from the previous segmentation when the selector changed."""
    volume, logic, first = _detected(scene, detector)
    second = logic.detect(volume, device="cpu", threshold=0.9).segmentationNode
    session = ReviewSession(logic)
    rows = session.setSegmentation(first)
    assert [r.segmentId for r in rows] == logic.candidateSegmentIds(first)
    assert session.select(rows[-1].segmentId) is not None
    rows = session.setSegmentation(second)
    assert [r.segmentId for r in rows] == logic.candidateSegmentIds(second) and len(rows) < len(logic.candidateSegmentIds(first))
    assert session.selectedId is None  # the old selection does not carry over to another node
    assert session.select("Nodule_99") is None and session.selectedId is None
    assert session.setSegmentation(None) == []


def test_session_review_keys(scene, detector):
    volume, logic, seg = _detected(scene, detector)
    session = ReviewSession(logic)
    ids = [r.segmentId for r in session.setSegmentation(seg)]
    with pytest.raises(ValueError, match="Select a candidate in the table first"):
        session.setStatus("accepted")  # an expected condition, shown as status text
    center = session.select(ids[0])
    assert center is not None and len(center) == 3
    assert session.setStatus("accepted") == ids[1]  # accept moves on to the next pending
    session.select(ids[1])
    assert session.setStatus("flagged") == ids[1]  # flag stays
    assert session.nextPending() == ids[2]
    assert session.unresolvedCount() == len(ids) - 1
    for sid in ids[2:]:
        session.select(sid)
        session.setStatus("rejected")
    assert session.nextPending() is None
    assert [r.status for r in session.rows()] == ["accepted", "flagged"] + ["rejected"] * (len(ids) - 2)
    assert session.editTarget() == (seg, volume, ids[-1])


def test_threshold_set_for_another_model_does_not_rederive(scene, detector):
    """Defect 4 (panel side): a threshold set because another model was chosen is for the next run; the user's own re-derives."""
    volume, logic, seg = _detected(scene, detector)
    session = ReviewSession(logic)
    session.setSegmentation(seg)
    before = logic.candidateSegmentIds(seg)
    assert not session.thresholdEdited(0.9, byUser=False)
    assert not session.thresholdEdited(float(seg.GetAttribute(ATTR_THRESHOLD)), byUser=True)  # nothing to re-derive
    assert session.rethreshold(float(seg.GetAttribute(ATTR_THRESHOLD))) == [] and logic.candidateSegmentIds(seg) == before
    assert session.thresholdEdited(0.5, byUser=True)
    session.select(before[-1])
    session.rethreshold(0.95)
    assert float(seg.GetAttribute(ATTR_THRESHOLD)) == 0.95
    assert session.selectedId is None or session.selectedId in logic.candidateSegmentIds(seg)
    hand_drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # no probability map: nothing to re-derive
    session.setSegmentation(hand_drawn)
    assert not session.thresholdEdited(0.5, byUser=True)


def test_exporting_again_writes_a_new_folder_and_keeps_the_first(scene, detector, tmp_path):
    """Defect 7: a second export into the same folder always failed ("already exist")."""
    volume, logic, seg = _detected(scene, detector)
    session = ReviewSession(logic)
    ids = [r.segmentId for r in session.setSegmentation(seg)]
    logic.setCandidateStatus(seg, ids[0], "accepted")
    for sid in ids[1:]:
        logic.setCandidateStatus(seg, sid, "rejected")
    when = datetime.datetime(2026, 12, 8, 10, 15, 2)
    first = session.exportFolder(str(tmp_path), session.exportVolume(None), when)
    assert first.endswith("ct_export_20261208-101502")
    paths1 = logic.exportReviewed(seg, session.exportVolume(None), first)
    second = session.exportFolder(str(tmp_path), volume, when)  # the same second: still a new folder
    assert second != first
    logic.setCandidateStatus(seg, ids[1], "accepted")
    paths2 = logic.exportReviewed(seg, volume, second)
    assert all(p.startswith(first) for p in paths1) and all(p.startswith(second) for p in paths2)
    first_json = next(p for p in paths1 if p.endswith("_nodules.json"))
    assert len(json.loads(open(first_json).read())["nodules"]) == 1  # the first export is as it was
    second_json = next(p for p in paths2 if p.endswith("_nodules.json"))
    assert len(json.loads(open(second_json).read())["nodules"]) == 2
    assert exportFolderName("CT: chest/1", when) == "CT_chest_1_export_20261208-101502"  # a name any file system takes


def test_panel_updates_from_engine_events():
    """Defect 9: the device shown comes from a structured event, not from parsing a log line."""
    update = ReviewSession.panelUpdate(EngineEvent("model", {"model": "lung_nodule_unet", "version": "1.4.2", "device": "cuda:0"}))
    assert update.deviceText == "cuda:0" and update.progressPercent is None
    update = ReviewSession.panelUpdate(EngineEvent("progress", {"stage": "inference", "fraction": 0.456}))
    assert update.progressPercent == 45 and update.stage == "inference"
    assert ReviewSession.panelUpdate(EngineEvent("log", {"line": "model lung_nodule_unet 1.4.2 (device: auto)"})).deviceText is None
    assert ReviewSession.panelUpdate(EngineEvent("finished", {"returncode": 0, "cancelled": False})).finished


def _events_until_finished(proc, limit_s=30.0):
    events, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        events += proc.poll()
        if events and events[-1].kind == "finished":
            return events
        time.sleep(0.05)
    raise AssertionError(f"the process did not finish; log: {proc.log[-5:]}")


def test_cancel_returns_at_once_and_kills_a_process_that_ignores_sigterm():
    """Defect 10: cancel waited on the GUI thread for SIGTERM and SIGKILL; now it asks and returns, and polling finishes the job."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('started', flush=True); time.sleep(120)"
    proc = EngineProcess([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"})
    while not proc.log:
        proc.poll()
        time.sleep(0.05)
    proc.requestCancel(graceSeconds=0.5)
    assert proc.cancelling  # it asked; the process (ignoring SIGTERM) still runs, and the caller is free
    events = _events_until_finished(proc)
    assert events[-1].data["cancelled"] is True and not proc.running and not proc.cancelling


def test_undecodable_output_does_not_stop_the_reader():
    """Defect 5: a byte that is not UTF-8 in the engine's output must not kill the thread that reads it."""
    code = (
        "import sys; sys.stdout.buffer.write(b'caf\\xe9 \\xff\\n'); "
        'sys.stdout.buffer.write(b\'LUNGNODULEAI_PROGRESS {"stage": "read", "fraction": 0.5}\\n\'); sys.stdout.flush()'
    )
    proc = EngineProcess([sys.executable, "-c", code])
    events = _events_until_finished(proc)
    kinds = [e.kind for e in events]
    assert kinds == ["log", "progress", "finished"] and "\ufffd" in events[0].data["line"]
    assert events[-1].data["returncode"] == 0


def test_installs_never_replace_what_slicer_bundles():
    """Defects 2 and 6: pip is pinned to the installed torch, numpy, pydicom...; DICOM export installs a highdicom that fits Slicer's pydicom."""
    constraints = pipConstraints({"torch": "2.5.1+cpu", "numpy": "1.26.4", "pydicom": "2.4.4", "monai": "1.5.0"})
    assert constraints.splitlines() == ["numpy==1.26.4", "pydicom==2.4.4", "torch==2.5.1+cpu"]  # what may be installed is not pinned
    assert dicomExportRequirement("3.0.2", "0.27.0") is None  # Slicer 5.12: bundled, nothing to install
    assert dicomExportRequirement("2.4.4", None) == "highdicom==0.22.0"  # Slicer 5.10: the last highdicom for pydicom 2.x
    assert dicomExportRequirement("3.0.2", None) == "highdicom>=0.26"
    with pytest.raises(ValueError, match="needs pydicom 3.0.1 or later, but Slicer's pydicom is 2.4.4"):
        dicomExportRequirement("2.4.4", "0.26.1")  # what the old route left behind
    assert dicomExportRequirement("2.4.4", "0.22.0") is None
    assert missingForDetection(lambda name: None) == ["monai>=1.4"] and missingForDetection(lambda name: object()) == []


def test_reader_overrides_type_spiculation_and_patient_and_the_category_and_risk_follow(scene, detector, tmp_path):
    """Issue 25, reader in charge: what the reader sets is stored beside the engine's values, the category and risk follow
    at once, an edit is re-measured from the voxels, and the export carries the reader's decisions marked as such."""
    from LungNoduleAILib.characterise import lung_rads_category
    from LungNoduleAILib.review import TAG_BROCK, TAG_LUNG_RADS, TAG_MEAN_DIAMETER, TAG_READER_TYPE, TAG_TYPE

    volume, logic, seg = _detected(scene, detector)
    ids = logic.candidateSegmentIds(seg)
    top = seg.GetSegmentation().GetSegment(ids[0])
    assert logic.examFindings(seg)["lung_rads"]["category"] == logic.segmentTag(top, TAG_LUNG_RADS)
    assert logic.segmentTag(top, TAG_TYPE) in ("solid", "part-solid", "non-solid", "calcified")
    assert not logic.segmentTag(top, TAG_BROCK)  # the sample has no age or sex: no risk
    logic.setPatientInputs(seg, age=65, sex="F")
    risk = float(logic.segmentTag(top, TAG_BROCK))
    assert 0 < risk < 1 and logic.patientInputs(seg).sources == {"age": "reader", "sex": "reader"}
    logic.setReaderFinding(seg, ids[0], spiculated=True)
    assert float(logic.segmentTag(top, TAG_BROCK)) > risk
    mean = float(logic.segmentTag(top, TAG_MEAN_DIAMETER))
    logic.setReaderFinding(seg, ids[0], type="non-solid")
    assert logic.segmentTag(top, TAG_READER_TYPE) == "non-solid" and logic.segmentTag(top, TAG_TYPE) != "non-solid"  # the engine's value kept
    assert logic.segmentTag(top, TAG_LUNG_RADS) == lung_rads_category("non-solid", mean)
    with pytest.raises(ValueError, match="Unknown nodule type 'ggo'"):
        logic.setReaderFinding(seg, ids[0], type="ggo")
    with pytest.raises(ValueError, match="Sex 'X': use F or M"):
        logic.setPatientInputs(seg, sex="X")
    # an edit is measured again from the voxels
    _grow_segment(logic, seg, ids[1], volume, voxels=3)
    before = float(logic.segmentTag(seg.GetSegmentation().GetSegment(ids[1]), TAG_MEAN_DIAMETER))
    after = logic.remeasureCandidate(seg, ids[1])["mean_diameter_mm"]
    assert after > before and float(logic.segmentTag(seg.GetSegmentation().GetSegment(ids[1]), TAG_MEAN_DIAMETER)) == after
    # the export: the reader's type, and the category that follows, marked as the reader's
    logic.setCandidateStatus(seg, ids[0], "accepted")
    for sid in ids[1:]:
        logic.setCandidateStatus(seg, sid, "rejected")
    logic.exportReviewed(seg, volume, str(tmp_path / "export"), formats=("json", "csv"))
    nodule = json.loads(next((tmp_path / "export").glob("*_reviewed_nodules.json")).read_text())["nodules"][0]
    assert nodule["type"] == "non-solid" and nodule["reader_overrides"] == {"type": "non-solid", "spiculated": True}
    assert nodule["location"]["side"] in ("left", "right") and 0 < nodule["brock_risk"] < 1  # from the segment's tags
    assert nodule["lung_rads"] == lung_rads_category("non-solid", nodule["mean_diameter_mm"])
    row = next(csv.DictReader(open(next((tmp_path / "export").glob("*_reviewed_nodules.csv")), encoding="utf-8")))
    assert row["type"] == "non-solid" and row["reader_overrides"] == "type=non-solid;spiculated=yes"  # marked as the reader's


def test_session_remeasures_only_what_was_edited(scene, detector):
    from LungNoduleAILib.review import TAG_MEAN_DIAMETER

    volume, logic, seg = _detected(scene, detector)
    session = ReviewSession(logic)
    ids = [r.segmentId for r in session.setSegmentation(seg)]
    assert session.remeasureEdited() == []  # nothing edited
    _grow_segment(logic, seg, ids[1], volume, voxels=3)
    before = float(logic.segmentTag(seg.GetSegmentation().GetSegment(ids[1]), TAG_MEAN_DIAMETER))
    assert session.remeasureEdited() == [ids[1]]
    assert float(session.rows()[1].mean_diameter_mm) > before
    assert session.remeasureEdited() == []  # measured once per edit
    session.select(ids[0])
    logic.setReaderFinding(seg, ids[0], upperLobe=True)
    assert session.readerFinding() == {"upper_lobe": True}
    assert session.examSummary()["lung_rads"]["category"] in ("1", "2", "3", "4A", "4B")


def test_compare_with_the_prior_in_the_scene(scene, detector, tmp_path):
    """Issue 26 in the Logic: the current candidates compared with the prior's; results on the segments, the prior's
    review offered (not applied), the prior position of a matched nodule, resolved ones listed."""
    import SimpleITK as sitk
    from followup import move_and_reslice

    moved, _ = move_and_reslice(sitk.ReadImage(str(SAMPLE_CT)), 4.0, (6.0, -4.0, 3.0), (0.8, 0.8, 2.0))
    sitk.WriteImage(moved, str(tmp_path / "current.nrrd"), useCompression=True)
    prior_volume, logic, prior_seg = _detected(scene, detector, threshold=None)
    logic.setCandidateStatus(prior_seg, logic.candidateSegmentIds(prior_seg)[0], "accepted")
    current_volume = load_volume(scene, tmp_path / "current.nrrd", "current")
    current_seg = logic.detect(current_volume, device="cpu").segmentationNode
    report = logic.compareWithPrior(current_seg, prior_seg, intervalDays=365)
    assert report["registration"]["lung_mask_dice"] > 0.9 and report["prior_volume"] == prior_volume.GetName()
    top = logic.candidateSegmentIds(current_seg)[0]
    follow = logic.followUp(current_seg, top)
    assert follow["status"] == "matched" and follow["growth"] == "stable" and follow["prior_status"] == "accepted"
    assert logic.candidateStatus(current_seg, top) == "pending"  # the prior's review is offered, not applied
    assert follow["prior_segment_id"] == logic.candidateSegmentIds(prior_seg)[0]
    assert logic.priorPosition(current_seg, top) is not None
    assert isinstance(logic.resolvedNodules(current_seg), list)
    session = ReviewSession(logic)
    session.setSegmentation(current_seg)
    assert session.rows()[0].followup.startswith("matched") and "(prior: accepted)" in session.rows()[0].followup
    session.select(top)
    assert session.priorPosition() == logic.priorPosition(current_seg, top)
    with pytest.raises(ValueError, match="another one than the current"):
        session.compareWithPrior(current_seg, 365)

"""MRML bridge of LungNoduleAI: Slicer nodes <-> engine arrays.

Imports ``slicer`` (MRML, VTK) but never ``qt`` or ScriptedLoadableModule, so
it runs inside 3D Slicer and headless with the ``slicer-core`` wheel. Every
method takes or reaches the scene through ``LungNoduleAILogic.scene``.

Review statuses (``pending``, ``accepted``, ``rejected``, ``flagged``) are
stored on each segment twice: as Slicer's own segment status
(``Segmentation.Status``: not started / completed / flagged) and as our tag
``LungNoduleAI.ReviewStatus`` with the reviewer and the ISO time.
"""

from __future__ import annotations

import datetime
import getpass
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from LungNoduleAILib.candidates import Candidate, find_candidates
from LungNoduleAILib.geometry import geometry_from_ijk_to_ras, ijk_to_lps_matrix, ijk_to_ras_matrix
from LungNoduleAILib.imageio import CTVolume, to_hu, validate_ct
from LungNoduleAILib.protocol import find_outputs
from LungNoduleAILib.provenance import check_same_source, identity_tags, source_identity
from LungNoduleAILib.review import KNOWN_TAGS, PENDING, REJECTED, SLICER_STATUS, TAG_STATUS, review_status, segment_color, segment_name, segment_tags
from LungNoduleAILib.writers import mask_sha1, read_probability

from .exporting import ExportMixin
from .findings import FindingsMixin
from .followup import FollowUpMixin
from .names import (  # noqa: F401  (re-exported: the names the module has always offered)
    ATTR_DICOM_INSTANCES,
    ATTR_EXAM,
    ATTR_MODEL,
    ATTR_SOURCE,
    ATTR_THRESHOLD,
    EXPORT_FORMATS,
    REF_LABELMAP,
    REF_PROBABILITY,
    REF_TABLE,
    REF_VOLUME,
    REVIEW_STATUSES,
    TABLE_COLUMNS,
    TAG_BROCK,
    TAG_CENTER_RAS,
    TAG_DETECTED,
    TAG_DIAMETER,
    TAG_LUNG_RADS,
    TAG_MEAN_DIAMETER,
    TAG_PROBABILITY,
    TAG_RANK,
    TAG_REVIEW,
    TAG_REVIEW_TIME,
    TAG_REVIEWER,
    TAG_SOLID_DIAMETER,
    TAG_TYPE,
    TAG_VOLUME,
)

__all__ = ["LungNoduleAILogic", "LungNoduleAIResult", "REVIEW_STATUSES", "EXPORT_FORMATS"]


@dataclass
class LungNoduleAIResult:
    """Nodes made by one detection, and its candidates (engine dictionaries, JSON contract)."""

    probabilityNode: object
    labelmapNode: object
    segmentationNode: object
    tableNode: object
    candidates: list = field(default_factory=list)
    report: dict = field(default_factory=dict)


def _segmentationsLogic():
    """The Segmentations module logic: Slicer's own when running in Slicer, else a new one (static methods)."""
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):
        return modules.segmentations.logic()
    return slicer.vtkSlicerSegmentationsModuleLogic


class LungNoduleAILogic(ExportMixin, FindingsMixin, FollowUpMixin):
    """Detection, review and export on MRML nodes.

    Args:
        scene: the MRML scene (default: ``slicer.mrmlScene`` inside Slicer).
        modelPath: model metadata JSON (default: the bundled model).
    """

    def __init__(self, scene=None, modelPath: str | None = None):
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise ValueError("No MRML scene: pass scene=slicer.vtkMRMLScene() when running outside Slicer.")
        self.scene = scene
        self.modelPath = modelPath
        self._detectors: dict = {}

    # ------------------------------------------------------------------ conversions

    @staticmethod
    def _matrixToArray(matrix) -> np.ndarray:
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])

    @staticmethod
    def _arrayToMatrix(array: np.ndarray):
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(array[r, c]))
        return m

    def imageFromVolume(self, volumeNode) -> sitk.Image:
        """A SimpleITK image (LPS geometry) with the voxels of a scalar volume node."""
        self._checkCTVolume(volumeNode)
        return self._imageFromNode(volumeNode)

    def _imageFromNode(self, node) -> sitk.Image:
        """Voxels and geometry of any volume node (labelmaps too) as a SimpleITK image."""
        arr = slicer.util.arrayFromVolume(node)
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        origin, spacing, direction = geometry_from_ijk_to_ras(self._matrixToArray(m))
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetOrigin(origin)
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        return img

    def _updateVolumeFromImage(self, node, image: sitk.Image) -> None:
        slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
        node.SetIJKToRASMatrix(self._arrayToMatrix(ijk_to_ras_matrix(image)))

    def _checkCTVolume(self, volumeNode) -> None:
        if volumeNode is None:
            raise ValueError("No input volume selected: select the chest CT volume.")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode") or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(f"'{volumeNode.GetName()}' is a {volumeNode.GetClassName()}, not a CT: select a scalar (CT) volume.")
        image = volumeNode.GetImageData()
        if image is None:
            raise ValueError(f"Volume '{volumeNode.GetName()}' has no voxels.")
        if image.GetNumberOfScalarComponents() != 1:
            raise ValueError(f"Volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; a single-channel CT is needed.")

    def writeVolume(self, volumeNode, path: str) -> None:
        """Write a volume node to a file (NRRD/NIfTI by extension) without touching its own storage node."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        self.scene.AddNode(storage)
        try:
            storage.SetFileName(str(path))
            storage.SetUseCompression(False)
            if not storage.WriteData(volumeNode):
                raise ValueError(f"Could not write volume '{volumeNode.GetName()}' to '{path}'.")
        finally:
            self.scene.RemoveNode(storage)

    def ctFromVolume(self, volumeNode) -> CTVolume:
        """The engine's CT (int16 HU) from a volume node; refuses what is not a CT (``ValueError``)."""
        image = self.imageFromVolume(volumeNode)
        validate_ct(image, f"Volume '{volumeNode.GetName()}'")
        return CTVolume(image=to_hu(image), path=volumeNode.GetName(), name=volumeNode.GetName())

    # ------------------------------------------------------------------ detection

    def _detector(self, device: str):
        from LungNoduleAILib.pipeline import Detector

        key = (self.modelPath, device)
        if key not in self._detectors:
            self._detectors[key] = Detector(self.modelPath, device)
        return self._detectors[key]

    def detect(
        self,
        volumeNode,
        device: str = "auto",
        threshold: float | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        shouldCancel: Callable[[], bool] | None = None,
        useLungMask: bool = True,
    ) -> LungNoduleAIResult:
        """Run the engine in this process on ``volumeNode`` and add its results to the scene.

        Raises:
            ValueError: the volume is missing or not a CT, or a bad threshold.
            LungNoduleAILib.inference.DetectionCancelled: ``shouldCancel()`` returned True (the scene is unchanged).
        """
        ct = self.ctFromVolume(volumeNode)
        detector = self._detector(device)
        result = detector.detect(ct, threshold, useLungMask, progress, shouldCancel)
        report = result.report(detector.model)
        return self._addResultNodes(volumeNode, result.probability, result.labelmap, [c.to_dict() for c in result.candidates], report)

    def importResults(self, volumeNode, outputDir: str) -> LungNoduleAIResult:
        """Import what ``lungnoduleai detect`` wrote into ``outputDir`` for ``volumeNode``.

        Raises:
            ValueError: no or several result sets in the folder, or they were made on another CT
                (grid or voxel checksum recorded in the JSON).
        """
        self._checkCTVolume(volumeNode)
        files = find_outputs(outputDir)
        missing = [str(files[kind]) for kind in ("probability", "labelmap") if not files[kind].exists()]
        if missing:
            raise ValueError(f"Result file(s) {', '.join(missing)} missing next to '{files['json']}'.")
        report = json.loads(files["json"].read_text(encoding="utf-8"))
        probability = read_probability(files["probability"])
        labelmap = sitk.ReadImage(str(files["labelmap"]))
        ct = self.imageFromVolume(volumeNode)
        if probability.GetSize() != ct.GetSize() or not np.allclose(probability.GetOrigin(), ct.GetOrigin(), atol=1e-3):
            raise ValueError(
                f"Results in '{outputDir}' are for a {list(probability.GetSize())} grid at {list(probability.GetOrigin())}, "
                f"not for volume '{volumeNode.GetName()}' ({list(ct.GetSize())} at {list(ct.GetOrigin())})."
            )
        recorded = {k: v for k, v in report.get("input", {}).items() if k not in ("path", "name", "series_uid")}
        if recorded.get("voxel_sha256"):  # same grid is not enough: the results must be of these voxels
            check_same_source(
                recorded,
                source_identity(to_hu(ct)),
                f"The result set '{files['json'].name}'",
                f"volume '{volumeNode.GetName()}'",
                "Nothing was imported. Select the volume the results were detected on, or run Detect on this one.",
            )
        return self._addResultNodes(volumeNode, probability, labelmap, report["candidates"], report)

    # ------------------------------------------------------------------ nodes

    def _probabilityColorNode(self):
        name = "LungNoduleAI probability"
        node = self.scene.GetFirstNodeByName(name)
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
            node.SetTypeToUser()
            node.SetNumberOfColors(256)
            for i in range(256):
                t = i / 255.0
                # dark red -> red -> yellow -> white ("hot"), transparent at 0
                r, g, b = min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2))
                node.SetColor(i, f"p={t:.2f}", r, g, b, 0.0 if i == 0 else 1.0)
            node.SetAttribute("Category", "LungNoduleAI")
        return node

    def _addResultNodes(self, volumeNode, probability: sitk.Image, labelmap: sitk.Image, candidates: list[dict], report: dict) -> LungNoduleAIResult:
        baseName = volumeNode.GetName()
        threshold = float(report.get("threshold", 0.5))
        transformId = volumeNode.GetTransformNodeID()

        probNode = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self.scene.GenerateUniqueName(f"{baseName} nodule probability"))
        self._updateVolumeFromImage(probNode, sitk.Cast(probability, sitk.sitkFloat32))
        probNode.CreateDefaultDisplayNodes()
        display = probNode.GetDisplayNode()
        display.SetAndObserveColorNodeID(self._probabilityColorNode().GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(threshold)
        display.SetUpperThreshold(1.0)

        labelNode = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", self.scene.GenerateUniqueName(f"{baseName} nodule candidates"))
        self._updateVolumeFromImage(labelNode, sitk.Cast(labelmap, sitk.sitkUInt16))

        segNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{baseName} nodules"))
        segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segNode.SetAttribute(ATTR_MODEL, json.dumps(report.get("model", {})))
        segNode.SetAttribute(ATTR_EXAM, json.dumps({k: report[k] for k in ("lung_rads", "emphysema", "patient") if k in report}))
        source = {k: v for k, v in report.get("input", {}).items() if k not in ("path", "name")}
        if source.get("voxel_sha256"):
            segNode.SetAttribute(ATTR_SOURCE, json.dumps(source))
        labelArr = sitk.GetArrayViewFromImage(labelmap)
        for i, cand in enumerate(candidates):
            self._addCandidateSegment(segNode, labelmap, labelArr, cand, i)

        tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(f"{baseName} nodule candidates table"))
        for node in (probNode, labelNode, segNode, tableNode):
            if transformId:
                node.SetAndObserveTransformNodeID(transformId)
        self._placeBesideInSubjectHierarchy(volumeNode, (probNode, labelNode, segNode, tableNode))
        segNode.SetNodeReferenceID(REF_PROBABILITY, probNode.GetID())
        segNode.SetNodeReferenceID(REF_LABELMAP, labelNode.GetID())
        segNode.SetNodeReferenceID(REF_TABLE, tableNode.GetID())
        segNode.SetNodeReferenceID(REF_VOLUME, volumeNode.GetID())
        segNode.SetAttribute(ATTR_THRESHOLD, str(threshold))
        self.updateTable(segNode)
        return LungNoduleAIResult(probNode, labelNode, segNode, tableNode, candidates, report)

    def _placeBesideInSubjectHierarchy(self, volumeNode, nodes) -> None:
        """Put result nodes in the CT's study (its parent in the subject hierarchy), as DICOM export tools expect."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if shNode is None:
            return
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        if not parent or parent == shNode.GetSceneItemID():
            return
        for node in nodes:
            item = shNode.GetItemByDataNode(node)
            if item:
                shNode.SetItemParent(item, parent)
            else:  # headless scenes have no plugin that creates items for new nodes
                shNode.CreateItem(parent, node)

    def _addCandidateSegment(self, segNode, labelmap: sitk.Image, labelArr: np.ndarray, cand: dict, index: int) -> str:
        i0, j0, k0, i1, j1, k1 = cand["bbox_ijk"]
        mask = (np.asarray(labelArr[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1]) == cand["rank"]).astype(np.uint8)
        oriented = slicer.vtkOrientedImageData()
        oriented.SetExtent(i0, i1, j0, j1, k0, k1)
        oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        from vtk.util import numpy_support

        flat = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())
        flat[:] = mask.ravel()
        oriented.SetImageToWorldMatrix(self._arrayToMatrix(ijk_to_ras_matrix(labelmap)))
        color = segment_color(index)
        c = Candidate.from_dict(cand)
        segmentId = segNode.AddSegmentFromBinaryLabelmapRepresentation(oriented, segment_name(c), color)
        segment = segNode.GetSegmentation().GetSegment(segmentId)
        model = json.loads(segNode.GetAttribute(ATTR_MODEL) or "{}")
        for key, value in segment_tags(c, model=f"{model['name']} {model['version']}" if model.get("name") else None).items():
            segment.SetTag(key, value)
        segment.SetTag(TAG_DETECTED, mask_sha1(mask, cand["bbox_ijk"]))
        source = json.loads(segNode.GetAttribute(ATTR_SOURCE) or "{}")
        for key, value in (identity_tags(source) if source else {}).items():
            segment.SetTag(key, value)
        segment.SetTag(TAG_CENTER_RAS, " ".join(f"{v:.2f}" for v in cand["center_ras_mm"]))
        _segmentationsLogic().SetSegmentStatus(segment, slicer.vtkSlicerSegmentationsModuleLogic.NotStarted)
        return segmentId

    def updateTable(self, segmentationNode) -> None:
        """Refill the candidates table of ``segmentationNode`` from its segments (rank order)."""
        tableNode = segmentationNode.GetNodeReference(REF_TABLE)
        if tableNode is None:
            return
        table = tableNode.GetTable()
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        for machine, title, kind in TABLE_COLUMNS:
            col = tableNode.AddColumn(vtk.vtkStringArray() if kind == "string" else (vtk.vtkIntArray() if kind == "int" else vtk.vtkDoubleArray()))
            col.SetName(machine)
            tableNode.SetColumnTitle(machine, title)
        rows = []
        segmentation = segmentationNode.GetSegmentation()
        for segmentId in self.candidateSegmentIds(segmentationNode):
            seg = segmentation.GetSegment(segmentId)
            center = self.segmentCenterRas(seg) or [0.0, 0.0, 0.0]
            rows.append(
                [
                    int(self.segmentTag(seg, TAG_RANK) or 0),
                    float(self.segmentTag(seg, TAG_PROBABILITY) or 0.0),
                    float(self.segmentTag(seg, TAG_DIAMETER) or 0.0),
                    float(self.segmentTag(seg, TAG_VOLUME) or 0.0),
                    self.segmentTag(seg, TAG_REVIEW) or PENDING,
                    self.segmentTag(seg, TAG_TYPE) or "",
                    float(self.segmentTag(seg, TAG_MEAN_DIAMETER) or "nan"),
                    self.segmentTag(seg, TAG_LUNG_RADS) or "",
                    float(self.segmentTag(seg, TAG_BROCK) or "nan"),
                    segmentId,
                    *center,
                ]
            )
        table.SetNumberOfRows(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                table.GetColumn(c).SetValue(r, value)
        table.Modified()
        tableNode.EndModify(wasModifying)

    @staticmethod
    def segmentTag(segment, key: str) -> str | None:
        """The value of one tag of a ``vtkSegment`` (``key``: a ``TAG_*`` of :mod:`LungNoduleAILib.review`), ``None`` when it has none."""
        value = vtk.mutable("")
        return str(value) if segment.GetTag(key, value) else None

    def segmentTags(self, segment) -> dict[str, str]:
        """The tags of :data:`LungNoduleAILib.review.KNOWN_TAGS` a ``vtkSegment`` has (a segment cannot list its tags)."""
        return {k: v for k in KNOWN_TAGS if (v := self.segmentTag(segment, k)) is not None}

    def segmentCenterRas(self, segment) -> list[float] | None:
        """The candidate's centre (RAS, mm) as detected, ``None`` for a segment without one (drawn by hand)."""
        text = self.segmentTag(segment, TAG_CENTER_RAS)
        return [float(v) for v in text.split()] if text else None

    def segmentMeasurements(self, segment) -> dict[str, str]:
        """Rank, probability, diameter (mm), volume (mm³), type, mean and solid diameters (mm), Lung-RADS and Brock risk
        of a candidate as the detector recorded them (text; "" when absent)."""
        keys = {
            "rank": TAG_RANK,
            "probability": TAG_PROBABILITY,
            "diameter_mm": TAG_DIAMETER,
            "volume_mm3": TAG_VOLUME,
            "type": TAG_TYPE,
            "mean_diameter_mm": TAG_MEAN_DIAMETER,
            "solid_diameter_mm": TAG_SOLID_DIAMETER,
            "lung_rads": TAG_LUNG_RADS,
            "brock_risk": TAG_BROCK,
        }
        return {name: self.segmentTag(segment, tag) or "" for name, tag in keys.items()}

    def candidateSegmentIds(self, segmentationNode) -> list[str]:
        """Segment IDs of the candidates in rank order (segments without a rank come last, in order)."""
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

        def key(sid):
            rank = self.segmentTag(segmentation.GetSegment(sid), TAG_RANK)
            return (0, int(rank)) if rank else (1, ids.index(sid))

        return sorted(ids, key=key)

    # ------------------------------------------------------------------ review

    def _segment(self, segmentationNode, segmentId: str):
        if segmentationNode is None:
            raise ValueError("No segmentation given.")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise ValueError(f"Segment '{segmentId}' is not in segmentation '{segmentationNode.GetName()}'.")
        return segment

    def setCandidateStatus(self, segmentationNode, segmentId: str, status: str, reviewer: str | None = None) -> None:
        """Record a review decision: ``pending``, ``accepted``, ``rejected`` or ``flagged``.

        Stored as Slicer's segment status (not started / completed / completed / flagged)
        and as tags with our status, the reviewer (``reviewer``, else the login name)
        and the ISO time. Rejected candidates are hidden, not deleted.
        """
        if status not in REVIEW_STATUSES:
            raise ValueError(f"Unknown review status '{status}': use one of {', '.join(REVIEW_STATUSES)}.")
        segment = self._segment(segmentationNode, segmentId)
        L = slicer.vtkSlicerSegmentationsModuleLogic
        _segmentationsLogic().SetSegmentStatus(segment, L.GetSegmentStatusFromMachineReadableString(SLICER_STATUS[status]))
        segment.SetTag(TAG_REVIEW, status)
        if reviewer is None:
            try:
                reviewer = getpass.getuser()
            except Exception:  # no login name (some containers)
                reviewer = ""
        segment.SetTag(TAG_REVIEWER, reviewer)
        segment.SetTag(TAG_REVIEW_TIME, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        display = segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetSegmentVisibility(segmentId, status != REJECTED)
        self.updateTable(segmentationNode)

    def candidateStatus(self, segmentationNode, segmentId: str) -> str:
        """Our review status of a segment (``pending`` when never reviewed)."""
        segment = self._segment(segmentationNode, segmentId)
        return review_status({key: self.segmentTag(segment, key) for key in (TAG_REVIEW, TAG_STATUS)})

    def isEdited(self, segmentationNode, segmentId: str) -> bool:
        """Whether a candidate's voxels differ from what the detector produced."""
        segment = self._segment(segmentationNode, segmentId)
        detected = self.segmentTag(segment, TAG_DETECTED)
        if detected is None:
            return True  # not made by the detector
        return self.segmentFingerprint(segmentationNode, segmentId) != detected

    def segmentFingerprint(self, segmentationNode, segmentId: str) -> str:
        """:func:`LungNoduleAILib.writers.mask_sha1` of the segment's voxels as they are now (changes with every edit)."""
        arr, bbox = self._segmentMask(segmentationNode, segmentId)
        return mask_sha1(arr, bbox)

    def _segmentMask(self, segmentationNode, segmentId: str) -> tuple[np.ndarray, list[int]]:
        """The segment's voxels cropped to their bounding box ``[i0, j0, k0, i1, j1, k1]`` (segmentation's own grid)."""
        crop, bbox, _ = self._segmentVoxels(segmentationNode, segmentId)
        return crop, bbox

    def _segmentVoxels(self, segmentationNode, segmentId: str) -> tuple[np.ndarray, list[int], np.ndarray]:
        """``(mask cropped to its box, [i0, j0, k0, i1, j1, k1], 4x4 index->LPS of that grid)`` of one segment.

        Only this segment's own voxels: a layer shared with other segments (as after
        loading a ``.seg.nrrd`` or a scene) is thresholded at the segment's label value.
        """
        from vtk.util import numpy_support

        oriented = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, oriented)
        matrix = vtk.vtkMatrix4x4()
        oriented.GetImageToWorldMatrix(matrix)
        indexToLps = ijk_to_lps_matrix(self._matrixToArray(matrix))
        ext = oriented.GetExtent()
        empty = (np.zeros((0, 0, 0), np.uint8), [0, 0, 0, -1, -1, -1], indexToLps)
        if ext[0] > ext[1] or oriented.GetPointData().GetScalars() is None:
            return empty
        dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
        arr = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(dims) > 0
        nz = np.argwhere(arr)
        if nz.size == 0:
            return empty
        (k0, j0, i0), (k1, j1, i1) = nz.min(0), nz.max(0)
        crop = arr[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1].astype(np.uint8)
        return crop, [int(i0 + ext[0]), int(j0 + ext[2]), int(k0 + ext[4]), int(i1 + ext[0]), int(j1 + ext[2]), int(k1 + ext[4])], indexToLps

    def _segmentArrayOnVolume(self, segmentationNode, segmentIds: list[str], volumeNode) -> np.ndarray:
        """Label array ``(k, j, i)`` on ``volumeNode``'s grid: value n = n-th of ``segmentIds`` (resampled by Slicer)."""
        labelNode = slicer.vtkMRMLLabelMapVolumeNode()
        self.scene.AddNode(labelNode)
        try:
            ids = vtk.vtkStringArray()
            for sid in segmentIds:
                ids.InsertNextValue(sid)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelNode, volumeNode):
                raise ValueError(f"Could not export segments of '{segmentationNode.GetName()}' onto volume '{volumeNode.GetName()}'.")
            return self._labelImage(labelNode)
        finally:
            self.scene.RemoveNode(labelNode)

    # ------------------------------------------------------------------ threshold

    def rethreshold(self, segmentationNode, threshold: float) -> list[str]:
        """Re-derive candidates from the stored probability map at a new threshold.

        Candidates the user reviewed (not pending) or edited are kept untouched;
        pending, unedited ones are replaced by the new threshold's candidates
        that do not overlap a kept one. No network run. Returns the new segment IDs.
        """
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise ValueError(f"Threshold {threshold!r} is not a number: give a probability between 0 and 1, e.g. 0.5.") from None
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"Threshold {threshold} is outside (0, 1).")
        probNode = segmentationNode.GetNodeReference(REF_PROBABILITY)
        volume = segmentationNode.GetNodeReference(REF_VOLUME)
        if probNode is None or volume is None:
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no stored probability map or source volume: run Detect first.")
        probability = self.imageFromVolume(probNode)
        ct = self.imageFromVolume(volume)
        segmentation = segmentationNode.GetSegmentation()
        kept = []
        for sid in self.candidateSegmentIds(segmentationNode):
            if self.candidateStatus(segmentationNode, sid) == PENDING and not self.isEdited(segmentationNode, sid):
                segmentation.RemoveSegment(sid)
            else:
                kept.append(sid)
        keptMask = (
            sitk.GetArrayViewFromImage(self._segmentArrayOnVolume(segmentationNode, kept, volume)) > 0
            if kept
            else np.zeros(tuple(reversed(ct.GetSize())), bool)
        )
        spec = self.modelSpecFor(segmentationNode)
        labelmap, found = find_candidates(probability, to_hu(ct), threshold, spec)
        labelArr = sitk.GetArrayViewFromImage(labelmap)
        newIds = []
        rank = max([int(self.segmentTag(segmentation.GetSegment(s), TAG_RANK) or 0) for s in kept] + [0])
        for cand in found:
            if keptMask[labelArr == cand.id].any():
                continue
            rank += 1
            d = cand.to_dict()
            old = d["rank"]
            d["rank"] = d["id"] = rank
            relabeled = np.where(np.asarray(labelArr) == old, rank, 0).astype(np.uint16)
            newIds.append(self._addCandidateSegment(segmentationNode, labelmap, relabeled, d, rank - 1))
        segmentationNode.SetAttribute(ATTR_THRESHOLD, str(threshold))
        if probNode.GetDisplayNode() is not None:
            probNode.GetDisplayNode().SetLowerThreshold(threshold)
        self.updateTable(segmentationNode)
        return newIds

    def modelSpecFor(self, segmentationNode):
        """The settings of the model that made ``segmentationNode``'s candidates (recorded on the node), for re-deriving them.

        The recorded file is used when its weights are still those recorded (SHA-256); else this logic's
        model or the bundled one when their weights are; a node recorded before the SHA-256 was kept
        uses the recorded file, else this logic's model. Choosing another model in the panel therefore
        changes the next detection only, never how the shown candidates are re-derived.

        Raises:
            ValueError: the model that made the candidates is nowhere to be found (naming it).
        """
        from LungNoduleAILib.model import ModelSpec, default_model_path, file_sha256

        recorded = json.loads(segmentationNode.GetAttribute(ATTR_MODEL) or "{}")
        paths = [p for p in (recorded.get("path"), self.modelPath, str(default_model_path())) if p]
        sha = recorded.get("sha256")
        for path in paths:
            meta = Path(path)
            if not meta.is_file():
                continue
            spec = ModelSpec.from_json(meta)
            if sha is None or ((meta.parent / spec.weights).is_file() and file_sha256(meta.parent / spec.weights) == sha):
                return spec
        if sha is None:
            return self._modelSpec()
        raise ValueError(
            f"The model that detected the candidates of '{segmentationNode.GetName()}' ({recorded.get('name')} {recorded.get('version')}, "
            f"'{recorded.get('path')}', weights sha256 {sha[:12]}...) is not available, so they cannot be re-derived with its settings. "
            "Choose that model file in Advanced, or run Detect again."
        )

    def _modelSpec(self, modelPath: str | None = None):
        from LungNoduleAILib.model import ModelSpec, default_model_path

        path = Path(modelPath or self.modelPath or default_model_path())
        return ModelSpec.from_json(path) if path.exists() else None

    def defaultThreshold(self, modelPath: str | None = None) -> float:
        """The probability threshold a model was validated at (its metadata JSON), for the GUI's initial setting.

        Args:
            modelPath: model metadata JSON; default: this logic's model (the bundled one unless set).

        Raises:
            ValueError: ``modelPath`` does not exist.
        """
        if modelPath and not Path(modelPath).exists():
            raise ValueError(f"Model metadata '{modelPath}' not found: choose a model's .json file.")
        spec = self._modelSpec(modelPath)
        return float(spec.threshold) if spec else 0.5

    def _labelImage(self, labelNode) -> sitk.Image:
        return sitk.Cast(self._imageFromNode(labelNode), sitk.sitkUInt16)

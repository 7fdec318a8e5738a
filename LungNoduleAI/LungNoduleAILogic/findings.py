"""The reader in charge of the findings: overrides of type, spiculation and lobe, the patient's inputs, re-measurement after an edit.

:class:`FindingsMixin` is part of :class:`LungNoduleAILogic.LungNoduleAILogic`. The engine's values
stay in their tags (``LungNoduleAI.Type``...); what the reader sets is stored beside them
(``LungNoduleAI.ReaderType``...; :data:`LungNoduleAILib.review.READER_TAGS`) and the Lung-RADS
category and Brock risk follow at once (tags ``LungNoduleAI.LungRADS``, ``LungNoduleAI.BrockRisk``).
"""

from __future__ import annotations

import json

from LungNoduleAILib.characterise import NODULE_TYPES, brock_risk, lung_rads_category
from LungNoduleAILib.exam import PatientInputs
from LungNoduleAILib.imageio import to_hu
from LungNoduleAILib.review import (
    READER_TAGS,
    REJECTED,
    TAG_BROCK,
    TAG_DIAMETER,
    TAG_LUNG_RADS,
    TAG_MEAN_DIAMETER,
    TAG_RANK,
    TAG_SOLID_DIAMETER,
    TAG_TYPE,
    TAG_VOLUME,
    TAG_ZONE,
    reader_overrides,
)

from .names import ATTR_EXAM, REF_VOLUME

__all__ = ["FindingsMixin"]


class FindingsMixin:
    """Reader overrides and per-exam findings of :class:`LungNoduleAILogic.LungNoduleAILogic`."""

    def examFindings(self, segmentationNode) -> dict:
        """The detection's per-exam findings (``lung_rads``, ``emphysema``, ``patient``) as updated by the reader."""
        return json.loads(segmentationNode.GetAttribute(ATTR_EXAM) or "{}")

    def patientInputs(self, segmentationNode) -> PatientInputs:
        """The Brock inputs in use for this segmentation, each with its source."""
        return PatientInputs(**self.examFindings(segmentationNode).get("patient", {}))

    def setPatientInputs(self, segmentationNode, age: float | None = None, sex: str | None = None, familyHistory: bool | None = None) -> None:
        """The reader's patient inputs (``None``: keep what there is); Brock risks and the exam's category follow at once.

        Raises:
            ValueError: an age that is not one, or a sex other than F or M.
        """
        if age is not None and not 0 < float(age) < 130:
            raise ValueError(f"Age {age} is not an age in years.")
        if sex is not None and sex not in ("F", "M"):
            raise ValueError(f"Sex '{sex}': use F or M.")
        given = PatientInputs()
        for name, value in (("age", age), ("sex", sex), ("family_history", familyHistory)):
            if value is not None:
                setattr(given, name, float(value) if name == "age" else value)
                given.sources[name] = "reader"
        exam = self.examFindings(segmentationNode)
        exam["patient"] = self.patientInputs(segmentationNode).merged(given).to_dict()
        segmentationNode.SetAttribute(ATTR_EXAM, json.dumps(exam))
        self.updateFindings(segmentationNode)

    def setReaderFinding(
        self, segmentationNode, segmentId: str, type: str | None = None, spiculated: bool | None = None, upperLobe: bool | None = None
    ) -> None:
        """What the reader says of one candidate instead of the engine (``None``: unchanged; ``""`` for ``type``: back to the engine's).

        Raises:
            ValueError: an unknown type, or a segment not in the segmentation.
        """
        segment = self._segment(segmentationNode, segmentId)
        if type and type not in NODULE_TYPES:
            raise ValueError(f"Unknown nodule type '{type}': use one of {', '.join(NODULE_TYPES)}.")
        for name, value in (("type", type), ("spiculated", spiculated), ("upper_lobe", upperLobe)):
            if value is None:
                continue
            text = value if name == "type" else ("1" if value else "0")
            segment.SetTag(READER_TAGS[name], text)
        self.updateFindings(segmentationNode)

    def updateFindings(self, segmentationNode) -> None:
        """Recompute every candidate's Lung-RADS category and Brock risk from its measurements, the reader's overrides and
        the patient's inputs; then the exam's category (the highest among candidates not rejected) and the table."""
        exam = self.examFindings(segmentationNode)
        patient = PatientInputs(**exam.get("patient", {}))
        emphysema = bool((exam.get("emphysema") or {}).get("present"))
        segmentation = segmentationNode.GetSegmentation()
        ids = [sid for sid in self.candidateSegmentIds(segmentationNode) if self.candidateStatus(segmentationNode, sid) != REJECTED]
        order = {"1": 0, "2": 1, "3": 2, "4A": 3, "4B": 4}
        top = None
        for sid in ids:
            segment = segmentation.GetSegment(sid)
            tags = self.segmentTags(segment)
            overrides = reader_overrides(tags)
            kind = overrides.get("type") or tags.get(TAG_TYPE)
            if not kind or tags.get(TAG_MEAN_DIAMETER) is None:
                continue  # drawn by hand and never measured
            mean = float(tags[TAG_MEAN_DIAMETER])
            solid = 0.0 if kind == "non-solid" else (mean if kind in ("solid", "calcified") else float(tags.get(TAG_SOLID_DIAMETER) or 0.0))
            category = lung_rads_category(kind, mean, solid)
            segment.SetTag(TAG_LUNG_RADS, category)
            upper = overrides.get("upper_lobe", (tags.get(TAG_ZONE) or "").endswith("upper"))
            female = None if patient.sex is None else patient.sex == "F"
            risk = None
            spiculated = overrides.get("spiculated", int(tags.get(TAG_RANK) or 0) in patient.spiculated)  # the reader's, else the ids given to detect
            if mean > 0:
                risk = brock_risk(mean, kind, patient.age, female, patient.family_history, emphysema, upper, len(ids), spiculated)
            segment.SetTag(TAG_BROCK, "" if risk is None else f"{risk:.4f}")
            if top is None or order[category] > order[top[0]]:
                top = (category, sid)
        exam["lung_rads"] = {"version": "v2022", "category": top[0] if top else "1", "segment_id": top[1] if top else None}
        segmentationNode.SetAttribute(ATTR_EXAM, json.dumps(exam))
        self.updateTable(segmentationNode)

    def remeasureCandidate(self, segmentationNode, segmentId: str) -> dict:
        """Measure and characterise one candidate again from its voxels as they are now (after an edit in the Segment Editor);
        its tags, category, risk and the table follow. Returns the new measurements.

        Raises:
            ValueError: no source volume, or the segment is empty.
        """
        from LungNoduleAILib.candidates import measure_candidates

        volume = segmentationNode.GetNodeReference(REF_VOLUME)
        if volume is None:
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no source volume to measure on.")
        segment = self._segment(segmentationNode, segmentId)
        labels = self._segmentArrayOnVolume(segmentationNode, [segmentId], volume)
        measured = measure_candidates(labels, to_hu(self.imageFromVolume(volume)))
        if not measured:
            raise ValueError(f"Segment '{segment.GetName()}' is empty: nothing to measure.")
        m = measured[0]
        for tag, value in (
            (TAG_DIAMETER, f"{m.diameter_mm:.2f}"),
            (TAG_VOLUME, f"{m.volume_mm3:.1f}"),
            (TAG_TYPE, m.type),
            (TAG_MEAN_DIAMETER, f"{m.mean_diameter_mm:.1f}"),
            (TAG_SOLID_DIAMETER, f"{m.solid_component_mean_diameter_mm:.1f}"),
        ):
            segment.SetTag(tag, value)
        self.updateFindings(segmentationNode)
        return m.to_dict()

"""The module panel's state and decisions, without Qt: what the table shows, what each button does, when to re-threshold, where to export.

:class:`ReviewSession` is what the widget (``LungNoduleAI.py``) asks; the widget only binds
Qt signals to its methods and shows what they return. Everything here runs headless with
the ``slicer-core`` wheel and is tested there.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from LungNoduleAILib.review import ACCEPTED, PENDING, REJECTED, REVIEW_STATUSES, TAG_DETECTED, UNRESOLVED_STATUSES

from .names import ATTR_THRESHOLD, REF_PROBABILITY, REF_VOLUME

__all__ = ["ReviewSession", "CandidateRow", "PanelUpdate", "exportFolderName", "followUpText"]

RETHRESHOLD_DELAY_MS = 600
"""How long the threshold must rest before candidates are re-derived (a slider drag re-derives once, at its end)."""


@dataclass(frozen=True)
class CandidateRow:
    """One row of the candidates table (text as shown; ``status`` is the machine name, translated by the widget)."""

    segmentId: str
    rank: str
    probability: str
    diameter_mm: str
    volume_mm3: str
    status: str
    type: str = ""
    mean_diameter_mm: str = ""
    solid_diameter_mm: str = ""
    lung_rads: str = ""
    brock_risk: str = ""
    followup: str = ""


@dataclass
class PanelUpdate:
    """What the widget shows after an engine event: ``None`` fields stay as they are.

    Attributes:
        progressPercent: the progress bar's value (0-100).
        stage: the stage running (the widget shows it, translated, with the elapsed time).
        deviceText: the device the engine actually uses (``cpu``, ``cuda:0``...).
        finished: the process ended (its return code and whether it was cancelled are in the event).
    """

    progressPercent: int | None = None
    stage: str | None = None
    deviceText: str | None = None
    finished: bool = False


def followUpText(follow: dict) -> str:
    """One table cell for a candidate's comparison with the prior, e.g. ``matched +52 % grown, VDT 610 d (prior: accepted)``."""
    if not follow:
        return ""
    parts = [follow["status"]]
    if follow.get("volume_change_pct") is not None:
        parts.append(f"{follow['volume_change_pct']:+.0f} %")
    if follow.get("growth"):
        parts.append(follow["growth"])
    text = " ".join(parts)
    if follow.get("vdt_days") is not None:
        text += f", VDT {follow['vdt_days']:.0f} d"
    if follow.get("prior_status"):
        text += f" (prior: {follow['prior_status']})"
    return text


def exportFolderName(volumeName: str, now: datetime.datetime | None = None) -> str:
    """A fresh folder name for one export, e.g. ``ct_export_20261208-101502``: exporting again never meets the earlier files."""
    now = now or datetime.datetime.now()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", volumeName).strip("._") or "volume"
    return f"{safe}_export_{now.strftime('%Y%m%d-%H%M%S')}"


class ReviewSession:
    """The review state of one panel: the segmentation shown, its rows, the selected candidate.

    Args:
        logic: the module's :class:`LungNoduleAILogic.LungNoduleAILogic`.
    """

    def __init__(self, logic):
        self.logic = logic
        self.segmentationNode = None
        self.selectedId: str | None = None
        self._measured: dict[str, str] = {}  # segment ID -> fingerprint of the voxels last measured

    # ------------------------------------------------------------------ table

    def setSegmentation(self, segmentationNode) -> list[CandidateRow]:
        """Show ``segmentationNode`` (the node the selector signal passes, not the one shown before); returns its rows."""
        if segmentationNode is not self.segmentationNode:
            self.selectedId = None
            self._measured = {}
        self.segmentationNode = segmentationNode
        return self.rows()

    def rows(self) -> list[CandidateRow]:
        """The candidates of the current segmentation in rank order (none without a segmentation)."""
        seg = self.segmentationNode
        if seg is None:
            return []
        segmentation = seg.GetSegmentation()
        rows = []
        for sid in self.logic.candidateSegmentIds(seg):
            m = self.logic.segmentMeasurements(segmentation.GetSegment(sid))
            status = self.logic.candidateStatus(seg, sid)
            followup = followUpText(self.logic.followUp(seg, sid))
            rows.append(
                CandidateRow(
                    sid,
                    m["rank"],
                    m["probability"],
                    m["diameter_mm"],
                    m["volume_mm3"],
                    status,
                    m["type"],
                    m["mean_diameter_mm"],
                    m["solid_diameter_mm"],
                    m["lung_rads"],
                    m["brock_risk"],
                    followup,
                )  # fmt: skip
            )
        return rows

    def select(self, segmentId: str | None) -> list[float] | None:
        """Select a candidate; returns where to centre the views (RAS, mm), ``None`` when it is not in the segmentation."""
        seg = self.segmentationNode
        if seg is None or segmentId is None or seg.GetSegmentation().GetSegment(segmentId) is None:
            self.selectedId = None
            return None
        self.selectedId = segmentId
        center = self.logic.segmentCenterRas(seg.GetSegmentation().GetSegment(segmentId))
        return center if center is not None else list(seg.GetSegmentCenterRAS(segmentId))

    # ------------------------------------------------------------------ review

    def setStatus(self, status: str) -> str | None:
        """Accept, reject or flag the selected candidate; returns the candidate to select next.

        Accept and reject move on to the next pending candidate; flag stays (a flagged one needs a second look).

        Raises:
            ValueError: nothing selected (an expected condition: the widget shows it as status text), or an unknown status.
        """
        if status not in REVIEW_STATUSES:
            raise ValueError(f"Unknown review status '{status}': use one of {', '.join(REVIEW_STATUSES)}.")
        if self.segmentationNode is None or self.selectedId is None:
            raise ValueError("Select a candidate in the table first.")
        self.logic.setCandidateStatus(self.segmentationNode, self.selectedId, status)
        if status in (ACCEPTED, REJECTED):
            return self.nextPending() or self.selectedId
        return self.selectedId

    def nextPending(self) -> str | None:
        """The next pending candidate after the selected one (wrapping around), ``None`` when all are reviewed."""
        seg = self.segmentationNode
        if seg is None:
            return None
        ids = self.logic.candidateSegmentIds(seg)
        start = ids.index(self.selectedId) + 1 if self.selectedId in ids else 0
        for offset in range(len(ids)):
            sid = ids[(start + offset) % len(ids)]
            if self.logic.candidateStatus(seg, sid) == PENDING:
                return sid
        return None

    def unresolvedCount(self) -> int:
        """Candidates still pending or flagged (the export warns about them)."""
        seg = self.segmentationNode
        if seg is None:
            return 0
        return sum(1 for sid in self.logic.candidateSegmentIds(seg) if self.logic.candidateStatus(seg, sid) in UNRESOLVED_STATUSES)

    def editTarget(self) -> tuple:
        """``(segmentation, source volume, segment ID)`` for the Segment Editor.

        Raises:
            ValueError: nothing selected.
        """
        if self.segmentationNode is None or self.selectedId is None:
            raise ValueError("Select a candidate in the table first.")
        return self.segmentationNode, self.segmentationNode.GetNodeReference(REF_VOLUME), self.selectedId

    def remeasureEdited(self) -> list[str]:
        """Measure again every candidate whose voxels changed since they were last measured (an edit in the Segment Editor);
        returns their IDs. The widget calls it when segments were modified (debounced)."""
        seg = self.segmentationNode
        if seg is None:
            return []
        changed = []
        segmentation = seg.GetSegmentation()
        for sid in self.logic.candidateSegmentIds(seg):
            fingerprint = self.logic.segmentFingerprint(seg, sid)  # the voxels are read once per candidate
            if fingerprint == self.logic.segmentTag(segmentation.GetSegment(sid), TAG_DETECTED) or self._measured.get(sid) == fingerprint:
                continue  # as detected (not edited), or already measured as it is
            try:
                self.logic.remeasureCandidate(seg, sid)
            except ValueError:  # edited into emptiness: nothing to measure; the export refuses it with a message
                pass
            self._measured[sid] = fingerprint
            changed.append(sid)
        return changed

    def readerFinding(self) -> dict:
        """The selected candidate's reader overrides (``type``, ``spiculated``, ``upper_lobe``, where set) for the panel's fields."""
        from LungNoduleAILib.review import reader_overrides

        if self.segmentationNode is None or self.selectedId is None:
            return {}
        return reader_overrides(self.logic.segmentTags(self.segmentationNode.GetSegmentation().GetSegment(self.selectedId)))

    def compareWithPrior(self, priorSegmentationNode, intervalDays: float | None) -> dict:
        """Compare the shown candidates with a prior segmentation (and its CT).

        Raises:
            ValueError: nothing shown, no prior chosen, the prior is the shown segmentation, or a CT is missing.
        """
        if self.segmentationNode is None:
            raise ValueError("Select the nodule segmentation of the current scan first.")
        if priorSegmentationNode is None or priorSegmentationNode is self.segmentationNode:
            raise ValueError("Choose the prior scan's segmentation (another one than the current).")
        return self.logic.compareWithPrior(self.segmentationNode, priorSegmentationNode, intervalDays=intervalDays or None)

    def priorPosition(self) -> list[float] | None:
        """Where the selected candidate's match lies in the prior CT (RAS mm), ``None`` when unmatched or nothing selected."""
        if self.segmentationNode is None or self.selectedId is None:
            return None
        return self.logic.priorPosition(self.segmentationNode, self.selectedId)

    def examSummary(self) -> dict:
        """The exam's category (with the candidate driving it), emphysema and the patient's inputs with their sources."""
        return self.logic.examFindings(self.segmentationNode) if self.segmentationNode is not None else {}

    # ------------------------------------------------------------------ threshold

    def thresholdEdited(self, value: float, byUser: bool) -> bool:
        """Whether a threshold change should re-derive the shown candidates (after :data:`RETHRESHOLD_DELAY_MS` of rest).

        Only the user's own changes do, and only for a segmentation with a stored probability map
        and another threshold than it has; a threshold set because another model was chosen is for
        the next run only.
        """
        seg = self.segmentationNode
        if not byUser or seg is None or seg.GetNodeReference(REF_PROBABILITY) is None:
            return False
        current = seg.GetAttribute(ATTR_THRESHOLD)
        return current is None or abs(float(current) - float(value)) > 1e-9

    def rethreshold(self, value: float) -> list[str]:
        """Re-derive the pending, unedited candidates at ``value`` with the settings of the model that made them; returns the new segment IDs."""
        if not self.thresholdEdited(value, byUser=True):
            return []
        newIds = self.logic.rethreshold(self.segmentationNode, value)
        if self.selectedId is not None and self.segmentationNode.GetSegmentation().GetSegment(self.selectedId) is None:
            self.selectedId = None  # the selected candidate was re-derived away
        return newIds

    # ------------------------------------------------------------------ export

    def exportFolder(self, baseFolder: str, volumeNode, now: datetime.datetime | None = None) -> str:
        """Where one export writes: a new subfolder of ``baseFolder`` named after the volume and the time."""
        name = volumeNode.GetName() if volumeNode is not None else "volume"
        folder = Path(baseFolder) / exportFolderName(name, now)
        n = 1
        while folder.exists():  # two exports in the same second
            n += 1
            folder = Path(baseFolder) / f"{exportFolderName(name, now)}_{n}"
        return str(folder)

    def exportVolume(self, fallbackVolume):
        """The CT the segmentation was detected on (its reference), else ``fallbackVolume`` (a segmentation drawn by hand)."""
        seg = self.segmentationNode
        volume = seg.GetNodeReference(REF_VOLUME) if seg is not None else None
        return volume or fallbackVolume

    # ------------------------------------------------------------------ engine events

    @staticmethod
    def panelUpdate(event) -> PanelUpdate:
        """What one engine event (:class:`LungNoduleAILogic.process.EngineEvent`) changes in the panel."""
        if event.kind == "progress":
            return PanelUpdate(progressPercent=int(100 * float(event.data.get("fraction", 0.0))), stage=str(event.data.get("stage", "")))
        if event.kind == "model":
            return PanelUpdate(deviceText=str(event.data.get("device", "")))
        if event.kind == "finished":
            return PanelUpdate(finished=True)
        return PanelUpdate()

"""The prior scan in the scene: compare the shown candidates with the prior CT's nodules (:mod:`LungNoduleAILib.compare`).

:class:`FollowUpMixin` is part of :class:`LungNoduleAILogic.LungNoduleAILogic`. The comparison's per-nodule
results go to the current segments' tags (status, prior segment, prior volume, change, VDT, growth,
follow-up category); the whole report, resolved nodules included, to the segmentation node's
attribute ``LungNoduleAI.Comparison``. Reviewed statuses of the prior are offered, never copied.
"""

from __future__ import annotations

import json

from LungNoduleAILib.compare import Nodule, compare_nodules
from LungNoduleAILib.geometry import ras_to_lps
from LungNoduleAILib.imageio import to_hu
from LungNoduleAILib.review import (
    REJECTED,
    TAG_FOLLOWUP,
    TAG_MEAN_DIAMETER,
    TAG_SOLID_DIAMETER,
    TAG_TRACKING_UID,
    TAG_TYPE,
    TAG_VOLUME,
    reader_overrides,
)

from .names import ATTR_COMPARISON, REF_VOLUME

__all__ = ["FollowUpMixin"]


class FollowUpMixin:
    """Follow-up comparison of :class:`LungNoduleAILogic.LungNoduleAILogic`."""

    def _nodulesOf(self, segmentationNode) -> tuple[list[Nodule], dict[int, str]]:
        """The segmentation's candidates not rejected, as the comparison takes them, and their segment IDs by nodule id."""
        segmentation = segmentationNode.GetSegmentation()
        nodules, ids = [], {}
        for sid in self.candidateSegmentIds(segmentationNode):
            if self.candidateStatus(segmentationNode, sid) == REJECTED:
                continue
            segment = segmentation.GetSegment(sid)
            tags = self.segmentTags(segment)
            center = self.segmentCenterRas(segment) or list(segmentationNode.GetSegmentCenterRAS(sid))
            kind = reader_overrides(tags).get("type") or tags.get(TAG_TYPE)
            mean = float(tags[TAG_MEAN_DIAMETER]) if tags.get(TAG_MEAN_DIAMETER) else None
            solid = float(tags[TAG_SOLID_DIAMETER]) if tags.get(TAG_SOLID_DIAMETER) else None
            n = len(nodules) + 1
            nodules.append(Nodule(n, ras_to_lps(center), float(tags.get(TAG_VOLUME) or 0.0), mean, kind, tags.get(TAG_TRACKING_UID), solid_diameter_mm=solid))
            ids[n] = sid
        return nodules, ids

    def compareWithPrior(self, segmentationNode, priorSegmentationNode, priorVolumeNode=None, intervalDays: float | None = None) -> dict:
        """Compare the current candidates with a prior scan's (its segmentation, detected or reviewed, and its CT).

        Args:
            segmentationNode: the current detection's segmentation (its source volume is the current CT).
            priorSegmentationNode: the prior's segmentation; rejected segments are left out.
            priorVolumeNode: the prior CT (default: the prior segmentation's source volume).
            intervalDays: days between the scans (no VDT without it).

        Returns:
            The comparison (``registration``, ``nodules``...), also stored on the node; each current segment gets
            tag ``LungNoduleAI.FollowUp`` (JSON: status, prior segment ID, prior volume, change, VDT, growth, category).

        Raises:
            ValueError: a CT is missing, or no lungs in one of them.
        """
        current = segmentationNode.GetNodeReference(REF_VOLUME)
        prior = priorVolumeNode or priorSegmentationNode.GetNodeReference(REF_VOLUME)
        if current is None or prior is None:
            raise ValueError("Comparing needs both CTs: detect on the current CT first, and give the prior CT with its segmentation.")
        currentNodules, currentIds = self._nodulesOf(segmentationNode)
        priorNodules, priorIds = self._nodulesOf(priorSegmentationNode)
        report = compare_nodules(
            to_hu(self.imageFromVolume(prior)), to_hu(self.imageFromVolume(current)), priorNodules, currentNodules, intervalDays,
            prior.GetName(), current.GetName(),
        )  # fmt: skip
        segmentation = segmentationNode.GetSegmentation()
        for sid in currentIds.values():
            segmentation.GetSegment(sid).RemoveTag(TAG_FOLLOWUP)
        for entry in report["nodules"]:
            entry["prior_segment_id"] = priorIds.get(entry["prior"]["id"]) if entry["prior"] else None
            entry["current_segment_id"] = currentIds.get(entry["current"]["id"]) if entry["current"] else None
            if entry["current_segment_id"]:
                keep = ("status", "prior_segment_id", "volume_change_pct", "vdt_days", "growth", "lung_rads", "tracking_uid")
                summary = {k: entry.get(k) for k in keep}
                summary["prior_volume_mm3"] = entry["prior"]["volume_mm3"] if entry["prior"] else None
                if entry["prior_segment_id"]:  # offered to the reader as a starting point, never applied
                    summary["prior_status"] = self.candidateStatus(priorSegmentationNode, entry["prior_segment_id"])
                segmentation.GetSegment(entry["current_segment_id"]).SetTag(TAG_FOLLOWUP, json.dumps(summary))
        report["prior_volume"] = prior.GetName()
        segmentationNode.SetAttribute(ATTR_COMPARISON, json.dumps(report))
        self.updateTable(segmentationNode)
        return report

    def followUp(self, segmentationNode, segmentId: str) -> dict:
        """What the last comparison says of one current segment (``{}`` before a comparison, or for a segment it did not see)."""
        text = self.segmentTag(self._segment(segmentationNode, segmentId), TAG_FOLLOWUP)
        return json.loads(text) if text else {}

    def priorPosition(self, segmentationNode, segmentId: str) -> list[float] | None:
        """Where a matched nodule lies in the prior CT (RAS mm), to show it there beside the current one; ``None`` when unmatched."""
        report = json.loads(segmentationNode.GetAttribute(ATTR_COMPARISON) or "{}")
        for entry in report.get("nodules", []):
            if entry.get("current_segment_id") == segmentId and entry.get("prior"):
                from LungNoduleAILib.geometry import lps_to_ras

                return list(lps_to_ras(entry["prior"]["center_lps_mm"]))
        return None

    def resolvedNodules(self, segmentationNode) -> list[dict]:
        """The prior's nodules the last comparison found no more (with the prior's segment ID)."""
        report = json.loads(segmentationNode.GetAttribute(ATTR_COMPARISON) or "{}")
        return [e for e in report.get("nodules", []) if e["status"] == "resolved"]

"""Names the MRML bridge stores on nodes and segments: review statuses, segment tags, node references and attributes, table columns."""

from __future__ import annotations

from LungNoduleAILib.export import EXPORT_FORMATS as ENGINE_EXPORT_FORMATS
from LungNoduleAILib.export import TAG_EDITED, TAG_MODEL, TAG_TRACKING_UID
from LungNoduleAILib.provenance import TAG_SOURCE_GRID, TAG_SOURCE_SERIES, TAG_SOURCE_SHA256

REVIEW_STATUSES = ("pending", "accepted", "rejected", "flagged")
EXPORT_FORMATS = ENGINE_EXPORT_FORMATS
ATTR_DICOM_INSTANCES = "DICOM.instanceUIDs"
"""Attribute Slicer's DICOM module sets on a volume it loaded: the SOP Instance UIDs of its slices."""

TAG_REVIEW = "LungNoduleAI.ReviewStatus"
TAG_REVIEWER = "LungNoduleAI.Reviewer"
TAG_REVIEW_TIME = "LungNoduleAI.ReviewTime"
TAG_DETECTED = "LungNoduleAI.DetectedMaskSha1"
TAG_PROBABILITY = "LungNoduleAI.Probability"
TAG_RANK = "LungNoduleAI.Rank"

KNOWN_TAGS = (
    "Segmentation.Status",
    "TerminologyEntry",
    TAG_RANK,
    TAG_PROBABILITY,
    "LungNoduleAI.Score",
    "LungNoduleAI.DiameterMm",
    "LungNoduleAI.LongestAxialDiameterMm",
    "LungNoduleAI.VolumeMm3",
    "LungNoduleAI.CenterRAS",
    TAG_REVIEW,
    TAG_REVIEWER,
    TAG_REVIEW_TIME,
    TAG_DETECTED,
    TAG_MODEL,
    TAG_TRACKING_UID,
    TAG_EDITED,
    TAG_SOURCE_SERIES,
    TAG_SOURCE_SHA256,
    TAG_SOURCE_GRID,
)
"""Segment tags carried into exported .seg.nrrd files (vtkSegment cannot list its tags)."""

REF_PROBABILITY = "LungNoduleAI.Probability"
REF_LABELMAP = "LungNoduleAI.Labelmap"
REF_TABLE = "LungNoduleAI.Table"
REF_VOLUME = "LungNoduleAI.SourceVolume"
ATTR_THRESHOLD = "LungNoduleAI.Threshold"
ATTR_MODEL = "LungNoduleAI.Model"
ATTR_SOURCE = "LungNoduleAI.Source"
"""Segmentation node attribute: the identity of the CT the candidates were detected on (JSON, :mod:`LungNoduleAILib.provenance`)."""

TABLE_COLUMNS = [
    ("rank", "Rank", "int"),
    ("probability", "Probability", "double"),
    ("diameter_mm", "Diameter (mm)", "double"),
    ("volume_mm3", "Volume (mm3)", "double"),
    ("status", "Status", "string"),
    ("segment_id", "Segment ID", "string"),
    ("center_r", "R (mm)", "double"),
    ("center_a", "A (mm)", "double"),
    ("center_s", "S (mm)", "double"),
]

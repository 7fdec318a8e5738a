"""Names the MRML bridge stores on nodes: node references and attributes, table columns (segment tags and statuses: :mod:`LungNoduleAILib.review`)."""

from __future__ import annotations

from LungNoduleAILib.export import EXPORT_FORMATS  # noqa: F401  (re-exported for the module)
from LungNoduleAILib.review import (  # noqa: F401  (the review vocabulary, re-exported for the module)
    KNOWN_TAGS,
    REVIEW_STATUSES,
    TAG_BROCK,
    TAG_CENTER_RAS,
    TAG_DETECTED,
    TAG_DIAMETER,
    TAG_EDITED,
    TAG_LUNG_RADS,
    TAG_MEAN_DIAMETER,
    TAG_MODEL,
    TAG_PROBABILITY,
    TAG_RANK,
    TAG_REVIEW,
    TAG_REVIEW_TIME,
    TAG_REVIEWER,
    TAG_SOLID_DIAMETER,
    TAG_SOURCE_GRID,
    TAG_SOURCE_SERIES,
    TAG_SOURCE_SHA256,
    TAG_TRACKING_UID,
    TAG_TYPE,
    TAG_VOLUME,
)

ATTR_DICOM_INSTANCES = "DICOM.instanceUIDs"
"""Attribute Slicer's DICOM module sets on a volume it loaded: the SOP Instance UIDs of its slices."""
ATTR_OUTPUT = "LungNoduleAI.Output"
"""Attribute on every node a detection made (the module's CT selector leaves them out)."""

REF_PROBABILITY = "LungNoduleAI.Probability"
REF_LABELMAP = "LungNoduleAI.Labelmap"
REF_TABLE = "LungNoduleAI.Table"
REF_VOLUME = "LungNoduleAI.SourceVolume"
ATTR_THRESHOLD = "LungNoduleAI.Threshold"
ATTR_MODEL = "LungNoduleAI.Model"
ATTR_COMPARISON = "LungNoduleAI.Comparison"
"""Segmentation node attribute: the last comparison with a prior scan (JSON, :func:`LungNoduleAILib.compare.compare_nodules`)."""
ATTR_EXAM = "LungNoduleAI.Exam"
"""Segmentation node attribute: the per-exam findings (``lung_rads``, ``emphysema``, ``patient``; JSON), kept up to date by the Logic."""
ATTR_SOURCE = "LungNoduleAI.Source"
"""Segmentation node attribute: the identity of the CT the candidates were detected on (JSON, :mod:`LungNoduleAILib.provenance`)."""

TABLE_COLUMNS = [
    ("rank", "Rank", "int"),
    ("probability", "Probability", "double"),
    ("diameter_mm", "Diameter (mm)", "double"),
    ("volume_mm3", "Volume (mm3)", "double"),
    ("status", "Status", "string"),
    ("type", "Type", "string"),
    ("mean_diameter_mm", "Mean diameter (mm)", "double"),
    ("lung_rads", "Lung-RADS", "string"),
    ("brock_risk", "Brock risk", "double"),
    ("segment_id", "Segment ID", "string"),
    ("center_r", "R (mm)", "double"),
    ("center_a", "A (mm)", "double"),
    ("center_s", "S (mm)", "double"),
]

"""The review vocabulary: segment tags, review statuses, what is exported, how segments are named, coloured and coded.

Every layer reads and writes candidates' review state through these names:
the engine's writers and export, the MRML bridge (``LungNoduleAILogic``) and
the module's panel. Each tag is written here once.

Review statuses:

* ``pending``: not yet looked at (new candidates);
* ``accepted``: a nodule; exported;
* ``rejected``: not a nodule; never exported (hidden in Slicer, not deleted);
* ``flagged``: needs a second look; unresolved, like pending.

Slicer keeps its own segment status (tag ``Segmentation.Status``: not started,
in progress, completed, flagged); ours is stored beside it so that
"completed" can still tell accepted from rejected.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .candidates import Candidate

__all__ = [
    "TAG_STATUS",
    "TAG_TERMINOLOGY",
    "TAG_RANK",
    "TAG_PROBABILITY",
    "TAG_SCORE",
    "TAG_DIAMETER",
    "TAG_LONGEST_AXIAL_DIAMETER",
    "TAG_VOLUME",
    "TAG_CENTER_RAS",
    "TAG_TYPE",
    "TAG_MEAN_DIAMETER",
    "TAG_SOLID_DIAMETER",
    "TAG_LUNG_RADS",
    "TAG_BROCK",
    "TAG_ZONE",
    "TAG_FOLLOWUP",
    "TAG_READER_TYPE",
    "TAG_READER_SPICULATED",
    "TAG_READER_UPPER_LOBE",
    "READER_TAGS",
    "reader_overrides",
    "with_reader_overrides",
    "TAG_REVIEW",
    "TAG_REVIEWER",
    "TAG_REVIEW_TIME",
    "TAG_DETECTED",
    "TAG_EDITED",
    "TAG_MODEL",
    "TAG_TRACKING_UID",
    "TAG_SOURCE_SERIES",
    "TAG_SOURCE_SHA256",
    "TAG_SOURCE_GRID",
    "KNOWN_TAGS",
    "PENDING",
    "ACCEPTED",
    "REJECTED",
    "FLAGGED",
    "REVIEW_STATUSES",
    "UNRESOLVED_STATUSES",
    "SLICER_STATUS",
    "review_status",
    "select_for_export",
    "algorithm_type",
    "segment_id",
    "segment_name",
    "segment_color",
    "segment_tags",
    "SEGMENT_COLORS",
    "NODULE_TERMINOLOGY",
]

# ---------------------------------------------------------------- segment tags
TAG_STATUS = "Segmentation.Status"
"""Slicer's own segment status tag (machine-readable values: notstarted, inprogress, completed, flagged)."""
TAG_TERMINOLOGY = "TerminologyEntry"
"""Slicer's terminology tag (category, type and region codes)."""

TAG_RANK = "LungNoduleAI.Rank"
TAG_PROBABILITY = "LungNoduleAI.Probability"
TAG_SCORE = "LungNoduleAI.Score"
TAG_DIAMETER = "LungNoduleAI.DiameterMm"
TAG_LONGEST_AXIAL_DIAMETER = "LungNoduleAI.LongestAxialDiameterMm"
TAG_VOLUME = "LungNoduleAI.VolumeMm3"
TAG_CENTER_RAS = "LungNoduleAI.CenterRAS"
TAG_TYPE = "LungNoduleAI.Type"
TAG_MEAN_DIAMETER = "LungNoduleAI.MeanDiameterMm"
TAG_SOLID_DIAMETER = "LungNoduleAI.SolidComponentMeanDiameterMm"
TAG_LUNG_RADS = "LungNoduleAI.LungRADS"
TAG_BROCK = "LungNoduleAI.BrockRisk"
TAG_ZONE = "LungNoduleAI.Location"
"""The candidate's side and zone as detected, e.g. ``left upper``."""
TAG_FOLLOWUP = "LungNoduleAI.FollowUp"
"""What the last comparison with a prior scan says of the segment (JSON: status, prior segment, change, VDT, growth...)."""
TAG_READER_TYPE = "LungNoduleAI.ReaderType"
TAG_READER_SPICULATED = "LungNoduleAI.ReaderSpiculated"
TAG_READER_UPPER_LOBE = "LungNoduleAI.ReaderUpperLobe"
READER_TAGS = {"type": TAG_READER_TYPE, "spiculated": TAG_READER_SPICULATED, "upper_lobe": TAG_READER_UPPER_LOBE}
"""What the reader may set on a candidate instead of the engine (stored as these tags, exported as the reader's)."""
TAG_REVIEW = "LungNoduleAI.ReviewStatus"
TAG_REVIEWER = "LungNoduleAI.Reviewer"
TAG_REVIEW_TIME = "LungNoduleAI.ReviewTime"
TAG_DETECTED = "LungNoduleAI.DetectedMaskSha1"
"""Fingerprint of the voxels as detected (:func:`.writers.mask_sha1`): a segment that no longer matches it was edited."""
TAG_EDITED = "LungNoduleAI.Edited"
TAG_MODEL = "LungNoduleAI.Model"
"""The detector as "name version"."""
TAG_TRACKING_UID = "LungNoduleAI.TrackingUID"
TAG_SOURCE_SERIES = "LungNoduleAI.SourceSeriesUID"
TAG_SOURCE_SHA256 = "LungNoduleAI.SourceVoxelSha256"
TAG_SOURCE_GRID = "LungNoduleAI.SourceGrid"

KNOWN_TAGS = (
    TAG_STATUS,
    TAG_TERMINOLOGY,
    TAG_RANK,
    TAG_PROBABILITY,
    TAG_SCORE,
    TAG_DIAMETER,
    TAG_LONGEST_AXIAL_DIAMETER,
    TAG_VOLUME,
    TAG_CENTER_RAS,
    TAG_TYPE,
    TAG_MEAN_DIAMETER,
    TAG_SOLID_DIAMETER,
    TAG_LUNG_RADS,
    TAG_BROCK,
    TAG_ZONE,
    TAG_FOLLOWUP,
    TAG_READER_TYPE,
    TAG_READER_SPICULATED,
    TAG_READER_UPPER_LOBE,
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
"""Every segment tag this project reads or writes (a vtkSegment cannot list its tags, so an export asks for these)."""

# ---------------------------------------------------------------- review statuses
PENDING, ACCEPTED, REJECTED, FLAGGED = "pending", "accepted", "rejected", "flagged"
REVIEW_STATUSES = (PENDING, ACCEPTED, REJECTED, FLAGGED)
UNRESOLVED_STATUSES = (PENDING, FLAGGED)
"""Statuses that still need a decision: an export refuses them unless asked to include them."""

SLICER_STATUS = {PENDING: "notstarted", ACCEPTED: "completed", REJECTED: "completed", FLAGGED: "flagged"}
"""Slicer's machine-readable segment status stored with each of our statuses."""


def review_status(tags: Mapping[str, str]) -> str:
    """Our status from a segment's tags; from Slicer's status for a segment we never reviewed (e.g. drawn by hand).

    Args:
        tags: segment tags (only :data:`TAG_REVIEW` and :data:`TAG_STATUS` are read).

    Returns:
        One of :data:`REVIEW_STATUSES` (``pending`` when nothing says otherwise).
    """
    status = tags.get(TAG_REVIEW)
    if status in REVIEW_STATUSES:
        return status
    return {"completed": ACCEPTED, "flagged": FLAGGED}.get(tags.get(TAG_STATUS) or "", PENDING)


def select_for_export(statuses: Sequence[str], include_pending: bool) -> tuple[list[int], list[int]]:
    """Which segments an export takes, and which ones still need a decision.

    The rule: accepted segments are exported; rejected ones never; pending and
    flagged ones only with ``include_pending`` (otherwise the export is refused).

    Args:
        statuses: review status of each segment, in order.
        include_pending: also take the unresolved (pending, flagged) segments.

    Returns:
        ``(chosen, unresolved)``: indices into ``statuses`` of the segments to
        export, and of the unresolved ones (empty when ``include_pending``).
    """
    unresolved = [i for i, s in enumerate(statuses) if s in UNRESOLVED_STATUSES]
    chosen = [i for i, s in enumerate(statuses) if s == ACCEPTED or (include_pending and s in UNRESOLVED_STATUSES)]
    return chosen, [] if include_pending else unresolved


def algorithm_type(tags: Mapping[str, str], edited: bool) -> str:
    """DICOM segment algorithm type: ``MANUAL`` (not from the detector), ``SEMIAUTOMATIC`` (edited) or ``AUTOMATIC``."""
    if TAG_DETECTED not in tags and TAG_RANK not in tags:
        return "MANUAL"
    return "SEMIAUTOMATIC" if edited else "AUTOMATIC"


# ---------------------------------------------------------------- naming, colours, terminology
NODULE_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure"
    "~SCT^27925004^Nodule"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~SCT^39607008^Lung"
    "~^^"
)
"""Slicer terminology entry: category Morphologically altered structure, type Nodule (SNOMED 27925004), region Lung."""

SEGMENT_COLORS = [
    (0.90, 0.10, 0.10),
    (0.10, 0.60, 0.95),
    (0.95, 0.75, 0.10),
    (0.20, 0.80, 0.30),
    (0.75, 0.30, 0.90),
    (0.95, 0.45, 0.10),
    (0.10, 0.85, 0.85),
    (0.95, 0.35, 0.65),
    (0.55, 0.80, 0.10),
    (0.50, 0.50, 1.00),
]


def segment_id(candidate: Candidate) -> str:
    """Segment ID of a detected candidate in a ``.seg.nrrd``, e.g. ``Nodule_1``."""
    return f"Nodule_{candidate.rank}"


def segment_name(candidate: Candidate) -> str:
    """Display name such as ``Nodule 1 (12.3 mm, p=0.97)``."""
    return f"Nodule {candidate.rank} ({candidate.diameter_mm:.1f} mm, p={candidate.probability:.2f})"


def segment_color(index: int) -> tuple[float, float, float]:
    """Colour (r, g, b in 0-1) of the ``index``-th segment (0-based), cycling through :data:`SEGMENT_COLORS`."""
    return SEGMENT_COLORS[index % len(SEGMENT_COLORS)]


def segment_tags(candidate: Candidate, status: str = "notstarted", model: str | None = None) -> dict[str, str]:
    """Tags stored with each detected candidate (Slicer ``Segment{i}_Tags``); ``model`` is "name version"."""
    tags = {
        TAG_STATUS: status,
        TAG_TERMINOLOGY: NODULE_TERMINOLOGY,
        TAG_RANK: str(candidate.rank),
        TAG_PROBABILITY: f"{candidate.probability:.4f}",
        TAG_DIAMETER: f"{candidate.diameter_mm:.2f}",
        TAG_LONGEST_AXIAL_DIAMETER: f"{candidate.longest_axial_diameter_mm:.2f}",
        TAG_VOLUME: f"{candidate.volume_mm3:.1f}",
        TAG_REVIEW: PENDING,
    }
    if candidate.score is not None:
        tags[TAG_SCORE] = f"{candidate.score:.4f}"
    for tag, value, fmt in (
        (TAG_TYPE, candidate.type, ""),
        (TAG_MEAN_DIAMETER, candidate.mean_diameter_mm, ".1f"),
        (TAG_SOLID_DIAMETER, candidate.solid_component_mean_diameter_mm, ".1f"),
        (TAG_LUNG_RADS, candidate.lung_rads, ""),
        (TAG_BROCK, candidate.brock_risk, ".4f"),
        (TAG_ZONE, " ".join(candidate.location.values()) if candidate.location else None, ""),
    ):
        if value is not None:
            tags[tag] = format(value, fmt)
    if model:
        tags[TAG_MODEL] = model
    return tags


def reader_overrides(tags: Mapping[str, str]) -> dict:
    """What the reader set on a segment instead of the engine: ``{"type": ..., "spiculated": bool, "upper_lobe": bool}`` (those set)."""
    out = {}
    for name, tag in READER_TAGS.items():
        value = tags.get(tag)
        if value:
            out[name] = value if name == "type" else value == "1"
    return out


def with_reader_overrides(measured: dict, tags: Mapping[str, str]) -> dict:
    """A nodule's measured record with the reader's type applied (and the Lung-RADS category that follows from it), the
    overrides listed under ``reader_overrides``: what the reader decided is exported as the reader's, next to the measurement.
    The location and Brock risk, which need the lung mask and the patient, come from the segment's tags."""
    from .characterise import lung_rads_category

    out = dict(measured)
    if out.get("location") is None and tags.get(TAG_ZONE):  # a reviewed export has no lung mask: the location as detected
        side, _, zone = tags[TAG_ZONE].partition(" ")
        out["location"] = {"side": side, "zone": zone}
    if out.get("brock_risk") is None and tags.get(TAG_BROCK):  # the risk as the detection or the reader's inputs last set it
        out["brock_risk"] = float(tags[TAG_BROCK])
    overrides = reader_overrides(tags)
    if not overrides:
        return out
    out["reader_overrides"] = overrides
    kind = overrides.get("type")
    if kind and out.get("mean_diameter_mm") is not None:
        solid = 0.0 if kind == "non-solid" else (out.get("solid_component_mean_diameter_mm") or 0.0)
        if kind == "solid":
            solid = out["mean_diameter_mm"]
        out.update(type=kind, solid_component_mean_diameter_mm=solid, lung_rads=lung_rads_category(kind, out["mean_diameter_mm"], solid))
    return out

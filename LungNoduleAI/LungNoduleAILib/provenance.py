"""Which CT a result belongs to: the source identity every result records, and the checks before an export.

A result (``<name>_nodules.json``, ``.seg.nrrd``, an export) records the CT it
was made on: the DICOM identity when the CT was read from DICOM
(SeriesInstanceUID, StudyInstanceUID, FrameOfReferenceUID, PatientID) and
always the CT grid (size, spacing mm, origin LPS mm, direction) and a SHA-256
of its voxels (int16 HU). A ``.seg.nrrd`` holds it twice: as the header key
:data:`SOURCE_HEADER_KEY` (the whole identity, JSON) and as segment tags
(:data:`TAG_SOURCE_SERIES`, :data:`TAG_SOURCE_SHA256`, :data:`TAG_SOURCE_GRID`),
because 3D Slicer keeps segment tags when it saves a segmentation but drops
header keys it does not know.

Before an export writes anything, :func:`check_same_source` refuses a CT or
DICOM series that is not the recorded one (UIDs when both sides have them,
else grid and voxel checksum), and :func:`segment_inside` refuses a segment
whose voxels reach outside the CT.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .review import TAG_SOURCE_GRID, TAG_SOURCE_SERIES, TAG_SOURCE_SHA256

__all__ = [
    "SOURCE_HEADER_KEY",
    "TAG_SOURCE_SERIES",
    "TAG_SOURCE_SHA256",
    "TAG_SOURCE_GRID",
    "UID_FIELDS",
    "voxel_sha256",
    "image_grid",
    "source_identity",
    "identity_tags",
    "identity_from_tags",
    "identity_mismatches",
    "check_same_source",
    "grid_mismatches",
    "segment_inside",
    "header_identity",
]

SOURCE_HEADER_KEY = "LungNoduleAI.Source"
UID_FIELDS = (
    ("patient_id", "PatientID"),
    ("study_uid", "StudyInstanceUID"),
    ("series_uid", "SeriesInstanceUID"),
    ("frame_of_reference_uid", "FrameOfReferenceUID"),
)
"""Identity keys of a DICOM source and their DICOM names, in the order a mismatch is reported."""
_GRID_KEYS = ("size_ijk", "spacing_mm", "origin_lps_mm", "direction")
_TOL_MM = 1e-3
_TOL_DIRECTION = 1e-5


def voxel_sha256(image: sitk.Image) -> str:
    """SHA-256 of a CT's voxels as int16 HU, ``(k, j, i)`` order, little-endian (the engine's CT after :func:`.imageio.to_hu`)."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype != np.dtype("<i2"):
        arr = np.clip(np.round(arr), -32768, 32767).astype("<i2") if np.issubdtype(arr.dtype, np.floating) else arr.astype("<i2")
    h = hashlib.sha256()
    flat = np.ascontiguousarray(arr).reshape(-1)
    step = 1 << 23
    for start in range(0, flat.size, step):  # in pieces: no copy of a large CT
        h.update(flat[start : start + step].tobytes())
    return h.hexdigest()


def image_grid(image: sitk.Image) -> dict:
    """The grid of an image: ``size_ijk``, ``spacing_mm``, ``origin_lps_mm``, ``direction`` (JSON-ready)."""
    return {
        "size_ijk": [int(v) for v in image.GetSize()],
        "spacing_mm": [float(v) for v in image.GetSpacing()],
        "origin_lps_mm": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def source_identity(image: sitk.Image, dicom=None, series_uid: str | None = None) -> dict:
    """The identity a result records of the CT ``image`` (int16 HU).

    Args:
        image: the CT as the engine reads it.
        dicom: its :class:`.dicomio.DicomSeries` when read from DICOM.
        series_uid: SeriesInstanceUID when known without ``dicom`` (e.g. a Slicer volume's attribute).

    Returns:
        ``{"series_uid", "study_uid", "frame_of_reference_uid", "patient_id"}`` (``None`` when
        not DICOM), the grid keys of :func:`image_grid` and ``"voxel_sha256"``.
    """
    uids = {key: (getattr(dicom, key, "") or None) if dicom is not None else None for key, _ in UID_FIELDS}
    uids["series_uid"] = (dicom.series_uid if dicom is not None else series_uid) or None
    return {**uids, **image_grid(image), "voxel_sha256": voxel_sha256(image)}


def _format_grid(identity: dict) -> str:
    return " ".join([key.split("_")[0] + " " + " ".join(repr(float(v)) if key != "size_ijk" else str(int(v)) for v in identity[key]) for key in _GRID_KEYS])


def _parse_grid(text: str) -> dict | None:
    words, grid, key = text.split(), {}, None
    names = {k.split("_")[0]: k for k in _GRID_KEYS}
    try:
        for w in words:
            if w in names:
                key = names[w]
                grid[key] = []
            else:
                grid[key].append(int(w) if key == "size_ijk" else float(w))
    except (KeyError, ValueError):
        return None
    return grid if set(grid) == set(_GRID_KEYS) else None


def identity_tags(identity: dict) -> dict[str, str]:
    """Segment tags that carry ``identity`` through a save in 3D Slicer (values without ``|`` or ``:``)."""
    tags = {TAG_SOURCE_SHA256: identity["voxel_sha256"], TAG_SOURCE_GRID: _format_grid(identity)}
    if identity.get("series_uid"):
        tags[TAG_SOURCE_SERIES] = identity["series_uid"]
    return tags


def identity_from_tags(tag_dicts: Iterable[dict], what: str = "The segmentation") -> dict | None:
    """The source recorded in the segments' tags, ``None`` if no segment has one.

    Raises:
        ValueError: segments record different sources (segments of two CTs mixed in one segmentation).
    """
    found = {}
    for tags in tag_dicts:
        if TAG_SOURCE_SHA256 not in tags and TAG_SOURCE_SERIES not in tags:
            continue
        key = (tags.get(TAG_SOURCE_SERIES) or None, tags.get(TAG_SOURCE_SHA256) or None, tags.get(TAG_SOURCE_GRID, ""))
        found[key] = found.get(key, 0) + 1
    if not found:
        return None
    if len(found) > 1:
        listed = "; ".join(f"{n} segment(s) from series {k[0] or '(not DICOM)'}, voxels {str(k[1])[:12]}" for k, n in found.items())
        raise ValueError(f"{what} holds segments made on different CTs ({listed}). Export the segments of each CT separately.")
    ((series, sha, grid),) = found
    return {"series_uid": series, "voxel_sha256": sha, **(_parse_grid(grid) or {})}


def grid_mismatches(recorded: dict, actual: dict) -> list[str]:
    """How two grids (:func:`image_grid` dicts) differ, in words; empty when they agree within 0.001 mm."""
    out = []
    if list(recorded["size_ijk"]) != list(actual["size_ijk"]):
        out.append(f"size {list(recorded['size_ijk'])} voxels vs {list(actual['size_ijk'])}")
    for key, what, tol in (("spacing_mm", "spacing", _TOL_MM), ("origin_lps_mm", "origin (LPS mm)", _TOL_MM), ("direction", "direction", _TOL_DIRECTION)):
        a, b = np.asarray(recorded[key], float), np.asarray(actual[key], float)
        if a.shape != b.shape or not np.allclose(a, b, atol=tol, rtol=0):
            out.append(f"{what} {np.round(a, 4).tolist()} vs {np.round(b, 4).tolist()}")
    return out


def identity_mismatches(recorded: dict, actual: dict) -> list[str]:
    """How the recorded source differs from the CT at hand, in words (recorded first); empty when it is the same CT.

    Compares the DICOM UIDs when both sides have a SeriesInstanceUID, else the
    grid (when recorded) and the voxel checksum.
    """
    if recorded.get("series_uid") and actual.get("series_uid"):
        return [
            f"{name} {recorded[key]} vs {actual[key]}" for key, name in UID_FIELDS if recorded.get(key) and actual.get(key) and recorded[key] != actual[key]
        ]
    out = grid_mismatches(recorded, actual) if all(k in recorded for k in _GRID_KEYS) else []
    if recorded.get("voxel_sha256") and actual.get("voxel_sha256") and recorded["voxel_sha256"] != actual["voxel_sha256"]:
        out.append(f"voxel checksum {recorded['voxel_sha256'][:12]}... vs {actual['voxel_sha256'][:12]}...")
    if not recorded.get("voxel_sha256") and not out:
        out.append(f"SeriesInstanceUID {recorded.get('series_uid')} vs a CT that is not DICOM (nothing else recorded to compare)")
    return out


_EXPORT_ADVICE = "Nothing was exported. Give the CT (DICOM folder or file) the nodules were detected and reviewed on."


def check_same_source(recorded: dict, actual: dict, what: str, ct: str, advice: str = _EXPORT_ADVICE) -> None:
    """Refuse when ``actual`` (the CT at hand) is not the CT ``recorded`` by ``what`` (a segmentation, a result set).

    Raises:
        ValueError: naming each difference, recorded value first, and ``advice``.
    """
    diffs = identity_mismatches(recorded, actual)
    if diffs:
        raise ValueError(f"{what} was made on another CT than {ct}: {'; '.join(diffs)}. {advice}")


def segment_inside(index_to_lps: np.ndarray, bbox_ijk: Sequence[int], ct: sitk.Image) -> bool:
    """Whether a segment's voxel box lies wholly inside the CT's voxels.

    Args:
        index_to_lps: 4x4 matrix from the segment grid's voxel index ``(i, j, k)`` to LPS mm.
        bbox_ijk: ``[i0, j0, k0, i1, j1, k1]`` of the segment's voxels (inclusive) on its grid.
        ct: the CT (its grid).
    """
    i0, j0, k0, i1, j1, k1 = bbox_ijk
    corners = np.array([[i, j, k, 1.0] for i in (i0 - 0.5, i1 + 0.5) for j in (j0 - 0.5, j1 + 0.5) for k in (k0 - 0.5, k1 + 0.5)])
    lps = (np.asarray(index_to_lps, float) @ corners.T).T[:, :3]
    spacing = np.asarray(ct.GetSpacing())
    tol = 0.01 * spacing.min()  # corners that land on the CT's own boundary, up to rounding
    size = np.asarray(ct.GetSize())
    direction = np.asarray(ct.GetDirection()).reshape(3, 3)
    idx = ((lps - np.asarray(ct.GetOrigin())) @ direction) / spacing  # continuous index of each corner
    return bool(np.all(idx >= -0.5 - tol / spacing) and np.all(idx <= size - 0.5 + tol / spacing))


def header_identity(text: str | None) -> dict | None:
    """The identity stored as the ``.seg.nrrd`` header key :data:`SOURCE_HEADER_KEY` (``None`` when absent or unreadable)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None

"""Exporting reviewed nodules from a Slicer ``.seg.nrrd``: labelmap, CSV, JSON, DICOM SEG and SR.

:func:`.writers.read_segmentation` (beside ``write_segmentation``) reads any Slicer segmentation
file (one or several layers, cropped or not) with its segments' names, colours and tags.
:func:`export_reviewed` is what ``lungnoduleai export`` runs: it keeps the
accepted segments (and, if asked, the pending or flagged ones; never the
rejected), measures them on the CT as edited, and writes every format
asked for at once, or none (temporary files, then renames).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from . import __version__
from .candidates import Candidate, measure_candidates
from .dicomseg import ExportSegment, make_dicom_seg, make_dicom_sr, source_datasets, tracking_uid
from .imageio import CTVolume, read_ct
from .outputset import OutputSet, output_error, source_key
from .provenance import check_same_source, grid_mismatches, identity_tags, image_grid, segment_inside
from .review import (
    TAG_DETECTED,
    TAG_EDITED,
    TAG_MODEL,
    TAG_PROBABILITY,
    TAG_RANK,
    TAG_REVIEW,
    TAG_REVIEW_TIME,
    TAG_REVIEWER,
    TAG_TRACKING_UID,
    algorithm_type,
    review_status,
    select_for_export,
    with_reader_overrides,
)
from .writers import SegmentationFile, mask_sha1, read_probability, read_segmentation, write_candidates_csv, write_json, write_segmentation_labelmap

__all__ = [
    "EXPORT_FORMATS",
    "DICOM_FORMATS",
    "SegmentationFile",
    "read_segmentation",
    "review_status",
    "algorithm_type",
    "mask_sha1",
    "export_paths",
    "check_formats",
    "export_reviewed",
    "export_segments",
    "choose_for_export",
    "ReviewFront",
    "FileFront",
    "write_reviewed",
    "ReviewedSegment",
    "OptionError",
    "TAG_REVIEW",
    "TAG_DETECTED",
    "TAG_EDITED",
    "TAG_MODEL",
    "TAG_TRACKING_UID",
]

EXPORT_FORMATS = ("seg.nrrd", "nii.gz", "csv", "json", "dcm-seg", "dcm-sr")
DICOM_FORMATS = ("dcm-seg", "dcm-sr")
_SUFFIXES = {
    "seg.nrrd": "_reviewed.seg.nrrd",
    "nii.gz": "_reviewed_labels.nii.gz",
    "csv": "_reviewed_nodules.csv",
    "json": "_reviewed_nodules.json",
    "dcm-seg": "_reviewed_seg.dcm",
    "dcm-sr": "_reviewed_sr.dcm",
}


class OptionError(ValueError):
    """A bad export option (unknown format, DICOM formats without DICOM): the command line's fault, exit status 2."""


def _segment_edited(seg_file: SegmentationFile, index: int) -> bool:
    tags = seg_file.segments[index]["tags"]
    if tags.get(TAG_EDITED) in ("0", "1"):
        return tags[TAG_EDITED] == "1"
    detected = tags.get(TAG_DETECTED)
    if detected is None:
        return TAG_RANK not in tags  # a hand-drawn segment; a detector segment without fingerprint counts as unedited
    mask = seg_file.mask(index)
    nz = np.argwhere(mask)
    if nz.size == 0:
        return True
    (k0, j0, i0), (k1, j1, i1) = nz.min(0), nz.max(0)
    oi, oj, ok = seg_file.extent_offset
    bbox = [int(i0 + oi), int(j0 + oj), int(k0 + ok), int(i1 + oi), int(j1 + oj), int(k1 + ok)]
    return mask_sha1(mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1], bbox) != detected


def _read_probability_for(path, ct: CTVolume) -> sitk.Image:
    """The detection's probability map for a fractional SEG; refused when missing, not an image or not on the CT's grid."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Probability map '{p}' does not exist: give the <name>_probability.nrrd that 'lungnoduleai detect' wrote beside the .seg.nrrd.")
    try:
        probability = read_probability(p)
    except RuntimeError as exc:
        raise ValueError(f"Cannot read '{p}' as a probability map (an image): give the <name>_probability.nrrd that 'lungnoduleai detect' wrote.") from exc
    diffs = grid_mismatches(image_grid(probability), image_grid(ct.image))
    if diffs:
        raise ValueError(f"Probability map '{p}' is not on the grid of the CT given ({'; '.join(diffs)}): give the one detected on this CT.")
    return probability


def check_segmentation_source(seg_file: SegmentationFile, seg_path, ct: CTVolume, ct_label: str) -> None:
    """Refuse to export ``seg_file`` with a CT that is not the one it was made on.

    With a recorded source (header or segment tags) the CT must be that one
    (:func:`.provenance.check_same_source`); without one (segments drawn by hand
    in Slicer), the segmentation's reference grid must be the CT's exactly.

    Raises:
        ValueError: naming what differs.
    """
    what = f"Segmentation '{seg_path}'"
    recorded = seg_file.recorded_source(what)
    if recorded is not None:
        check_same_source(recorded, ct.identity(), what, ct_label)
        return
    grid = seg_file.reference_grid()
    diffs = grid_mismatches({**grid, "size_ijk": []}, {**image_grid(ct.image), "size_ijk": []})
    if diffs:
        raise ValueError(
            f"{what} records no source CT, and its grid is not that of {ct_label}: {'; '.join(diffs)}. "
            "Nothing was exported. Give the CT it was drawn on, or in Slicer set the segmentation's geometry to that CT."
        )


def export_paths(output_dir: str | os.PathLike, name: str, formats: Sequence[str]) -> dict[str, Path]:
    """Output file of each format: ``<name>_reviewed.seg.nrrd``, ``_reviewed_labels.nii.gz``,
    ``_reviewed_nodules.csv``/``.json``, ``_reviewed_seg.dcm``, ``_reviewed_sr.dcm``."""
    return {f: Path(output_dir) / f"{name}{_SUFFIXES[f]}" for f in EXPORT_FORMATS if f in formats}


def check_formats(formats: Sequence[str]) -> list[str]:
    """The formats, validated: raises ``ValueError`` naming unknown ones."""
    formats = [f.strip() for f in formats if f.strip()]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise OptionError(f"Unknown export format(s) {unknown or list(formats)}: use any of {', '.join(EXPORT_FORMATS)}.")
    return formats


def _base_name(seg_path: Path) -> str:
    name = seg_path.name
    for ext in (".seg.nrrd", ".nrrd", ".nhdr"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name[: -len("_reviewed")] if name.endswith("_reviewed") else name


def _model_of(tags: dict) -> tuple[str, str]:
    parts = tags.get(TAG_MODEL, "").split()
    if len(parts) >= 2:
        return " ".join(parts[:-1]), parts[-1]
    return "LungNoduleAI", __version__


def write_dicom_outputs(
    targets: dict[str, Path],
    tmp_dir: Path,
    layers: Sequence[sitk.Image],
    segments: Sequence[ExportSegment],
    ct: CTVolume,
    model: tuple[str, str],
    probability: sitk.Image | None = None,
    reviewer: str | None = None,
) -> None:
    """Write the ``dcm-seg`` and/or ``dcm-sr`` targets (in ``tmp_dir``) for segments of a CT read from DICOM.

    Raises:
        ValueError: the CT did not come from a DICOM series (what to do is in the message).
    """
    wanted = [f for f in DICOM_FORMATS if f in targets]
    if not wanted:
        return
    if ct.dicom is None:
        raise ValueError(
            f"DICOM {' and '.join(w.upper().replace('DCM-', '') for w in wanted)} export needs the CT's DICOM series, but '{ct.path}' is not DICOM. "
            "Give the source DICOM folder (lungnoduleai export --dicom DIR; in Slicer load the CT through the DICOM module), "
            "or export only seg.nrrd, nii.gz, csv and json."
        )
    sources = source_datasets(ct.dicom)  # the CT headers, read once for both objects
    seg_ds = make_dicom_seg(layers, segments, ct.dicom, model[0], model[1], __version__, probability=probability, content_creator=reviewer, sources=sources)
    if "dcm-seg" in targets:
        seg_ds.save_as(str(tmp_dir / targets["dcm-seg"].name))
    if "dcm-sr" in targets:
        sr = make_dicom_sr(seg_ds, segments, ct.dicom, model[0], model[1], __version__, observer=reviewer, sources=sources)
        sr.save_as(str(tmp_dir / targets["dcm-sr"].name))


@dataclass
class ReviewedSegment:
    """A segment chosen for export, as the reviewer left it (``tags`` as in the ``.seg.nrrd``)."""

    id: str
    name: str
    color: tuple
    tags: dict
    status: str
    edited: bool


def write_reviewed(
    targets: dict[str, Path],
    labels: sitk.Image,
    measured: Sequence[Candidate],
    segments: Sequence[ReviewedSegment],
    header: dict,
    left_out: dict,
    ct: CTVolume,
    model: tuple[str, str],
    probability: sitk.Image | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write every target at once (temporary folder, then renames; :class:`.outputset.OutputSet`), or none.

    Args:
        targets: output paths by format (:func:`export_paths`).
        labels: label image on the CT grid, value n = ``segments[n - 1]``.
        measured: :func:`.candidates.measure_candidates` of ``labels``.
        segments: the exported segments in label order.
        header: fields put first in the JSON (source, segmentation...).
        left_out: segment ID -> status of the segments not exported (JSON).
        ct: the CT; DICOM formats need it read from DICOM (``ct.dicom``).
        model: detector ``(name, version)`` for the DICOM algorithm identification.
        probability: for a fractional DICOM SEG.
        overwrite: replace existing targets.

    Each segment's tags gain its tracking UID (kept if it had one, so a nodule
    keeps its UID across exports), whether it was edited and the CT's identity.
    """
    records, export_segments = [], []
    for n, (seg, m) in enumerate(zip(segments, measured), start=1):
        tags = seg.tags
        values = with_reader_overrides(m.to_dict(), tags)  # the reader's type, where set, and the category that follows
        prob = float(tags[TAG_PROBABILITY]) if tags.get(TAG_PROBABILITY) else None
        kind = algorithm_type(tags, seg.edited)
        uid = tags.get(TAG_TRACKING_UID) or tracking_uid(ct.series_uid or ct.name, seg.id, tags.get(TAG_DETECTED, seg.name))
        tags[TAG_TRACKING_UID] = uid
        tags[TAG_EDITED] = "1" if seg.edited else "0"
        tags.update(identity_tags(ct.identity()))
        records.append(
            {
                **values,
                "id": n,
                "rank": n,
                "segment_id": seg.id,
                "name": seg.name,
                "review_status": seg.status,
                "reviewer": tags.get(TAG_REVIEWER, ""),
                "review_time": tags.get(TAG_REVIEW_TIME, ""),
                "edited": seg.edited,
                "algorithm_type": kind,
                "tracking_uid": uid,
                "detection_rank": int(tags[TAG_RANK]) if tags.get(TAG_RANK, "").isdigit() else None,
                "probability": prob if prob is not None else 0.0,
            }
        )
        export_segments.append(ExportSegment(seg.name, 0, n, kind, f"Nodule {n}", uid, {**values, "probability": prob}, tuple(seg.color)))
    fmt, first = next(iter(targets.items()))
    name = first.name[: -len(_SUFFIXES[fmt])] + "_reviewed"  # the set's name whatever formats were asked: one lock for one export
    with OutputSet(targets, overwrite, name=name, source=source_key(ct.identity()), what="export folder ") as out:
        try:
            if "nii.gz" in targets:
                sitk.WriteImage(labels, str(out.tmp("nii.gz")), useCompression=True)
            if "seg.nrrd" in targets:
                meta = [{"id": s.id, "name": s.name, "color": tuple(s.color), "label": n, "tags": s.tags} for n, s in enumerate(segments, start=1)]
                write_segmentation_labelmap(labels, meta, out.tmp("seg.nrrd"), source=ct.identity())
            if "csv" in targets:
                write_candidates_csv([Candidate.from_dict(r) for r in records], out.tmp("csv"), [r.get("reader_overrides") for r in records])
            if "json" in targets:
                exported = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                write_json(
                    {**header, "model": {"name": model[0], "version": model[1]}, "exported": exported, "left_out": left_out, "nodules": records},
                    out.tmp("json"),
                )
            reviewers = [r["reviewer"] for r in records if r["reviewer"]]
            write_dicom_outputs(targets, out.dir, [labels], export_segments, ct, model, probability, reviewers[0] if reviewers else None)
        except (OSError, RuntimeError) as exc:
            raise output_error(out.folder, exc, "export folder ") from exc
        out.commit()
    return targets


class ReviewFront:
    """Where an export's segments come from: a ``.seg.nrrd`` file (:class:`FileFront`) or Slicer's MRML nodes (the Logic's).

    A front lists the segments (``id``, ``name``, ``color``, ``tags``), makes
    the label image of the chosen ones on the CT's grid (running its own
    checks that they belong to that CT), and says whether a segment was
    edited. :func:`export_segments` does the rest the same way for both.

    Attributes:
        segments: dicts with ``id``, ``name``, ``color`` and ``tags``, in review order.
        noun: what the user calls a segment here ("segment", "candidate").
        where: the segmentation, for messages.
        ct_label: the CT, for messages.
        pending_hint: what to do about unresolved segments.
        overwrite_hint: what to do about existing files.
    """

    segments: list[dict]
    noun = "segment"
    where = "the segmentation"
    ct_label = "the CT given"
    pending_hint = "Review them in Slicer, or export with --include-pending."
    overwrite_hint = "Use --overwrite, or another --output-dir."

    def labels(self, chosen: Sequence[int]) -> sitk.Image:
        """Label image on the CT's grid: value n = the n-th chosen segment (indices into :attr:`segments`)."""
        raise NotImplementedError

    def edited(self, index: int) -> bool:
        """Whether segment ``index``'s voxels differ from what the detector made."""
        raise NotImplementedError


def choose_for_export(front: ReviewFront, include_pending: bool) -> tuple[list[str], list[int]]:
    """The review statuses of a front's segments and the indices of those to export (:func:`.review.select_for_export`).

    Raises:
        ValueError: segments still pending or flagged (without ``include_pending``), or none to export.
    """
    statuses = [review_status(s["tags"]) for s in front.segments]
    chosen, unresolved = select_for_export(statuses, include_pending)
    if unresolved:
        names = ", ".join(front.segments[i]["name"] for i in unresolved)
        raise ValueError(f"{len(unresolved)} {front.noun}(s) not yet accepted or rejected: {names}. {front.pending_hint}")
    if not chosen:
        raise ValueError(
            f"No accepted {front.noun}s in {front.where} ({len(statuses)} {front.noun}(s): {', '.join(sorted(set(statuses))) or 'none'}). "
            "Accept at least one nodule first."
        )
    return statuses, chosen


def export_segments(
    front: ReviewFront,
    ct: CTVolume,
    targets: dict[str, Path],
    header: dict,
    model: tuple[str, str] | None = None,
    include_pending: bool = False,
    overwrite: bool = False,
    probability: sitk.Image | None = None,
) -> list[ReviewedSegment]:
    """Export a front's reviewed segments: the one place that applies the review rule, measures and writes.

    Accepted segments are exported, rejected ones never; pending and flagged
    ones are refused unless ``include_pending`` (:func:`.review.select_for_export`).
    Measurements are recomputed on ``ct`` from the voxels as the reviewer left them.

    Args:
        front: the segments and their labels.
        ct: the CT (HU image, identity; ``dicom`` for the DICOM formats).
        targets: output paths by format (:func:`export_paths`).
        header: fields put first in the JSON.
        model: detector ``(name, version)``; default: from the first exported segment's tags.
        include_pending: also export pending and flagged segments.
        overwrite: replace existing targets.
        probability: the detection's probability map, for a fractional DICOM SEG.

    Returns:
        The exported segments in label order, their tags updated (tracking UID, edited, source).

    Raises:
        ValueError: unresolved segments, none accepted, empty segments, existing
            files, the front's own refusals, an unwritable folder.
    """
    statuses, chosen = choose_for_export(front, include_pending)
    labels = front.labels(chosen)
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    empty = [front.segments[i]["name"] for n, i in enumerate(chosen, start=1) if n not in present]
    if empty:
        raise ValueError(
            f"{front.noun.capitalize()}(s) {', '.join(empty)} have no voxel inside {front.ct_label}: empty (edited into emptiness), or drawn on another CT. "
            f"Reject or redraw them, and check that {front.ct_label} is the CT the nodules were marked on."
        )
    measured = measure_candidates(labels, ct.image)
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"Export files already exist: {', '.join(existing)}. {front.overwrite_hint}")
    reviewed = [ReviewedSegment(s["id"], s["name"], tuple(s["color"]), s["tags"], statuses[i], front.edited(i)) for i in chosen for s in [front.segments[i]]]
    left_out = {front.segments[i]["id"]: statuses[i] for i in range(len(statuses)) if i not in chosen}
    write_reviewed(targets, labels, measured, reviewed, header, left_out, ct, model or _model_of(reviewed[0].tags), probability, overwrite)
    return reviewed


class FileFront(ReviewFront):
    """The segments of a ``.seg.nrrd`` file, resampled onto the CT's grid."""

    def __init__(self, seg_file: SegmentationFile, seg_path: Path, ct: CTVolume, ct_label: str):
        self.seg_file, self.seg_path, self.ct, self.ct_label = seg_file, seg_path, ct, ct_label
        self.segments = seg_file.segments
        self.where = f"'{seg_path}'"

    def labels(self, chosen: Sequence[int]) -> sitk.Image:
        seg_file, ct = self.seg_file, self.ct.image
        outside = [
            seg_file.segments[i]["name"] for i in chosen if (box := seg_file.bbox(i)) is not None and not segment_inside(seg_file.index_to_lps(), box, ct)
        ]
        if outside:
            raise ValueError(
                f"Segment(s) {', '.join(outside)} reach outside the CT given: their voxels would be cut and their measurements wrong. "
                "Nothing was exported. Check that the segmentation was not moved or resampled, and that --dicom/--ct is the CT it was drawn on."
            )
        resampled = [sitk.Resample(layer, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16) for layer in seg_file.layers]
        arr = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint16)
        for n, i in enumerate(chosen, start=1):
            seg = seg_file.segments[i]
            arr[sitk.GetArrayViewFromImage(resampled[seg["layer"]]) == seg["label"]] = n
        labels = sitk.GetImageFromArray(arr)
        labels.CopyInformation(ct)
        return labels

    def edited(self, index: int) -> bool:
        return _segment_edited(self.seg_file, index)


def export_reviewed(
    seg_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dicom: str | os.PathLike | None = None,
    ct_path: str | os.PathLike | None = None,
    formats: Sequence[str] | None = None,
    include_pending: bool = False,
    overwrite: bool = False,
    probability_path: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Turn a reviewed ``.seg.nrrd`` plus its CT into export files (:func:`export_segments` with a :class:`FileFront`).

    Args:
        seg_path: the segmentation (detector output reviewed in Slicer, or a
            ``*_reviewed.seg.nrrd`` export).
        output_dir: folder for the files (created).
        dicom: the source CT's DICOM folder (needed for ``dcm-seg``/``dcm-sr``).
        ct_path: the CT as a file, when there is no DICOM.
        formats: any of :data:`EXPORT_FORMATS`; default all that the CT allows.
        include_pending: also export pending and flagged segments (rejected never).
        overwrite: replace existing files.
        probability_path: a ``*_probability.nrrd``: makes the DICOM SEG fractional
            (probability inside each reviewed mask) instead of binary.

    Returns:
        The written files by format.

    Raises:
        ValueError: every refusal, with what to do: no CT given, unknown format,
            DICOM formats without DICOM, unreviewed segments, nothing accepted,
            empty segments, segments outside the CT, existing files, unwritable folder.
    """
    seg_path = Path(seg_path)
    if dicom is None and ct_path is None:
        raise OptionError("Give the CT the segmentation belongs to: --dicom SOURCE_DIR (needed for DICOM SEG/SR) or --ct FILE.")
    if formats is None:
        formats = list(EXPORT_FORMATS[1:]) if dicom is not None else ["nii.gz", "csv", "json"]
    formats = check_formats(formats)
    if dicom is None and any(f in DICOM_FORMATS for f in formats):
        raise OptionError(
            f"DICOM SEG/SR export needs the CT's DICOM series, but the CT given ('{ct_path}') is not DICOM. "
            "Give the source DICOM folder with --dicom, or leave dcm-seg and dcm-sr out of --formats."
        )
    seg_file = read_segmentation(seg_path)
    ct = read_ct(dicom if dicom is not None else ct_path)  # int16 HU already
    ct_label = f"the DICOM series in '{dicom}'" if dicom is not None else f"'{ct_path}'"
    check_segmentation_source(seg_file, seg_path, ct, ct_label)
    front = FileFront(seg_file, seg_path, ct, "the CT given")
    targets = export_paths(output_dir, _base_name(seg_path), formats)
    header = {"segmentation": str(seg_path), "source": {"path": ct.path, **ct.identity()}}
    probability = _read_probability_for(probability_path, ct) if probability_path else None
    export_segments(front, ct, targets, header, None, include_pending, overwrite, probability)
    return targets

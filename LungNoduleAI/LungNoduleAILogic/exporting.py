"""Export of reviewed candidates from MRML nodes, and the checks that it writes them for the right CT.

:class:`ExportMixin` is part of :class:`LungNoduleAILogic.LungNoduleAILogic` (it uses its
conversions and review accessors); it lives here so that each file says what it does.
"""

from __future__ import annotations

import json
from typing import Sequence

import slicer

from LungNoduleAILib.export import DICOM_FORMATS, ReviewFront, check_formats, choose_for_export, export_paths, export_segments
from LungNoduleAILib.geometry import geometry_from_ijk_to_ras, ijk_to_lps_matrix
from LungNoduleAILib.imageio import CTVolume, read_ct, to_hu
from LungNoduleAILib.provenance import check_same_source, grid_mismatches, identity_from_tags, image_grid, segment_inside
from LungNoduleAILib.review import TAG_EDITED, TAG_SOURCE_GRID, TAG_SOURCE_SERIES, TAG_SOURCE_SHA256, TAG_TRACKING_UID

from .names import ATTR_DICOM_INSTANCES, ATTR_MODEL, ATTR_SOURCE, REF_PROBABILITY

__all__ = ["ExportMixin"]


class ExportMixin:
    """Review export and source checks of :class:`LungNoduleAILogic.LungNoduleAILogic`."""

    def recordedSource(self, segmentationNode) -> dict | None:
        """The identity of the CT the segmentation's candidates were detected on (``None`` for one drawn by hand).

        From the node's attribute (set by :meth:`detect`/:meth:`importResults`, saved with the scene),
        else from its segments' tags (kept in a ``.seg.nrrd``).

        Raises:
            ValueError: its segments record different CTs.
        """
        recorded = json.loads(segmentationNode.GetAttribute(ATTR_SOURCE) or "null")
        if recorded:
            return recorded
        segmentation = segmentationNode.GetSegmentation()
        tags = [
            {k: v for k in (TAG_SOURCE_SERIES, TAG_SOURCE_SHA256, TAG_SOURCE_GRID) if (v := self.segmentTag(segmentation.GetSegment(sid), k)) is not None}
            for sid in self.candidateSegmentIds(segmentationNode)
        ]
        return identity_from_tags(tags, f"Segmentation '{segmentationNode.GetName()}'")

    def _checkExportSource(self, segmentationNode, volumeNode, source: CTVolume, dicomSource, segmentIds: list[str]) -> None:
        """Refuse an export whose volume (``source``: its HU image, DICOM series and identity) or DICOM series is not the CT the segmentation was made on.

        Raises:
            ValueError: naming what differs (UIDs, grid, voxel checksum), or the segments that reach outside the volume.
        """
        what = f"Segmentation '{segmentationNode.GetName()}'"
        ct, dicomSeries, identity = source.image, source.dicom, source.identity()
        recorded = self.recordedSource(segmentationNode)
        voxels = {sid: self._segmentVoxels(segmentationNode, sid) for sid in segmentIds}  # (mask, bbox, index->LPS), read once
        if recorded is not None:
            check_same_source(recorded, identity, what, f"volume '{volumeNode.GetName()}'")
        else:
            volumeGrid = image_grid(ct)
            for _, _, indexToLps in voxels.values():
                origin, spacing, direction = geometry_from_ijk_to_ras(ijk_to_lps_matrix(indexToLps))
                diffs = grid_mismatches(
                    {"size_ijk": [], "spacing_mm": spacing, "direction": direction, "origin_lps_mm": origin}, {**volumeGrid, "size_ijk": []}
                )
                if diffs:
                    raise ValueError(
                        f"{what} records no source CT, and its grid is not that of volume '{volumeNode.GetName()}': {'; '.join(diffs)}. "
                        "Nothing was exported. Select the CT it was drawn on, or set the segmentation's geometry to that volume."
                    )
        if dicomSeries is not None and not (volumeNode.GetAttribute(ATTR_DICOM_INSTANCES) or "").split():
            # a volume not loaded through the DICOM module: the series must hold this volume's voxels
            series = read_ct(dicomSource)
            check_same_source(
                {**identity, "series_uid": None},
                {**series.identity(), "series_uid": None},
                f"Volume '{volumeNode.GetName()}'",
                f"the DICOM series {dicomSeries.series_uid}",
            )
        outside = [
            segmentationNode.GetSegmentation().GetSegment(sid).GetName()
            for sid, (_, bbox, indexToLps) in voxels.items()
            if bbox[3] >= bbox[0] and not segment_inside(indexToLps, bbox, ct)
        ]
        if outside:
            raise ValueError(
                f"Segment(s) {', '.join(outside)} reach outside volume '{volumeNode.GetName()}': their voxels would be cut and their measurements wrong. "
                "Nothing was exported. Select the CT they were drawn on, or trim them to it in the Segment Editor."
            )

    def exportReviewed(
        self,
        segmentationNode,
        referenceVolumeNode,
        outputDir: str,
        formats: Sequence[str] = ("seg.nrrd", "nii.gz", "csv", "json"),
        includePending: bool = False,
        overwrite: bool = False,
        dicomSource: str | Sequence[str] | None = None,
        segmentationType: str = "binary",
    ) -> list[str]:
        """Export the accepted candidates as the annotator left them.

        Segments are exported in ``referenceVolumeNode``'s geometry with their
        measurements recomputed from the edited voxels; rejected ones are left
        out; pending and flagged ones are refused unless ``includePending``.

        Files (``<volume>`` = the reference volume's name): ``<volume>_reviewed.seg.nrrd``,
        ``<volume>_reviewed_labels.nii.gz`` (label i = i-th exported nodule),
        ``<volume>_reviewed_nodules.csv`` and ``.json``, and for the DICOM formats
        ``<volume>_reviewed_seg.dcm`` (``dcm-seg``) and ``<volume>_reviewed_sr.dcm``
        (``dcm-sr``, TID 1500 measurements referencing the SEG).

        Args:
            formats: any of :data:`EXPORT_FORMATS`.
            dicomSource: for ``dcm-seg``/``dcm-sr``: the CT's DICOM folder or
                files. Default: the instances the volume was loaded from through
                Slicer's DICOM module (its ``DICOM.instanceUIDs``, looked up in
                ``slicer.dicomDatabase``).
            segmentationType: ``binary`` or ``fractional`` (the detection
                probability inside each reviewed mask) for the DICOM SEG.

        Returns:
            Paths of the written files.

        Raises:
            ValueError: unknown format, unreviewed candidates, nothing to export,
                an empty segment, DICOM formats for a CT not from DICOM, existing
                files (without ``overwrite``) or an unwritable folder.
        """
        formats = check_formats(formats)
        if segmentationType not in ("binary", "fractional"):
            raise ValueError(f"Unknown DICOM segmentation type '{segmentationType}': use binary or fractional.")
        self._checkCTVolume(referenceVolumeNode)
        if segmentationNode is None:
            raise ValueError("No segmentation selected: select the nodule segmentation to export.")
        front = _NodeFront(self, segmentationNode, referenceVolumeNode)
        wantsDicom = any(f in DICOM_FORMATS for f in formats)
        choose_for_export(front, includePending)  # unresolved or nothing accepted: refused before looking for DICOM files
        dicomSeries = self.dicomSeriesForVolume(referenceVolumeNode, dicomSource) if wantsDicom else None
        probability = None
        if wantsDicom and segmentationType == "fractional":
            probNode = segmentationNode.GetNodeReference(REF_PROBABILITY)
            if probNode is None:
                raise ValueError(
                    f"A fractional DICOM SEG needs the probability map of the detection, but '{segmentationNode.GetName()}' has none: export a binary SEG."
                )
            probability = self.imageFromVolume(probNode)
        name = referenceVolumeNode.GetName()
        ct = to_hu(self.imageFromVolume(referenceVolumeNode))
        seriesUid = dicomSeries.series_uid if dicomSeries else referenceVolumeNode.GetAttribute("DICOM.SeriesInstanceUID")
        front.source = CTVolume(image=ct, path=str(dicomSource or name), name=name, series_uid=seriesUid, dicom=dicomSeries)
        front.dicomSource = dicomSource
        header = {"source_volume": name, "source": front.source.identity(), "segmentation": segmentationNode.GetName()}
        model = json.loads(segmentationNode.GetAttribute(ATTR_MODEL) or "{}")
        modelId = (model.get("name") or "LungNoduleAI", model.get("version") or "unknown")
        targets = export_paths(outputDir, name, formats)
        reviewed = export_segments(front, front.source, targets, header, modelId, includePending, overwrite, probability)
        segmentation = segmentationNode.GetSegmentation()
        for r in reviewed:  # the nodule keeps its tracking UID in later exports
            segment = segmentation.GetSegment(r.id)
            segment.SetTag(TAG_TRACKING_UID, r.tags[TAG_TRACKING_UID])
            segment.SetTag(TAG_EDITED, r.tags[TAG_EDITED])
        return [str(p) for p in targets.values()]

    def dicomSeriesForVolume(self, volumeNode, dicomSource: str | Sequence[str] | None = None):
        """The DICOM series ``volumeNode`` was loaded from (for SEG/SR export).

        Args:
            dicomSource: the DICOM folder or files; default: the volume's
                ``DICOM.instanceUIDs`` looked up in Slicer's DICOM database.

        Raises:
            ValueError: the volume did not come from DICOM and no source was
                given, its instances are not in the database, or the source holds
                other instances than the ones the volume was loaded from.
        """
        from LungNoduleAILib.dicomio import choose_ct_series

        uids = (volumeNode.GetAttribute(ATTR_DICOM_INSTANCES) or "").split()
        if dicomSource is None:
            if not uids:
                raise ValueError(
                    f"Volume '{volumeNode.GetName()}' was not loaded from DICOM, so a DICOM SEG/SR cannot reference its images. "
                    "Load the CT through the DICOM module (import the series, then Load), run Detect on it, "
                    "or export seg.nrrd/NIfTI/CSV/JSON instead."
                )
            database = getattr(slicer, "dicomDatabase", None)
            files = [database.fileForInstance(uid) for uid in uids] if database is not None else []
            if len(files) != len(uids) or not all(files):
                raise ValueError(
                    f"The DICOM files of volume '{volumeNode.GetName()}' are not in Slicer's DICOM database any more. "
                    "Re-import the series in the DICOM module, or give the DICOM folder."
                )
            dicomSource = files
        series, _ = choose_ct_series(dicomSource)
        if uids and set(uids) - set(series.sop_instance_uids):
            missing = len(set(uids) - set(series.sop_instance_uids))
            raise ValueError(
                f"The DICOM source holds series {series.series_uid}, which lacks {missing} of the {len(uids)} instances volume "
                f"'{volumeNode.GetName()}' was loaded from: give the folder of the series the volume came from."
            )
        return series


class _NodeFront(ReviewFront):
    """The candidates of a segmentation node, as :func:`LungNoduleAILib.export.export_segments` takes them."""

    noun = "candidate"
    pending_hint = "Review them, or export with includePending=True."
    overwrite_hint = "Choose another folder or allow overwriting."

    def __init__(self, logic, segmentationNode, volumeNode):
        self.logic, self.segmentationNode, self.volumeNode = logic, segmentationNode, volumeNode
        self.where = f"'{segmentationNode.GetName()}'"
        self.ct_label = f"volume '{volumeNode.GetName()}'"
        self.source, self.dicomSource = None, None  # set by exportReviewed once the volume's DICOM series is known
        segmentation = segmentationNode.GetSegmentation()
        self.ids = logic.candidateSegmentIds(segmentationNode)
        self.segments = []
        for sid in self.ids:
            segment = segmentation.GetSegment(sid)
            self.segments.append({"id": sid, "name": segment.GetName(), "color": tuple(segment.GetColor()), "tags": logic.segmentTags(segment)})

    def labels(self, chosen):
        ids = [self.ids[i] for i in chosen]
        labels = self.logic._segmentArrayOnVolume(self.segmentationNode, ids, self.volumeNode)
        self.logic._checkExportSource(self.segmentationNode, self.volumeNode, self.source, self.dicomSource, ids)
        return labels

    def edited(self, index):
        return self.logic.isEdited(self.segmentationNode, self.ids[index])

"""Reviewed nodules as DICOM: a Segmentation (SEG) and a TID 1500 measurement report (SR).

Both are made with ``highdicom`` and reference the CT instances the nodules
were found in (:class:`.dicomio.DicomSeries`). The segment masks are sampled
onto each source slice's own plane (nearest neighbour), so a SEG frame lies
exactly on its CT image even when the engine read the series onto a
regularised grid (gantry tilt, missing slices). Only frames that contain a
segment are stored.

Segment coding: category "Morphologically abnormal structure" (SCT 49755003),
type "Nodule" (SCT 27925004), anatomic region "Lung" (SCT 39607008), the
model as algorithm identification; algorithm type AUTOMATIC for an AI segment
left as detected, SEMIAUTOMATIC for one the annotator edited, MANUAL for one
drawn by hand.

``highdicom`` is imported when a DICOM export is made, not before: the engine
runs without it, and asks for it (``pip install highdicom``) only then.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .dicomio import DicomSeries

__all__ = [
    "ExportSegment",
    "ALGORITHM_TYPES",
    "tracking_uid",
    "source_datasets",
    "masks_on_source_slices",
    "make_dicom_seg",
    "make_dicom_sr",
    "seg_masks_on_slices",
    "sr_measurements",
    "MANUFACTURER",
]

MANUFACTURER = "LungNoduleAI"
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
_PRIVATE_SCHEME = "99LNAI"


@dataclass
class ExportSegment:
    """One reviewed nodule to put in the SEG and the SR.

    Attributes:
        label: segment label (name shown by viewers, at most 64 characters).
        layer: index into the ``layers`` given to :func:`masks_on_source_slices`.
        label_value: the value of this segment's voxels in that layer.
        algorithm_type: ``AUTOMATIC``, ``SEMIAUTOMATIC`` or ``MANUAL``.
        tracking_id: human-readable tracking identifier, unique in the export.
        tracking_uid: tracking UID (stable for one nodule across exports).
        measurements: ``longest_axial_diameter_mm``, ``diameter_mm`` (equivalent
            sphere), ``volume_mm3``, ``mean_hu`` and optionally ``probability`` (0-1).
        color: display colour ``(r, g, b)`` 0-1.
    """

    label: str
    layer: int
    label_value: int
    algorithm_type: str
    tracking_id: str
    tracking_uid: str
    measurements: dict = field(default_factory=dict)
    color: tuple = (1.0, 0.0, 0.0)


def _hd():
    try:
        import highdicom

        logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger("highdicom").level))
    except ImportError as exc:
        raise ValueError(
            "DICOM SEG/SR export needs the 'highdicom' package, which is not installed. "
            "Install it (pip install highdicom; in 3D Slicer: the LungNoduleAI module offers to install it) and export again."
        ) from exc
    return highdicom


def tracking_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (e.g. source series UID, segment ID, detected-mask hash): the same nodule keeps its UID."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _clean(ds):
    """Strip trailing NUL bytes and spaces that some scanners leave in text values (invalid in the copied attributes)."""
    for elem in ds.iterall():
        if elem.VR in ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT") and elem.value is not None:
            if isinstance(elem.value, str) and elem.value != elem.value.rstrip("\x00 "):
                elem.value = elem.value.rstrip("\x00 ")
    return ds


def _person_name(name: str | None) -> str | None:
    """A login or display name as a DICOM person name (one component: family name, marked with a caret)."""
    if not name:
        return None
    return name if "^" in name else name.replace("^", " ") + "^"


def source_datasets(series: DicomSeries) -> list:
    """Headers (no pixel data) of the series' instances, in slice order, with text values tidied.

    A missing or empty Slice Thickness (type 2 in CT, needed for the SEG's
    pixel measures) is set, in these copies only, to the slice step.
    """
    import pydicom

    datasets = [_clean(pydicom.dcmread(f, stop_before_pixels=True)) for f in series.files]
    step = float(np.median(np.diff(series.positions_lps_mm @ series.normal))) if len(series) > 1 else 1.0
    for ds in datasets:
        if ds.get("SliceThickness") in (None, ""):
            ds.SliceThickness = f"{step:.6g}"
    return datasets


def _slice_reference(series: DicomSeries, k: int) -> sitk.Image:
    o = np.asarray(series.orientation, float)
    row, col = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    ref = sitk.Image(series.columns, series.rows, 1, sitk.sitkUInt8)
    dy, dx = series.pixel_spacing_mm
    ref.SetSpacing((float(dx), float(dy), 1.0))
    ref.SetOrigin(tuple(float(v) for v in series.positions_lps_mm[k]))
    ref.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel().tolist()))
    return ref


def _crop_to_content(image: sitk.Image) -> sitk.Image | None:
    arr = sitk.GetArrayViewFromImage(image)
    nz = np.argwhere(np.asarray(arr) > 0)
    if nz.size == 0:
        return None
    (k0, j0, i0), (k1, j1, i1) = nz.min(0), nz.max(0)
    return image[int(i0) : int(i1) + 1, int(j0) : int(j1) + 1, int(k0) : int(k1) + 1]


def masks_on_source_slices(
    layers: Sequence[sitk.Image], segments: Sequence[ExportSegment], series: DicomSeries, probability: sitk.Image | None = None
) -> tuple[list[int], np.ndarray]:
    """Each segment's mask on each CT source slice that it touches.

    Args:
        layers: label images (any grid in the same LPS frame as the series).
        segments: which layer and value make each segment.
        series: the source CT series.
        probability: optional probability map (0-1, any grid); when given the
            result holds the probability inside each mask (at least 1/255 there)
            instead of 1, for a fractional SEG.

    Returns:
        ``(slice_indices, masks)``: indices into ``series`` (ascending) of the
        slices with any segment, and ``masks`` of shape
        ``(len(slice_indices), rows, columns, len(segments))`` (uint8 0/1, or
        float32 0-1 with ``probability``).
    """
    crops = [_crop_to_content(layer) for layer in layers]
    normal = np.cross(np.asarray(series.orientation[:3], float), np.asarray(series.orientation[3:], float))
    d = series.positions_lps_mm @ normal
    # each crop's extent along the slice normal (its box corners), to skip the slices that miss it
    spans = []
    for crop in crops:
        if crop is None:
            spans.append(None)
            continue
        size = crop.GetSize()
        corners = np.array(
            [crop.TransformContinuousIndexToPhysicalPoint((a - 0.5, b - 0.5, c - 0.5)) for a in (0, size[0]) for b in (0, size[1]) for c in (0, size[2])]
        )
        proj = corners @ normal
        spans.append((proj.min() - 1e-3, proj.max() + 1e-3))
    frames: list[int] = []
    per_frame: list[np.ndarray] = []
    dtype = np.float32 if probability is not None else np.uint8
    for k in range(len(series)):
        ref = None
        stack = None
        for li, crop in enumerate(crops):
            if crop is None or not spans[li][0] <= d[k] <= spans[li][1]:
                continue
            ref = ref if ref is not None else _slice_reference(series, k)
            sampled = sitk.GetArrayFromImage(sitk.Resample(crop, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, crop.GetPixelID()))[0]
            for si, seg in enumerate(segments):
                if seg.layer != li:
                    continue
                m = np.asarray(sampled) == seg.label_value
                if m.any():
                    if stack is None:
                        stack = np.zeros((series.rows, series.columns, len(segments)), dtype)
                    stack[..., si] = m
        if stack is None:
            continue
        if probability is not None:
            p = sitk.GetArrayFromImage(sitk.Resample(probability, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))[0]
            stack = np.where(stack > 0, np.maximum(np.asarray(p)[..., None], 1.0 / 255.0), 0.0).astype(np.float32)
        frames.append(k)
        per_frame.append(stack)
    if not frames:
        return [], np.zeros((0, series.rows, series.columns, len(segments)), dtype)
    return frames, np.stack(per_frame)


def make_dicom_seg(
    layers: Sequence[sitk.Image],
    segments: Sequence[ExportSegment],
    series: DicomSeries,
    model_name: str,
    model_version: str,
    software_version: str,
    probability: sitk.Image | None = None,
    series_number: int = 901,
    content_creator: str | None = None,
    sources: Sequence | None = None,
):
    """A DICOM Segmentation of ``segments`` referencing ``series``.

    Args:
        layers, segments: the masks (see :func:`masks_on_source_slices`).
        series: source CT series; patient, study and frame of reference come from it.
        model_name, model_version: the detector, as algorithm identification.
        software_version: LungNoduleAI version (Software Versions).
        probability: give it for a FRACTIONAL (probability) SEG, else BINARY.
        content_creator: the annotator's name (Content Creator's Name).
        sources: the series' headers from :func:`source_datasets`, if already read.

    Returns:
        The ``highdicom.seg.Segmentation`` dataset.

    Raises:
        ValueError: no segments, a segment with no voxel on any source slice,
            an unknown algorithm type, or highdicom missing.
    """
    hd = _hd()
    from pydicom.sr.codedict import codes

    if not segments:
        raise ValueError("No segments to export as DICOM SEG: accept at least one nodule.")
    bad = [s.algorithm_type for s in segments if s.algorithm_type not in ALGORITHM_TYPES]
    if bad:
        raise ValueError(f"Unknown algorithm type(s) {bad}: use {', '.join(ALGORITHM_TYPES)}.")
    frames, masks = masks_on_source_slices(layers, segments, series, probability)
    missing = [s.label for i, s in enumerate(segments) if not masks[..., i].any()]
    if missing:
        raise ValueError(
            f"Segment(s) {', '.join(missing)} have no voxel on any slice of the source series {series.series_uid}: "
            "they lie outside the CT that the DICOM folder holds. Is it the series the nodules were found in?"
        )
    sources = sources if sources is not None else source_datasets(series)
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name[:64], version=model_version[:64], family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for n, s in enumerate(segments, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=s.label[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                algorithm_type=s.algorithm_type,
                algorithm_identification=algorithm if s.algorithm_type != "MANUAL" else None,
                tracking_uid=s.tracking_uid,
                tracking_id=s.tracking_id[:64],
                anatomic_regions=[codes.SCT.Lung],
                display_color=hd.color.CIELabColor.from_rgb(*[int(round(255 * c)) for c in s.color]) if hasattr(hd.color.CIELabColor, "from_rgb") else None,
            )
        )
    orientation = hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in series.orientation])
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in series.positions_lps_mm[k]]) for k in frames]
    measures = hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in series.pixel_spacing_mm], slice_thickness=float(sources[0].SliceThickness))
    with warnings.catch_warnings():
        # names copied from the source such as "Anonymous" make highdicom warn; they are the hospital's, kept as they are
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return _segmentation(
            hd,
            sources,
            masks,
            descriptions,
            series_number,
            model_name,
            software_version,
            content_creator,
            orientation,
            positions,
            measures,
            probability is not None,
        )


def _segmentation(hd, sources, masks, descriptions, series_number, model_name, software_version, content_creator, orientation, positions, measures, fractional):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        fractional_type="PROBABILITY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{MANUFACTURER} {model_name}"[:64],
        software_versions=software_version,
        device_serial_number="0",
        content_description="Lung nodules reviewed in LungNoduleAI"[:64],
        content_label="NODULES",
        content_creator_name=_person_name(content_creator),
        plane_orientation=orientation,
        plane_positions=positions,
        pixel_measures=measures,
        series_description="LungNoduleAI reviewed nodules",
    )


def sr_measurements(segment: ExportSegment) -> list:
    """The TID 1500 measurements of one nodule: (concept, value, unit, derivation or None) tuples, in report order.

    The long and short axes are the Lung-RADS v2022 ones (on the image where the nodule is longest;
    SNOMED "Long axis", "Short axis"), their mean is "Diameter" with derivation "Mean"; the solid
    component's mean diameter and volume have no standard concept and take private codes.
    """
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    m = segment.measurements
    mm, mm3 = codes.UCUM.Millimeter, codes.UCUM.CubicMillimeter
    out = []
    if m.get("long_axis_mm") is not None:
        out += [(codes.SCT.LongAxis, m["long_axis_mm"], mm, None), (codes.SCT.ShortAxis, m["short_axis_mm"], mm, None)]
        out.append((codes.SCT.Diameter, m["mean_diameter_mm"], mm, codes.SCT.Mean))
    else:  # measurements made before the characterisation: the longest axial diameter
        out.append((codes.SCT.LongAxis, m["longest_axial_diameter_mm"], mm, None))
    out += [
        (Code("EQDIAM", _PRIVATE_SCHEME, "Equivalent sphere diameter"), m["diameter_mm"], mm, None),
        (codes.SCT.Volume, m["volume_mm3"], mm3, None),
        (codes.SCT.Mean, m["mean_hu"], codes.UCUM.HounsfieldUnit, None),
    ]
    if m.get("solid_component_mean_diameter_mm") is not None:
        out.append((Code("SOLIDDIAM", _PRIVATE_SCHEME, "Solid component mean diameter"), m["solid_component_mean_diameter_mm"], mm, None))
        out.append((Code("SOLIDVOL", _PRIVATE_SCHEME, "Solid component volume"), m["solid_component_volume_mm3"], mm3, None))
    if m.get("probability") is not None:
        out.append((Code("DETPROB", _PRIVATE_SCHEME, "Nodule detection probability"), m["probability"], Code("1", "UCUM", "no units"), None))
    return out


NODULE_TYPE_CODES = {
    "non-solid": ("112120", "DCM", "Ground glass opacity"),
    "calcified": ("237897009", "SCT", "Calcified"),
    "solid": ("SOLID", _PRIVATE_SCHEME, "Solid nodule"),
    "part-solid": ("PARTSOLID", _PRIVATE_SCHEME, "Part-solid nodule"),
}
"""Coded value of each nodule type in the SR (DCM and SNOMED where a concept exists; private codes for solid and part-solid)."""


def sr_evaluations(segment: ExportSegment) -> list:
    """The TID 1500 qualitative evaluations of one nodule: (concept, value) code pairs: its type ("Lesion density"-like,
    private concept) and the Lung-RADS v2022 category it suggests (DCM "Assessment Category", private values)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    m = segment.measurements
    by_reader = "type" in (m.get("reader_overrides") or {})  # the reader's type, and the category that follows from it: marked as such
    out = []
    if m.get("type") in NODULE_TYPE_CODES:
        concept = Code("NODTYPERDR", _PRIVATE_SCHEME, "Nodule type (reader)") if by_reader else Code("NODTYPE", _PRIVATE_SCHEME, "Nodule type")
        out.append((concept, Code(*NODULE_TYPE_CODES[m["type"]])))
    if m.get("lung_rads"):
        meaning = f"Lung-RADS v2022 category {m['lung_rads']}" + (" (reader's type)" if by_reader else "")
        out.append((codes.DCM.AssessmentCategory, Code(f"LR2022-{m['lung_rads']}", _PRIVATE_SCHEME, meaning)))
    return out


def make_dicom_sr(
    seg_dataset,
    segments: Sequence[ExportSegment],
    series: DicomSeries,
    model_name: str,
    model_version: str,
    software_version: str,
    observer: str | None = None,
    sources: Sequence | None = None,
):
    """A Comprehensive 3D SR (TID 1500 measurement report): one measurement group per nodule.

    Each group carries the nodule's tracking identifier and UID, a reference to
    its segment in ``seg_dataset`` (and through it the source CT), finding
    "Nodule" at site "Lung", the measurements of :func:`sr_measurements` and the
    qualitative evaluations of :func:`sr_evaluations` (type, Lung-RADS category).

    Returns:
        The ``highdicom.sr.Comprehensive3DSR`` dataset.
    """
    hd = _hd()
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=tracking_uid(MANUFACTURER, model_name, model_version), name=MANUFACTURER, model_name=f"{model_name} {model_version}"[:64]
        ),
    )
    person = None
    if observer:
        person = hd.sr.ObserverContext(
            observer_type=codes.DCM.Person, observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=_person_name(observer))
        )
    context = hd.sr.ObservationContext(observer_person_context=person, observer_device_context=device)
    algorithm = hd.sr.AlgorithmIdentification(name=model_name[:64], version=model_version[:64])
    groups = []
    for n, s in enumerate(segments, start=1):
        algorithm_id = algorithm if s.algorithm_type != "MANUAL" else None
        measurements = [
            hd.sr.Measurement(name=concept, value=float(value), unit=unit, derivation=derivation, algorithm_id=algorithm_id)
            for concept, value, unit, derivation in sr_measurements(s)
        ]
        evaluations = [hd.sr.QualitativeEvaluation(name=concept, value=value) for concept, value in sr_evaluations(s)]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=s.tracking_uid, identifier=s.tracking_id[:64]),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg_dataset.SOPClassUID,
                    sop_instance_uid=seg_dataset.SOPInstanceUID,
                    segment_number=n,
                    source_series=hd.sr.SourceSeriesForSegmentation(series.series_uid),
                ),
                finding_type=codes.SCT.Nodule,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
                measurements=measurements,
                qualitative_evaluations=evaluations or None,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=Code("25045-6", "LN", "CT unspecified body region"),
        imaging_measurements=groups,
    )
    sources = sources if sources is not None else source_datasets(series)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")  # the hospital's names, kept as they are
        return _comprehensive_sr(hd, seg_dataset, sources, report)


def _comprehensive_sr(hd, seg_dataset, sources, report):
    return hd.sr.Comprehensive3DSR(
        evidence=[seg_dataset] + sources,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=seg_dataset.SeriesNumber + 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="LungNoduleAI nodule measurements",
    )


def seg_masks_on_slices(seg_path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a DICOM SEG back: ``({segment_number: {source SOP instance UID: mask}}, {segment_number: label})``.

    Each mask is the frame's ``(rows, columns)`` array (uint8, or float for a
    fractional SEG), keyed by the CT instance it was derived from.
    """
    hd = _hd()
    seg = hd.seg.segread(str(seg_path))
    out: dict = {}
    labels = {}
    for item in seg.SegmentSequence:
        labels[int(item.SegmentNumber)] = str(item.SegmentLabel)
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    shared = seg.SharedFunctionalGroupsSequence[0]
    for f, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ident = frame if "SegmentIdentificationSequence" in frame else shared  # one segment: in the shared groups
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sop = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out.setdefault(number, {})[sop] = pixels[f]
    return out, labels

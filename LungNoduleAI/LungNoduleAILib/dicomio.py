"""Choosing and reading the CT series of a DICOM folder, whatever else lies in it.

A folder exported from a PACS often holds more than one CT series: localizer
(scout) images, secondary captures, dose reports, earlier SEG or SR objects,
several reconstructions. :func:`scan_dicom_folder` reads every file's header
(no pixel data), sets aside what is not an axial CT image and says why,
groups the rest by series and image plane, and :func:`choose_ct_series` takes
the largest stack. :func:`read_dicom_series` decodes the pixels (through
GDCM, so JPEG, JPEG-LS, JPEG 2000 and RLE compressed series read like
uncompressed ones) and puts them on a regular grid:

- slices are sorted by their position along the slice normal, never by
  file name or instance number;
- a gantry tilt (slice positions sheared along the image plane) is undone by
  shifting every slice back onto the first slice's in-plane lattice;
- missing slices or non-uniform spacing are resampled linearly onto a uniform
  grid (gaps wider than :data:`MAX_GAP_MM` are refused: a nodule could be
  hidden in them);
- duplicated positions keep the first instance.

Every change is reported in the returned notes, every refusal raises a
``ValueError`` that names the files and what to do. Coordinates are DICOM
patient coordinates (LPS, mm), like everything in the engine.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
    "DicomSeries",
    "scan_dicom_folder",
    "choose_ct_series",
    "read_dicom_series",
    "read_dicom_folder",
    "is_dicom_file",
    "CT_IMAGE_STORAGE",
    "MAX_GAP_MM",
]

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MAX_GAP_MM = 10.0
"""Widest gap between neighbouring slices (mm) that is filled by interpolation; wider ones are refused."""
_MIN_SLICES = 16
_POSITION_TOL_MM = 0.01
_SPACING_TOL = 0.01  # relative deviation of a slice step from the nominal one that counts as non-uniform
_TILT_TOL_VOXELS = 0.05


@dataclass
class DicomSeries:
    """One stack of parallel CT slices: a series, or the part of it with one image plane.

    Attributes:
        series_uid: SeriesInstanceUID.
        files: paths, sorted along the slice normal (feet to head for axial LPS).
        sop_instance_uids: one per file, same order.
        positions_lps_mm: ``(n, 3)`` ImagePositionPatient of each file, same order.
        orientation: the six ImageOrientationPatient cosines (row, then column direction).
        pixel_spacing_mm: ``(row spacing, column spacing)`` as in DICOM PixelSpacing
            (the distance between rows first).
        rows, columns: image size in pixels.
        description: SeriesDescription (may be empty).
        notes: remarks made while sorting (duplicates dropped...).
        study_uid, frame_of_reference_uid, patient_id: StudyInstanceUID,
            FrameOfReferenceUID and PatientID of the first slice ("" when absent):
            the identity a result of this series records (see :mod:`.provenance`).
    """

    series_uid: str
    files: list[str]
    sop_instance_uids: list[str]
    positions_lps_mm: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing_mm: tuple[float, float]
    rows: int
    columns: int
    description: str = ""
    notes: list[str] = field(default_factory=list)
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    patient_id: str = ""

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, float)
        return np.cross(o[:3], o[3:])

    def __len__(self) -> int:
        return len(self.files)


def _require_pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom ships with Slicer and is a dependency
        raise ValueError("Reading DICOM folders needs the 'pydicom' package: pip install pydicom") from exc
    return pydicom


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _sop_class_name(uid: str) -> str:
    pydicom = _require_pydicom()
    try:
        return pydicom.uid.UID(uid).name or uid
    except Exception:
        return uid


_IDENTITY_TAGS = {"study_uid": "StudyInstanceUID", "frame_of_reference_uid": "FrameOfReferenceUID", "patient_id": "PatientID"}


def scan_dicom_folder(directory: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[DicomSeries], list[str]]:
    """Read the headers of every file under ``directory`` (recursively) and group the CT slices.

    Args:
        directory: a folder, or a list of files (e.g. the instances a DICOM
            database holds for one volume).

    Returns:
        ``(stacks, ignored)``: the CT stacks, largest first, and one line per
        kind of file that was set aside, with its count and reason.

    Raises:
        ValueError: ``directory`` is neither a folder nor a list of files.
    """
    pydicom = _require_pydicom()
    if isinstance(directory, (str, os.PathLike)):
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"'{directory}' is not a folder: give the folder that holds the CT's DICOM files.")
        paths = sorted(p for p in directory.rglob("*") if p.is_file())
    else:
        paths = [Path(p) for p in directory]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"{len(missing)} DICOM file(s) not found, e.g. '{missing[0]}'. Re-import the series into the DICOM database.")
    ignored: dict[str, int] = defaultdict(int)
    groups: dict[tuple, list] = defaultdict(list)
    meta: dict[tuple, dict] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:
            ignored["not DICOM"] += 1
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if path.name.upper() == "DICOMDIR" or sop_class == "1.2.840.10008.1.3.10":
            ignored["DICOMDIR index"] += 1
            continue
        if sop_class != CT_IMAGE_STORAGE:
            if not sop_class and str(ds.get("Modality", "")) == "CT" and "ImagePositionPatient" in ds:
                pass  # old files without SOP Class: accept CT images with geometry
            else:
                ignored[f"not a CT image ({_sop_class_name(sop_class) if sop_class else 'no SOP class'})"] += 1
                continue
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            ignored["localizer (scout) image"] += 1
            continue
        if not all(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")):
            ignored["CT image without position, orientation or pixel spacing"] += 1
            continue
        try:
            orientation = tuple(round(float(v), 4) for v in ds.ImageOrientationPatient)
            spacing = tuple(round(float(v), 4) for v in ds.PixelSpacing)
            position = [float(v) for v in ds.ImagePositionPatient]
        except (TypeError, ValueError):
            ignored["CT image with unreadable geometry values"] += 1
            continue
        if len(orientation) != 6 or len(spacing) != 2 or len(position) != 3:
            ignored["CT image with unreadable geometry values"] += 1
            continue
        key = (str(ds.get("SeriesInstanceUID", "")), orientation, spacing, int(ds.Rows), int(ds.Columns))
        instance = ds.get("InstanceNumber")
        groups[key].append((position, int(instance) if instance not in (None, "") else 0, str(path), str(ds.get("SOPInstanceUID", ""))))
        meta.setdefault(
            key,
            {
                "description": str(ds.get("SeriesDescription", "")),
                "orientation": tuple(float(v) for v in ds.ImageOrientationPatient),
                "spacing": tuple(float(v) for v in ds.PixelSpacing),
                "identity": {k: str(ds.get(tag, "") or "") for k, tag in _IDENTITY_TAGS.items()},
            },
        )
    stacks = []
    for key, items in groups.items():
        series_uid, _, _, rows, columns = key
        o = np.asarray(meta[key]["orientation"], float)
        normal = np.cross(o[:3], o[3:])
        items.sort(key=lambda it: (float(np.dot(it[0], normal)), it[1]))
        kept, duplicates, last = [], 0, None
        for it in items:
            d = float(np.dot(it[0], normal))
            if last is not None and abs(d - last) < _POSITION_TOL_MM:
                duplicates += 1
                continue
            kept.append(it)
            last = d
        notes = []
        if duplicates:
            notes.append(f"{duplicates} slice(s) repeat the position of another slice of series {series_uid}; the first instance at each position was used.")
        stacks.append(
            DicomSeries(
                series_uid=series_uid,
                files=[it[2] for it in kept],
                sop_instance_uids=[it[3] for it in kept],
                positions_lps_mm=np.asarray([it[0] for it in kept], float),
                orientation=meta[key]["orientation"],
                pixel_spacing_mm=meta[key]["spacing"],
                rows=rows,
                columns=columns,
                description=meta[key]["description"],
                notes=notes,
                **meta[key]["identity"],
            )
        )
    stacks.sort(key=len, reverse=True)
    return stacks, [f"{n} file(s): {reason}" for reason, n in sorted(ignored.items())]


def choose_ct_series(directory: str | os.PathLike | Sequence[str | os.PathLike], series_uid: str | None = None) -> tuple[DicomSeries, list[str]]:
    """The CT stack to read from ``directory``: the given series, else the one with most slices.

    Returns:
        ``(series, notes)``; the notes say what else was in the folder and was not used.

    Raises:
        ValueError: no CT series (the message lists what the folder holds), the
            requested series is absent, or the largest stack is too short.
    """
    stacks, ignored = scan_dicom_folder(directory)
    if series_uid is not None:
        wanted = [s for s in stacks if s.series_uid == series_uid]
        if not wanted:
            raise ValueError(
                f"Series {series_uid} is not a CT series in folder '{directory}'"
                + (f" (CT series there: {', '.join(sorted({s.series_uid for s in stacks}))})." if stacks else ".")
            )
        stacks = wanted + [s for s in stacks if s.series_uid != series_uid]
    if not stacks:
        found = "; ".join(ignored) if ignored else "no files"
        raise ValueError(
            f"No DICOM series of CT images found in folder '{directory}' ({found}). "
            "Give a folder that contains the CT's DICOM image files, or a NIfTI/NRRD/MHA file."
        )
    chosen = stacks[0]
    if len(chosen) < _MIN_SLICES:
        raise ValueError(
            f"The largest CT series in '{directory}' ({chosen.series_uid}) has only {len(chosen)} slice(s); "
            f"a chest CT volume needs at least {_MIN_SLICES}. Export the whole series from the PACS."
        )
    notes = list(chosen.notes)
    others = stacks[1:]
    if others:
        listed = ", ".join(f"{s.series_uid}{' ' + repr(s.description) if s.description else ''} ({len(s)} slices)" for s in others)
        notes.append(f"Folder holds {len(others) + 1} CT image stacks; using the largest, {chosen.series_uid} ({len(chosen)} slices). Not used: {listed}.")
    if ignored:
        notes.append("Set aside: " + "; ".join(ignored) + ".")
    return chosen, notes


def _read_pixels(series: DicomSeries) -> np.ndarray:
    """``(n, rows, columns)`` float32 in HU (rescale slope and intercept applied per file by GDCM)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns about the very spacing issues handled below
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        pydicom = _require_pydicom()
        syntaxes = set()
        for f in series.files[:: max(1, len(series.files) // 8)]:
            try:
                syntaxes.add(str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name))
            except Exception:
                pass
        raise ValueError(
            f"Cannot decode the pixel data of series {series.series_uid} (transfer syntax {', '.join(sorted(syntaxes)) or 'unknown'}): "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}. "
            "Decompress the series first (for example with gdcmconv --raw or dcmdjpeg) and try again."
        ) from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if arr.shape != (len(series), series.rows, series.columns):
        raise ValueError(f"Series {series.series_uid}: decoded {arr.shape} voxels, expected {(len(series), series.rows, series.columns)}.")
    return arr


def read_dicom_series(series: DicomSeries) -> tuple[sitk.Image, list[str]]:
    """Decode ``series`` onto a regular grid (see the module notes).

    Returns:
        ``(image, notes)``: a float32 image in HU whose direction columns are the
        row, column and normal directions, origin the first slice's position
        (LPS mm), spacing ``(column spacing, row spacing, slice step)`` mm.

    Raises:
        ValueError: undecodable pixel data, slices at one position only, or a gap
            wider than :data:`MAX_GAP_MM`.
    """
    o = np.asarray(series.orientation, float)
    row_dir, col_dir = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    normal = np.cross(row_dir, col_dir)
    dy, dx = series.pixel_spacing_mm  # DICOM: distance between rows first
    pos = series.positions_lps_mm
    d = pos @ normal
    steps = np.diff(d)
    if steps.size == 0 or float(np.median(steps)) <= 0:
        raise ValueError(f"Series {series.series_uid}: all slices lie at one position; a volume needs slices at different positions.")
    nominal = float(np.median(steps))
    notes: list[str] = []
    gaps = np.flatnonzero(steps > MAX_GAP_MM)
    if gaps.size:
        where = ", ".join(f"{d[g]:.1f} to {d[g + 1]:.1f} mm" for g in gaps[:5])
        raise ValueError(
            f"Series {series.series_uid} has a gap of {steps.max():.1f} mm between slices ({where} along the slice normal; "
            f"the series' slice step is {nominal:.2f} mm). Slices are missing: a nodule could lie entirely in the gap. "
            "Export the complete series from the PACS."
        )
    arr = _read_pixels(series)

    lateral = (pos - pos[0]) - np.outer(d - d[0], normal)
    shift_cols = lateral @ row_dir / dx  # in-plane shift of each slice, in columns
    shift_rows = lateral @ col_dir / dy  # and in rows
    if max(np.abs(shift_cols).max(), np.abs(shift_rows).max()) > _TILT_TOL_VOXELS:
        per_mm = np.linalg.norm(lateral[-1]) / max(d[-1] - d[0], 1e-6)
        notes.append(
            f"Gantry tilt of {np.degrees(np.arctan(per_mm)):.1f} degrees: slices were shifted back onto a rectangular grid "
            f"(up to {np.hypot(shift_cols, shift_rows).max():.1f} pixels)."
        )
        for s in range(arr.shape[0]):
            if abs(shift_cols[s]) <= _TILT_TOL_VOXELS and abs(shift_rows[s]) <= _TILT_TOL_VOXELS:
                continue
            sl = sitk.GetImageFromArray(arr[s])
            sl.SetSpacing((dx, dy))
            shift = sitk.TranslationTransform(2, (-float(shift_cols[s]) * dx, -float(shift_rows[s]) * dy))
            arr[s] = sitk.GetArrayFromImage(sitk.Resample(sl, sl, shift, sitk.sitkLinear, -1000.0, sitk.sitkFloat32))

    if np.abs(steps - nominal).max() > _SPACING_TOL * nominal:
        n_out = int(round((d[-1] - d[0]) / nominal)) + 1
        z = d[0] + nominal * np.arange(n_out)
        z[-1] = min(z[-1], d[-1])
        upper = np.clip(np.searchsorted(d, z, side="right"), 1, len(d) - 1)
        lower = upper - 1
        w = np.clip((z - d[lower]) / (d[upper] - d[lower]), 0.0, 1.0).astype(np.float32)
        regular = np.empty((n_out,) + arr.shape[1:], np.float32)
        for k in range(n_out):
            regular[k] = (1.0 - w[k]) * arr[lower[k]] + w[k] * arr[upper[k]]
        missing = int(sum(max(0, int(round(s / nominal)) - 1) for s in steps))
        notes.append(
            f"Non-uniform slice spacing ({steps.min():.2f}-{steps.max():.2f} mm"
            + (f", about {missing} missing slice(s)" if missing else "")
            + f"): resampled to {n_out} slices every {nominal:.2f} mm by linear interpolation."
        )
        arr = regular
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((float(dx), float(dy), nominal))
    image.SetOrigin(tuple(float(v) for v in pos[0]))
    image.SetDirection(tuple(np.column_stack([row_dir, col_dir, normal]).ravel().tolist()))
    return image, notes


def read_dicom_folder(directory: str | os.PathLike | Sequence[str | os.PathLike], series_uid: str | None = None) -> tuple[sitk.Image, DicomSeries, list[str]]:
    """Choose the CT series in ``directory`` and read it: ``(image in HU, series, notes)``."""
    series, notes = choose_ct_series(directory, series_uid)
    image, more = read_dicom_series(series)
    return image, series, notes + more

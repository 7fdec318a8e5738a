"""Reading and validating chest CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series).

All readers return a SimpleITK image in Hounsfield units (int16) with its
full geometry (spacing mm, origin LPS mm, direction cosines, oblique ones
included). Anything that is not a usable 3-D CT is refused with a
``ValueError`` that names the offending values and what to do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dicomio import DicomSeries, is_dicom_file, read_dicom_folder
from .filecheck import check_image_file
from .provenance import source_identity

__all__ = ["CTVolume", "read_ct", "validate_ct", "to_hu", "AIR_HU", "MIN_SLICES"]

log = logging.getLogger(__name__)

AIR_HU = -1000.0
"""Value that padding outside the scanner's field of view is clamped to (HU)."""
MIN_SLICES = 16
"""Fewest voxels along any axis that we accept as a CT volume."""
_MIN_SPACING_MM = 0.05
_MAX_SPACING_MM = 20.0
_PADDING_BELOW_HU = -1024.0


@dataclass
class CTVolume:
    """A CT volume as read from disk.

    Attributes:
        image: SimpleITK image, int16 HU, geometry in LPS mm.
        path: where it was read from.
        name: short name used for output files (file name without extensions,
            or the DICOM folder's name).
        series_uid: DICOM SeriesInstanceUID when read from DICOM, else ``None``.
        notes: human-readable remarks made while reading (e.g. which DICOM
            series was chosen).
        dicom: the DICOM series the image was read from (files, SOP instance
            UIDs, slice positions), ``None`` for other formats. DICOM SEG and SR
            export reference these instances.
    """

    image: sitk.Image
    path: str
    name: str
    series_uid: str | None = None
    notes: list[str] = field(default_factory=list)
    dicom: DicomSeries | None = None
    _identity: dict | None = field(default=None, repr=False, compare=False)

    def identity(self) -> dict:
        """The source identity results record (:func:`.provenance.source_identity`; computed once)."""
        if self._identity is None:
            self._identity = source_identity(self.image, self.dicom, self.series_uid)
        return self._identity


def _strip_extensions(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def read_ct(path: str | os.PathLike, validate: bool = True) -> CTVolume:
    """Read a CT volume from a file or a DICOM series folder.

    Args:
        path: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd``
            file, a folder holding a DICOM series (the largest CT series is
            used when there are several; see :mod:`.dicomio`), or one DICOM
            file of a series (its series is read from the file's folder).
        validate: refuse volumes that are not a usable CT (see
            :func:`validate_ct`).

    Returns:
        A :class:`CTVolume` whose image is int16 HU; voxels below -1024 HU
        (padding outside the field of view, e.g. -2048 or -3024) are set to
        air (-1000 HU).

    Raises:
        ValueError: the path does not exist, cannot be read, or is not a CT.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"Input '{p}' does not exist. Give the path of a CT file or DICOM folder.")
    series_uid = None
    series = None
    notes: list[str] = []
    try:
        if p.is_dir() or is_dicom_file(p):
            wanted = None
            if not p.is_dir():
                import pydicom

                wanted = str(pydicom.dcmread(str(p), stop_before_pixels=True).get("SeriesInstanceUID", "")) or None
            image, series, notes = read_dicom_folder(p if p.is_dir() else p.parent, wanted)
            series_uid = series.series_uid
            name = p.name if p.is_dir() else p.parent.name
        else:
            check_image_file(p)  # truncation, NaN and missing spacing, which ITK reads without a word
            image = sitk.ReadImage(str(p))
            name = _strip_extensions(p)
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for unreadable files
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ValueError(
            f"Cannot read '{p}' as an image: not an image, or damaged or truncated ({first_line}). "
            "Supported: NIfTI, NRRD, MHA/MHD files and DICOM series folders."
        ) from exc
    if validate:
        validate_ct(image, str(p))
    image = to_hu(image)
    return CTVolume(image=image, path=str(p), name=name, series_uid=series_uid, notes=notes, dicom=series)


def to_hu(image: sitk.Image) -> sitk.Image:
    """Cast to int16 HU and clamp field-of-view padding (below -1024 HU) to air."""
    if image.GetPixelID() == sitk.sitkInt16:  # the common case, in ITK: one output image, no numpy copies
        return sitk.Threshold(image, int(_PADDING_BELOW_HU), 32767, int(AIR_HU))
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.round(arr)
    arr = np.clip(arr, -32768, 32767).astype(np.int16, copy=False)
    arr[arr < _PADDING_BELOW_HU] = int(AIR_HU)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def validate_ct(image: sitk.Image, source: str = "input") -> None:
    """Refuse images that are not a usable 3-D CT in Hounsfield units.

    Checks: 3-D and single-component; at least :data:`MIN_SLICES` voxels along
    every axis; spacing between 0.05 and 20 mm; no NaN; intensities that look
    like HU (air or lung below -500 HU in at least 1 % of the voxels, and
    something denser than -200 HU, soft tissue or vessels, in at least 0.1 %;
    not an 8-bit, MR or rescaled image). A tight crop of the lungs, with no
    chest wall, passes.

    Raises:
        ValueError: naming the offending values and what to do.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"{source}: image is {image.GetDimension()}-D (size {list(image.GetSize())}); a 3-D CT volume is needed.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{source}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector image); "
            "a single-channel CT in Hounsfield units is needed."
        )
    size = list(image.GetSize())
    if min(size) < MIN_SLICES:
        raise ValueError(
            f"{source}: image size {size} voxels has fewer than {MIN_SLICES} voxels along an axis; "
            "a chest CT volume (not a single slice or a thin slab) is needed."
        )
    spacing = list(image.GetSpacing())
    if not all(np.isfinite(s) and _MIN_SPACING_MM <= s <= _MAX_SPACING_MM for s in spacing):
        raise ValueError(
            f"{source}: voxel spacing {spacing} mm is missing or implausible (expected {_MIN_SPACING_MM}-{_MAX_SPACING_MM} mm). "
            "Fix the image header (e.g. re-export from DICOM)."
        )
    pixel_id = image.GetPixelID()
    if pixel_id in (sitk.sitkUInt8, sitk.sitkInt8):
        raise ValueError(
            f"{source}: image is 8-bit ({image.GetPixelIDTypeAsString()}); CT in Hounsfield units needs at least 16 bits. "
            "Use the original CT, not a screenshot or a windowed export."
        )
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{source}: image contains NaN values ({int(np.isnan(arr).sum())} voxels); a CT in HU is needed.")
    # Subsample for speed: the checks are about the intensity distribution.
    sample = np.asarray(arr[::2, ::4, ::4], dtype=np.float32)
    low, high = (float(v) for v in np.percentile(sample, [1, 99.9]))
    if low > -500 or high < -200:
        raise ValueError(
            f"{source}: intensities (1st-99.9th percentile {low:.0f} to {high:.0f}) do not look like CT Hounsfield units "
            "(air near -1000 HU and soft tissue near 0-100 HU expected). Is this an MR or a rescaled image? A chest CT in HU is needed."
        )

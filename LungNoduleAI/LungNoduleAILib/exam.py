"""Per-exam findings: where each nodule lies in the lungs, emphysema, the patient's risk inputs, Brock risk and the exam's Lung-RADS category.

* Location: ``side`` from the lung mask's midline, ``zone`` the third of that lung's height
  (upper, middle, lower) the nodule's centre lies in. Thirds of the height **approximate** the
  lobes (the right middle lobe and the lingula are anterior, not a height band); a reader sets
  the lobe when it matters (Brock's "upper lobe").
* ``pleural_distance_mm``: from the nodule's centre to the nearest point outside the (closed)
  lung mask, on the mask's 2 mm grid: the costal, mediastinal and diaphragmatic pleura.
* Emphysema: LAA%-950, the share of lung voxels below -950 HU (the quantitative measure of the
  COPDGene study: Regan EA et al., COPD 2010;7:32-43), on the CT resampled to 1 mm; Brock's
  emphysema input is ``True`` at >= 5 % (:data:`EMPHYSEMA_LAA_PERCENT`), the cut-off commonly
  used for visible emphysema on inspiratory CT. The reader may override it.
* Patient inputs: from DICOM (PatientAge, else PatientBirthDate and StudyDate; PatientSex) when
  the CT is DICOM, else from the command line or the panel; each with where it came from.
  Nothing is guessed: an unknown age or sex leaves Brock ``None``.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .characterise import LUNG_RADS_CATEGORIES, brock_risk

__all__ = [
    "EMPHYSEMA_LAA_PERCENT",
    "PatientInputs",
    "patient_from_dicom",
    "LungGeometry",
    "emphysema_laa_percent",
    "exam_lung_rads",
    "apply_brock",
]

EMPHYSEMA_LAA_PERCENT = 5.0
"""LAA%-950 at or above which the exam counts as showing emphysema (Brock input)."""


@dataclass
class PatientInputs:
    """The patient's inputs to the Brock model, each with its source (``dicom``, ``command line``, ``reader``...).

    Attributes:
        age: years, or ``None`` when unknown.
        sex: ``"F"``, ``"M"`` or ``None``.
        family_history: a first-degree relative with lung cancer (``False`` unless given).
        spiculated: candidate ids the reader marked spiculated.
        sources: field name -> where its value came from.
    """

    age: float | None = None
    sex: str | None = None
    family_history: bool = False
    spiculated: list[int] = field(default_factory=list)
    sources: dict = field(default_factory=dict)

    def merged(self, other: PatientInputs) -> PatientInputs:
        """These inputs with every field ``other`` sets (and its source) taking precedence."""
        out = PatientInputs(self.age, self.sex, self.family_history, list(self.spiculated), dict(self.sources))
        for name in ("age", "sex", "family_history", "spiculated"):
            if name in other.sources:
                setattr(out, name, getattr(other, name))
                out.sources[name] = other.sources[name]
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _dicom_age(age: str) -> float | None:
    """DICOM AS ("062Y", "006M", "003W", "010D") in years."""
    if len(age) != 4 or not age[:3].isdigit() or age[3] not in "YMWD":
        return None
    return int(age[:3]) / {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}[age[3]]


def patient_from_dicom(path: str) -> PatientInputs:
    """Age and sex from one DICOM file's header: PatientAge, else PatientBirthDate and StudyDate; PatientSex."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = PatientInputs()
    age = _dicom_age(str(ds.get("PatientAge", "") or ""))
    if age is None:
        born, studied = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
        try:
            b, s = datetime.datetime.strptime(born, "%Y%m%d"), datetime.datetime.strptime(studied, "%Y%m%d")
            age = round((s - b).days / 365.25, 1)
        except ValueError:
            age = None
        source = "DICOM PatientBirthDate and StudyDate"
    else:
        source = "DICOM PatientAge"
    if age is not None:
        out.age, out.sources["age"] = age, source
    sex = str(ds.get("PatientSex", "") or "").upper()
    if sex in ("F", "M"):
        out.sex, out.sources["sex"] = sex, "DICOM PatientSex"
    return out


class LungGeometry:
    """What the lung mask says about positions: side, height third, distance to the pleura.

    Args:
        lung_mask: uint8 lung mask (1 = lung) in LPS physical space (any grid, e.g. 2 mm).
    """

    def __init__(self, lung_mask: sitk.Image):
        self.mask = sitk.Cast(lung_mask > 0, sitk.sitkUInt8)
        self.distance = sitk.SignedMaurerDistanceMap(self.mask, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
        arr = sitk.GetArrayViewFromImage(self.mask)
        ijk = np.argwhere(arr > 0)[:, ::-1].astype(np.float64)
        matrix = np.asarray(self.mask.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(self.mask.GetSpacing())
        pts = np.asarray(self.mask.GetOrigin()) + ijk @ matrix.T  # every lung voxel's centre, LPS mm
        self.midline_x = float(np.median(pts[:, 0]))
        self.extent_z = {}
        for side, sel in (("right", pts[:, 0] < self.midline_x), ("left", pts[:, 0] >= self.midline_x)):  # LPS: +x is the patient's left
            z = pts[sel, 2] if sel.any() else pts[:, 2]
            self.extent_z[side] = (float(z.min()), float(z.max()))

    def location(self, center_lps: Sequence[float]) -> dict:
        """``{"side": "left"|"right", "zone": "upper"|"middle"|"lower"}`` of a point (thirds of that lung's height)."""
        side = "right" if center_lps[0] < self.midline_x else "left"
        lo, hi = self.extent_z[side]
        f = (center_lps[2] - lo) / (hi - lo) if hi > lo else 0.5  # LPS: +z is superior
        zone = "upper" if f >= 2 / 3 else ("middle" if f >= 1 / 3 else "lower")
        return {"side": side, "zone": zone}

    def pleural_distance_mm(self, center_lps: Sequence[float]) -> float:
        """Distance (mm) from the point to the nearest voxel outside the lung mask (0 outside it)."""
        idx = self.distance.TransformPhysicalPointToIndex([float(v) for v in center_lps])
        size = self.distance.GetSize()
        if not all(0 <= i < n for i, n in zip(idx, size)):
            return 0.0
        return round(max(0.0, float(self.distance[idx])), 1)


def emphysema_laa_percent(ct_hu: sitk.Image, lung_mask: sitk.Image) -> float | None:
    """LAA%-950: the share (%) of the lung mask's voxels whose CT value is below -950 HU; ``None`` without lung voxels.

    The CT is sampled at the mask's voxel centres (nearest neighbour, no averaging that would hide
    low-attenuation voxels): on the engine's 2 mm lung mask, every eighth voxel of the 1 mm CT.
    """
    mask = sitk.GetArrayViewFromImage(lung_mask) > 0
    if not mask.any():
        return None
    sampled = sitk.Resample(ct_hu, lung_mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, ct_hu.GetPixelID())
    low = sitk.GetArrayViewFromImage(sampled)[mask] < -950
    return round(100.0 * float(low.mean()), 1)


def exam_lung_rads(candidates: Sequence) -> dict:
    """The exam's suggested category: the highest among the given candidates (``lung_rads`` attributes), with the driving one.

    Returns:
        ``{"version": "v2022", "category": "1".."4B", "candidate_id": id or None}``; category "1" and no
        candidate when there is none (no nodule).
    """
    order = {c: i for i, c in enumerate(LUNG_RADS_CATEGORIES)}
    rated = [c for c in candidates if getattr(c, "lung_rads", None) in order]
    if not rated:
        return {"version": "v2022", "category": "1", "candidate_id": None}
    top = max(rated, key=lambda c: (order[c.lung_rads], -c.rank))
    return {"version": "v2022", "category": top.lung_rads, "candidate_id": top.id}


def apply_brock(candidates: Sequence, patient: PatientInputs, emphysema: bool) -> None:
    """Set each candidate's ``brock_risk`` (``None`` when age or sex is unknown); the nodule count is the candidates'."""
    female = None if patient.sex is None else patient.sex == "F"
    for c in candidates:
        if c.type is None or c.mean_diameter_mm is None or c.mean_diameter_mm <= 0:
            c.brock_risk = None
            continue
        upper = bool(c.location and c.location.get("zone") == "upper")
        risk = brock_risk(
            c.mean_diameter_mm,
            c.type,
            patient.age,
            female,
            family_history=patient.family_history,
            emphysema=emphysema,
            upper_lobe=upper,
            nodule_count=len(candidates),
            spiculation=c.id in patient.spiculated,
        )
        c.brock_risk = None if risk is None else round(risk, 4)

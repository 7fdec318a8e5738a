"""Nodule type, guideline diameters, Lung-RADS v2022 categories and Brock risk (issue 25): every boundary, on synthetic nodules of known shape."""

from __future__ import annotations

import math

import numpy as np
import pytest

from LungNoduleAILib.characterise import (
    BROCK_COEFFICIENTS,
    axes_mm,
    brock_risk,
    characterise,
    lung_rads_category,
    mean_diameter_mm,
    nodule_type,
)


@pytest.mark.parametrize(
    "kind, mean_d, solid_d, expected",
    [
        ("calcified", 25.0, 25.0, "1"),
        ("solid", 5.9, 5.9, "2"),
        ("solid", 6.0, 6.0, "3"),
        ("solid", 7.9, 7.9, "3"),
        ("solid", 8.0, 8.0, "4A"),
        ("solid", 14.9, 14.9, "4A"),
        ("solid", 15.0, 15.0, "4B"),
        ("part-solid", 5.9, 4.0, "2"),
        ("part-solid", 6.0, 0.0, "3"),
        ("part-solid", 12.0, 5.9, "3"),
        ("part-solid", 12.0, 6.0, "4A"),
        ("part-solid", 12.0, 7.9, "4A"),
        ("part-solid", 12.0, 8.0, "4B"),
        ("non-solid", 29.9, 0.0, "2"),
        ("non-solid", 30.0, 0.0, "3"),
    ],
)
def test_lung_rads_v2022_baseline_boundaries(kind, mean_d, solid_d, expected):
    assert lung_rads_category(kind, mean_d, solid_d) == expected


def test_lung_rads_refuses_what_it_cannot_categorise():
    with pytest.raises(ValueError, match="Unknown nodule type 'ground-glass'"):
        lung_rads_category("ground-glass", 10.0)
    with pytest.raises(ValueError, match="must be >= 0 mm"):
        lung_rads_category("solid", -1.0)


def test_mean_diameter_rounds_axes_then_mean_to_one_decimal():
    assert mean_diameter_mm(6.04, 5.96) == 6.0  # 6.0 and 6.0
    assert mean_diameter_mm(6.25, 5.64) == 5.9  # (6.2 or 6.3) + 5.6 -> 5.9 or 6.0, as Lung-RADS rounds each axis first
    assert mean_diameter_mm(10.0, 7.0) == 8.5


def _ellipsoid(a_mm, b_mm, c_mm, spacing=(0.5, 0.5, 0.5), size=80):
    """Mask ``(z, y, x)`` of an ellipsoid with semi-axes a (x), b (y), c (z) mm."""
    sx, sy, sz = spacing
    z, y, x = np.indices((size, size, size)).astype(float)
    z, y, x = (z - size / 2) * sz, (y - size / 2) * sy, (x - size / 2) * sx
    return (x / a_mm) ** 2 + (y / b_mm) ** 2 + (z / c_mm) ** 2 <= 1.0


def test_axes_of_an_ellipsoid_in_the_plane_where_it_is_longest():
    """Long axis 2a, short axis 2b on the axial slice through the centre (within a voxel)."""
    long_axis, short_axis = axes_mm(_ellipsoid(8.0, 5.0, 3.0), (0.5, 0.5, 0.5))
    assert long_axis == pytest.approx(16.0, abs=0.6) and short_axis == pytest.approx(10.0, abs=0.6)
    # the longest extent along z: the guideline's "any plane" picks a coronal or sagittal image
    long_axis, short_axis = axes_mm(_ellipsoid(3.0, 4.0, 9.0), (0.5, 0.5, 0.5))
    assert long_axis == pytest.approx(18.0, abs=0.6) and short_axis == pytest.approx(8.0, abs=0.6)
    assert axes_mm(np.zeros((3, 3, 3), bool), (1, 1, 1)) == (0.0, 0.0)


def _nodule(core_hu, shell_hu, core_radius_mm, radius_mm=6.0, calc_voxels=0, layer=None):
    """A sphere of ``shell_hu`` with a central sphere of ``core_hu``; ``layer`` = (outer radius mm, HU) of a shell around the core."""
    mask = _ellipsoid(radius_mm, radius_mm, radius_mm)
    core = _ellipsoid(core_radius_mm, core_radius_mm, core_radius_mm) if core_radius_mm > 0 else np.zeros_like(mask)
    hu = np.full(mask.shape, -850.0)
    hu[mask] = shell_hu
    if layer is not None:
        hu[_ellipsoid(layer[0], layer[0], layer[0])] = layer[1]
    hu[core] = core_hu
    if calc_voxels:
        idx = np.argwhere(mask)[:calc_voxels]
        hu[tuple(idx.T)] = 600.0
    return mask, hu


def test_nodule_type_from_hu():
    mask, hu = _nodule(core_hu=20.0, shell_hu=20.0, core_radius_mm=0)
    assert nodule_type(hu[mask]) == "solid"
    mask, hu = _nodule(core_hu=-600.0, shell_hu=-600.0, core_radius_mm=0)
    assert nodule_type(hu[mask]) == "non-solid"
    # a 12 mm ground-glass nodule with a 4.4 mm solid core (5 % of it) in a denser halo (-350 HU, 8 %): the densest tenth is not ground glass
    mask, hu = _nodule(core_hu=0.0, shell_hu=-600.0, core_radius_mm=2.2, layer=(3.0, -350.0))
    assert nodule_type(hu[mask]) == "part-solid"
    mask, hu = _nodule(core_hu=0.0, shell_hu=-600.0, core_radius_mm=2.0)  # a solid core without a halo, 4 % of the nodule: ground glass to the readers' eye
    assert nodule_type(hu[mask]) == "non-solid"
    values = np.r_[np.full(85, -600.0), np.full(10, -350.0), np.full(5, 0.0)]  # the rule as documented, on bare numbers
    assert nodule_type(values) == "part-solid" and nodule_type(np.r_[values, np.full(10, 0.0)]) == "solid"
    mask, hu = _nodule(core_hu=20.0, shell_hu=20.0, core_radius_mm=0, calc_voxels=int(0.1 * _ellipsoid(6, 6, 6).sum()))
    assert nodule_type(hu[mask]) == "calcified"
    with pytest.raises(ValueError, match="the mask is empty"):
        nodule_type(np.array([]))


def test_characterise_gives_the_json_fields():
    mask, hu = _nodule(core_hu=0.0, shell_hu=-600.0, core_radius_mm=2.2, layer=(3.0, -350.0))
    c = characterise(mask, hu, (0.5, 0.5, 0.5))
    assert set(c) == {
        "type",
        "long_axis_mm",
        "short_axis_mm",
        "mean_diameter_mm",
        "solid_component_mean_diameter_mm",
        "solid_component_volume_mm3",
        "lung_rads",
    }
    assert c["type"] == "part-solid" and c["mean_diameter_mm"] == pytest.approx(12.0, abs=0.6)
    assert c["solid_component_mean_diameter_mm"] == pytest.approx(4.4, abs=0.6) and c["lung_rads"] == "3"  # >= 6 mm total, solid < 6 mm
    assert c["solid_component_volume_mm3"] == pytest.approx(4 / 3 * math.pi * 2.2**3, rel=0.15)
    solid = characterise(*_nodule(20.0, 20.0, 0, radius_mm=4.5), (0.5, 0.5, 0.5))
    assert solid["type"] == "solid" and solid["solid_component_mean_diameter_mm"] == solid["mean_diameter_mm"] and solid["lung_rads"] == "4A"
    ggn = characterise(*_nodule(-600.0, -600.0, 0), (0.5, 0.5, 0.5))
    assert ggn["type"] == "non-solid" and ggn["solid_component_mean_diameter_mm"] == 0.0 and ggn["lung_rads"] == "2"


def test_brock_risk():
    # the model's reference nodule (age 62, male, 4 mm solid, lower lobe, 4 nodules, nothing else): the intercept alone
    p = brock_risk(4.0, "solid", age=62, female=False, nodule_count=4)
    assert p == pytest.approx(1 / (1 + math.exp(6.7892)), rel=1e-4)
    # one hand-computed case with every term: 70-year-old woman, family history, emphysema, 15 mm part-solid spiculated upper-lobe nodule, 2 nodules
    c = BROCK_COEFFICIENTS
    logit = -6.7892 + 0.0287 * 8 + 0.6011 + 0.2961 + 0.2953 - 5.3854 * ((15 / 10) ** -0.5 - 1.58113883) + 0.377 + 0.6581 - 0.0824 * (2 - 4) + 0.7729
    assert c["intercept"] == -6.7892 and c["spiculation"] == 0.7729
    kw = dict(age=70, female=True, family_history=True, emphysema=True, upper_lobe=True, nodule_count=2, spiculation=True)
    assert brock_risk(15.0, "part-solid", **kw) == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-9)
    assert brock_risk(15.0, "non-solid", **kw) < brock_risk(15.0, "solid", **kw) < brock_risk(15.0, "part-solid", **kw)
    assert brock_risk(20.0, "solid", age=62, female=False) > brock_risk(5.0, "solid", age=62, female=False)
    # never guessed
    assert brock_risk(10.0, "solid", age=None, female=True) is None
    assert brock_risk(10.0, "solid", age=60, female=None) is None
    assert brock_risk(10.0, "calcified", age=60, female=True) is None


def test_exam_lung_rads_is_the_highest_category_with_its_nodule():
    from types import SimpleNamespace

    from LungNoduleAILib.exam import exam_lung_rads

    cands = [SimpleNamespace(id=i, rank=i, lung_rads=cat) for i, cat in enumerate(["2", "4A", "3", "4A", "1"], start=1)]
    assert exam_lung_rads(cands) == {"version": "v2022", "category": "4A", "candidate_id": 2}  # the higher-ranked of the two 4A
    assert exam_lung_rads([]) == {"version": "v2022", "category": "1", "candidate_id": None}


def _two_lungs():
    """A 2 mm lung mask in LPS: right lung x < 0 (the patient's right), left lung x > 0, 20-260 mm high."""
    import SimpleITK as sitk

    arr = np.zeros((130, 100, 160), np.uint8)  # z, y, x
    arr[10:130, 20:80, 10:70] = 1  # right lung (low x)
    arr[10:130, 20:80, 90:150] = 1  # left lung
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetOrigin((-160.0, -100.0, 0.0))
    return img


def test_lung_geometry_side_zone_and_pleural_distance():
    from LungNoduleAILib.exam import LungGeometry

    g = LungGeometry(_two_lungs())
    # right lung spans z 20-258 mm: thirds at about 99 and 179 mm
    assert g.location([-100.0, 0.0, 240.0]) == {"side": "right", "zone": "upper"}
    assert g.location([-100.0, 0.0, 130.0]) == {"side": "right", "zone": "middle"}
    assert g.location([60.0, 0.0, 40.0]) == {"side": "left", "zone": "lower"}
    assert g.pleural_distance_mm([-100.0, 0.0, 130.0]) == pytest.approx(40.0, abs=2.5)  # 20 voxels (40 mm) from the lung's side wall in x
    assert g.pleural_distance_mm([-139.0, 0.0, 130.0]) <= 2.5  # against the chest wall
    assert g.pleural_distance_mm([0.0, 0.0, 130.0]) == 0.0  # mediastinum: outside the lung


def test_emphysema_laa950():
    import SimpleITK as sitk

    from LungNoduleAILib.exam import emphysema_laa_percent

    lungs = _two_lungs()
    hu = np.full(sitk.GetArrayViewFromImage(lungs).shape, -850, np.int16)
    hu[:13] = -980  # the lowest slices: 3 of the 120 lung slices (2.5 %) of emphysema-like voxels
    ct = sitk.GetImageFromArray(hu)
    ct.CopyInformation(lungs)
    assert emphysema_laa_percent(ct, lungs) == pytest.approx(2.5, abs=0.1)
    assert emphysema_laa_percent(ct, lungs * 0) is None


def test_patient_inputs_from_dicom_and_what_the_caller_gives(tmp_path):
    import SimpleITK as sitk

    from dicom_series import write_ct_series
    from LungNoduleAILib.exam import PatientInputs, patient_from_dicom

    img = sitk.GetImageFromArray(np.full((3, 8, 8), -800, np.int16))
    files = write_ct_series(img, tmp_path / "a", patient={"PatientID": "P1", "PatientAge": "067Y", "PatientSex": "F"})["files"]
    p = patient_from_dicom(str(files[0]))
    assert (p.age, p.sex) == (67.0, "F") and p.sources == {"age": "DICOM PatientAge", "sex": "DICOM PatientSex"}
    files = write_ct_series(img, tmp_path / "b", patient={"PatientID": "P2", "PatientBirthDate": "19570102", "PatientSex": "O"})["files"]
    p = patient_from_dicom(str(files[0]))
    assert p.age == pytest.approx(67.0, abs=0.1) and p.sources["age"] == "DICOM PatientBirthDate and StudyDate" and p.sex is None  # "O": not guessed
    given = PatientInputs(sex="M", family_history=True, sources={"sex": "command line", "family_history": "command line"})
    merged = p.merged(given)
    assert (merged.age, merged.sex, merged.family_history) == (p.age, "M", True) and merged.sources["sex"] == "command line"

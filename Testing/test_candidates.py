"""Candidate extraction and measurements against analytically known spheres."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_direction
from LungNoduleAILib.candidates import extract_candidates, longest_axial_diameter_mm
from LungNoduleAILib.geometry import lps_to_ras, ras_to_lps

SPACING = (0.7, 0.7, 1.25)


def _spheres(specs, size=(160, 160, 100), spacing=SPACING, direction=None):
    """Probability image with balls of given (centre index, radius mm, peak p) and a CT with 40 HU inside."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin((-50.0, 20.0, -100.0))
    if direction:
        img.SetDirection(direction)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij")
    prob = np.zeros(tuple(reversed(size)), np.float32)
    ct = np.full(prob.shape, -850.0, np.float32)
    for centre, radius, peak in specs:
        d = np.sqrt(((xx - centre[0]) * spacing[0]) ** 2 + ((yy - centre[1]) * spacing[1]) ** 2 + ((zz - centre[2]) * spacing[2]) ** 2)
        inside = d <= radius
        prob[inside] = np.maximum(prob[inside], peak * (1 - 0.5 * d[inside] / radius))
        ct[inside] = 40.0
    p = sitk.GetImageFromArray(prob)
    p.CopyInformation(img)
    c = sitk.GetImageFromArray(ct)
    c.CopyInformation(img)
    return p, c


@pytest.mark.parametrize("direction", [None, oblique_direction()])
def test_sphere_measurements(direction):
    specs = [((40, 40, 30), 3.0, 0.7), ((110, 60, 50), 5.0, 0.95), ((70, 120, 60), 10.0, 0.8)]
    prob, ct = _spheres(specs, direction=direction)
    # threshold 0.3 keeps voxels with d <= radius*(1-0.3/peak)/0.5 ... i.e. the whole ball for every peak >= 0.6
    labelmap, cands = extract_candidates(prob, ct, threshold=0.3)
    assert [round(c.probability, 2) for c in cands] == [0.95, 0.8, 0.7]  # ranked by probability
    assert [c.rank for c in cands] == [1, 2, 3] and [c.id for c in cands] == [1, 2, 3]
    voxel = math.prod(SPACING)
    for c, (centre, radius, _) in zip(cands, [specs[1], specs[2], specs[0]]):
        true_volume = 4.0 / 3.0 * math.pi * radius**3
        surface = 4 * math.pi * radius**2
        assert abs(c.volume_mm3 - true_volume) <= 0.5 * surface * max(SPACING) + voxel  # within half a voxel layer
        assert abs(c.diameter_mm - 2 * radius) <= max(SPACING)
        assert abs(c.longest_axial_diameter_mm - 2 * radius) <= 2 * SPACING[0]
        expected_lps = prob.TransformIndexToPhysicalPoint(centre)
        np.testing.assert_allclose(c.center_lps_mm, expected_lps, atol=0.01)
        np.testing.assert_allclose(c.center_ras_mm, lps_to_ras(expected_lps), atol=0.01)
        np.testing.assert_allclose(c.center_ijk, centre, atol=0.01)
        assert c.mean_hu == pytest.approx(40.0)
        # the labelmap holds the candidate under its rank at its centre voxel
        assert labelmap[centre] == c.rank
    assert labelmap.GetSize() == prob.GetSize() and labelmap.GetDirection() == prob.GetDirection()


def test_min_volume_threshold_and_limits():
    prob, ct = _spheres([((40, 40, 30), 1.0, 0.9), ((110, 60, 50), 5.0, 0.8)])
    labelmap, cands = extract_candidates(prob, ct, 0.3, min_volume_mm3=20.0)
    assert len(cands) == 1
    # its probability is the highest that a core of 20 mm3 reaches: the 33rd highest voxel (20 / 0.6125 mm3)
    inside = np.sort(sitk.GetArrayViewFromImage(prob)[sitk.GetArrayViewFromImage(labelmap) == 1])[::-1]
    assert cands[0].probability == pytest.approx(float(inside[32])) and 0.6 < cands[0].probability < 0.7
    assert float(inside[0]) == pytest.approx(0.8)  # the maximum, one voxel
    _, none = extract_candidates(prob, ct, 0.95)
    assert none == []
    with pytest.raises(ValueError, match="outside"):
        extract_candidates(prob, ct, 1.5)


def test_segment_threshold_draws_the_candidate_at_its_own_extent():
    """Candidates are decided at the threshold, their voxels are their region of p >= segment_threshold."""
    a, b = ((40, 40, 30), 5.0, 0.99), ((110, 60, 50), 5.0, 0.9)  # b never reaches 0.97
    prob, ct = _spheres([a, b])
    _, core = extract_candidates(prob, ct, 0.97)
    _, drawn = extract_candidates(prob, ct, 0.97, segment_threshold=0.5)
    assert len(core) == len(drawn) == 1 and drawn[0].probability == pytest.approx(core[0].probability)
    ball = 4.0 / 3.0 * math.pi * (0.99 * 5.0) ** 3  # p >= 0.5 within 0.99 of the radius
    assert core[0].volume_mm3 < 0.1 * ball and abs(drawn[0].volume_mm3 - ball) < 0.25 * ball
    np.testing.assert_allclose(drawn[0].center_ijk, a[0], atol=0.05)
    _, same = extract_candidates(prob, ct, 0.97, segment_threshold=0.99)  # not below the threshold: the core
    assert [c.volume_mm3 for c in same] == [core[0].volume_mm3]
    # the minimum volume applies to the core: a big region around a tiny core is no candidate
    assert extract_candidates(prob, ct, 0.97, min_volume_mm3=20.0, segment_threshold=0.5)[1] == []
    # two cores in one region make one candidate with the higher probability
    prob2, ct2 = _spheres([a, ((52, 40, 30), 5.0, 0.98)])
    labelmap, merged = extract_candidates(prob2, ct2, 0.97, segment_threshold=0.5)
    assert len(extract_candidates(prob2, ct2, 0.97)[1]) == 2 and len(merged) == 1
    assert merged[0].probability == pytest.approx(0.99, abs=1e-3) and labelmap[(46, 40, 30)] == 1


def test_a_candidate_listed_at_p_is_kept_by_a_run_at_p():
    """A lone voxel above the rest does not lift a candidate: its probability is what a core of the
    smallest candidate volume reaches, so raising the threshold to a listed p keeps that candidate."""
    specs = [((40, 40, 30), 4.0, 0.95), ((110, 60, 50), 5.0, 0.8), ((70, 120, 60), 6.0, 0.7), ((120, 130, 20), 3.0, 0.92)]
    prob, ct = _spheres(specs)
    arr = sitk.GetArrayFromImage(prob)
    for (i, j, k), _, _ in specs[1:3]:
        arr[k, j, i] = 0.99  # one spiky voxel at the centre of two balls
    spiky = sitk.GetImageFromArray(arr)
    spiky.CopyInformation(prob)
    _, low = extract_candidates(spiky, ct, 0.5, 5.0, segment_threshold=0.5)
    assert len(low) == 4
    assert all(c.probability < 0.99 for c in low)  # no candidate scored by its spike
    for t in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93):
        _, at_t = extract_candidates(spiky, ct, t, 5.0, segment_threshold=0.5)
        listed = sorted(tuple(c.center_ijk) for c in low if c.probability >= t)
        assert sorted(tuple(c.center_ijk) for c in at_t) == listed, t
    # with min_volume_mm3 = 0 the probability is the maximum voxel, spike included
    _, peaks = extract_candidates(spiky, ct, 0.5, 0.0, segment_threshold=0.5)
    assert sorted(round(c.probability, 2) for c in peaks) == [0.92, 0.95, 0.99, 0.99]


def _dumbbell(radii_mm, gap_mm, neck_mm, peaks=(1.0, 1.0), spacing=SPACING, size=(120, 90, 60)):
    """Two balls (radii mm, peak p) whose centres lie ``gap_mm`` apart along x, joined by a rod of radius
    ``neck_mm`` at p 0.6 (part of the region, no core); returns (probability, ct, centres in LPS mm)."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin((-40.0, -30.0, -35.0))
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s + o for n, s, o in zip(reversed(size), reversed(spacing), reversed(img.GetOrigin()))], indexing="ij")
    centres = [(-gap_mm / 2, 0.0, 0.0), (gap_mm / 2, 0.0, 0.0)]
    prob = np.zeros(tuple(reversed(size)), np.float32)
    ct = np.full(prob.shape, -850.0, np.float32)
    rod = (np.abs(xx) <= gap_mm / 2) & (yy**2 + zz**2 <= neck_mm**2)
    prob[rod] = 0.6
    for (cx, cy, cz), r, peak in zip(centres, radii_mm, peaks):
        ball = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= r**2
        prob[ball] = peak
    ct[prob > 0] = 40.0
    p, c = sitk.GetImageFromArray(prob), sitk.GetImageFromArray(ct)
    p.CopyInformation(img)
    c.CopyInformation(img)
    return p, c, centres


def test_a_small_nodule_touching_a_vessel_is_split_off_at_the_neck():
    """split_depth_mm: two blobs joined by a thin neck become two candidates centred on each blob, with no voxel lost."""
    prob, ct, (a, b) = _dumbbell((2.5, 3.5), 8.0, 1.0)
    _, whole = extract_candidates(prob, ct, 0.97, 5.0, segment_threshold=0.5)
    assert len(whole) == 1 and np.linalg.norm(np.subtract(whole[0].center_lps_mm, a)) > 2.5  # centre between the blobs: a 5 mm nodule missed
    labelmap, split = extract_candidates(prob, ct, 0.97, 5.0, segment_threshold=0.5, split_depth_mm=0.5)
    assert len(split) == 2
    for c in split:
        assert min(np.linalg.norm(np.subtract(c.center_lps_mm, x)) for x in (a, b)) < 0.6
    assert sum(c.voxels for c in split) == whole[0].voxels == int((sitk.GetArrayViewFromImage(labelmap) > 0).sum())
    assert sorted(np.unique(sitk.GetArrayViewFromImage(labelmap)).tolist()) == [0, 1, 2]
    # the same without a segment threshold (parts of the cores)
    assert len(extract_candidates(prob, ct, 0.97, 5.0, split_depth_mm=0.5)[1]) == 2
    # a blob without its own core above the threshold stays part of its neighbour
    faint, ct2, _ = _dumbbell((2.5, 3.5), 8.0, 1.0, peaks=(1.0, 0.9))
    _, one = extract_candidates(faint, ct2, 0.97, 5.0, segment_threshold=0.5, split_depth_mm=0.5)
    assert len(one) == 1 and one[0].voxels == int((sitk.GetArrayViewFromImage(faint) >= 0.5).sum())
    # a neck less than split_depth_mm thinner than the smaller blob is no neck
    thick, ct3, _ = _dumbbell((2.5, 3.5), 8.0, 1.8)
    assert len(extract_candidates(thick, ct3, 0.97, 5.0, segment_threshold=0.5, split_depth_mm=0.5)[1]) == 1
    assert len(extract_candidates(thick, ct3, 0.97, 5.0, segment_threshold=0.5, split_depth_mm=0.1)[1]) == 2
    # a region of 10 mm equivalent diameter or more stays one candidate however it is shaped
    mass, ct4, _ = _dumbbell((8.0, 9.0), 19.0, 2.0)
    assert len(extract_candidates(mass, ct4, 0.97, 5.0, segment_threshold=0.5, split_depth_mm=0.5)[1]) == 1
    assert len(extract_candidates(mass, ct4, 0.97, 5.0, segment_threshold=0.5)[1]) == 1


def test_longest_axial_diameter_of_a_rectangle():
    mask = np.zeros((3, 20, 30), bool)
    mask[1, 5:9, 3:23] = True  # 20 x 4 voxels at 0.5 x 1.0 mm -> diagonal of 10 mm x 4 mm
    d = longest_axial_diameter_mm(mask, (0.5, 1.0))
    assert d == pytest.approx(math.hypot(9.5, 3.0) + 0.5 * (9.5 / math.hypot(9.5, 3)) + 1.0 * (3 / math.hypot(9.5, 3)), rel=1e-6)
    assert 10.0 <= d <= math.hypot(10, 4) + 0.01


def test_lps_ras_round_trip():
    p = [12.5, -3.0, 40.0]
    assert lps_to_ras(p) == [-12.5, 3.0, 40.0]
    assert ras_to_lps(lps_to_ras(p)) == p


def test_ijk_to_ras_matrix_round_trip():
    import SimpleITK as sitk

    from LungNoduleAILib.geometry import geometry_from_ijk_to_ras, ijk_to_ras_matrix

    img = sitk.Image(8, 9, 10, sitk.sitkInt16)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(oblique_direction())
    m = ijk_to_ras_matrix(img)
    ijk = np.array([3.0, 4.0, 5.0, 1.0])
    np.testing.assert_allclose((m @ ijk)[:3], lps_to_ras(img.TransformContinuousIndexToPhysicalPoint(ijk[:3].tolist())), atol=1e-9)
    origin, spacing, direction = geometry_from_ijk_to_ras(m)
    np.testing.assert_allclose(origin, img.GetOrigin())
    np.testing.assert_allclose(spacing, img.GetSpacing())
    np.testing.assert_allclose(direction, img.GetDirection(), atol=1e-12)


def test_rescorer_fits_scores_and_reranks():
    from LungNoduleAILib.rescore import FEATURES, apply_rescorer, candidate_features, fit_rescorer

    # three spheres: the largest is "the nodule"; teach the rescorer that big, dense candidates are real
    prob, ct = _spheres([((40, 40, 30), 3.0, 0.95), ((110, 60, 50), 6.0, 0.7), ((70, 120, 60), 10.0, 0.6)])
    labelmap, cands = extract_candidates(prob, ct, threshold=0.3)
    feats = candidate_features(cands, labelmap, ct, prob)
    assert feats.shape == (3, len(FEATURES)) and np.isfinite(feats).all()
    i_vol = FEATURES.index("log_volume_mm3")
    assert feats[:, i_vol].argmax() == [c.diameter_mm for c in cands].index(max(c.diameter_mm for c in cands))
    X = np.concatenate([feats, feats + np.random.default_rng(0).normal(0, 0.01, feats.shape)])
    y = np.array([0, 1, 1, 0, 1, 1])  # the smallest (highest probability) candidate is false
    rescorer = fit_rescorer(X, y)
    rescorer["threshold"] = 0.5
    relabeled, kept = apply_rescorer(rescorer, cands, labelmap, ct, prob)
    assert len(kept) == 2 and all(c.score >= 0.5 for c in kept)
    assert [c.rank for c in kept] == [1, 2] and kept[0].score >= kept[1].score
    assert set(np.unique(sitk.GetArrayFromImage(relabeled))) == {0, 1, 2}
    assert all(c.diameter_mm > 8 for c in kept)

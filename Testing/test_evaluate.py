"""LUNA16 matching rules, FROC/CPM and the evaluate command on hand-made cases with known answers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from LungNoduleAILib.evaluate import Finding, evaluate, froc, match_scan

NODULE = Finding((0.0, 0.0, 0.0), 10.0)  # radius 5 mm


def cand(x, p):
    return {"center_lps_mm": [x, 0.0, 0.0], "probability": p}


def test_hit_is_within_the_radius():
    s = match_scan("a", [cand(4.9, 0.9), cand(5.1, 0.8)], [NODULE])
    assert s.tp_probs == [0.9] and s.fp_probs == [0.8]


def test_several_hits_count_once_with_the_highest_probability():
    s = match_scan("a", [cand(1, 0.6), cand(-2, 0.95), cand(3, 0.7)], [NODULE])
    assert s.tp_probs == [0.95] and s.fp_probs == []


def test_candidates_on_excluded_findings_are_ignored():
    excluded = [Finding((20.0, 0.0, 0.0), 4.0)]
    s = match_scan("a", [cand(21, 0.9), cand(30, 0.5)], [NODULE], excluded)
    assert s.tp_probs == [] and s.fp_probs == [0.5] and s.n_nodules == 1


def test_a_hit_on_a_nodule_wins_over_an_overlapping_exclusion():
    s = match_scan("a", [cand(0, 0.9)], [NODULE], [Finding((0.0, 0.0, 0.0), 30.0)])
    assert s.tp_probs == [0.9]


def test_froc_and_cpm_known_answer():
    # 4 scans, 4 nodules; found at p 0.9, 0.8, 0.3; missed one; FPs at 0.85, 0.5, 0.2, 0.1
    scans = [
        match_scan("1", [cand(0, 0.9), cand(40, 0.85)], [NODULE]),
        match_scan("2", [cand(0, 0.8), cand(40, 0.5)], [NODULE]),
        match_scan("3", [cand(0, 0.3), cand(40, 0.2)], [NODULE]),
        match_scan("4", [cand(40, 0.1)], [NODULE]),
    ]
    fps, sens, cpm = froc(scans)
    # threshold 0.9: 1 TP, 0 FP; 0.85: 1 TP, 1 FP (0.25/scan); 0.8: 2 TP, 1 FP; 0.5: 2 TP, 2 FP (0.5/scan);
    # 0.3: 3 TP, 2 FP; 0.2: 3 TP, 3 FP (0.75); 0.1: 3 TP, 4 FP (1/scan)
    at = {r: float(np.interp(r, fps[::-1], sens[::-1])) for r in (0.125, 0.25, 0.5, 1, 2, 4, 8)}
    assert at[0.25] == pytest.approx(0.5)
    assert at[0.5] == pytest.approx(0.75)
    assert at[1] == pytest.approx(0.75)
    assert at[8] == pytest.approx(0.75)
    assert cpm == pytest.approx(np.mean(list(at.values())))
    ev = evaluate(scans, threshold=0.5, bootstrap=200)
    op = ev.operating_point
    assert op["sensitivity"] == 0.5 and op["fp_per_scan"] == 0.5 and op["missed"] == 2
    assert op["precision"] == pytest.approx(0.5) and op["recall"] == pytest.approx(0.5)
    assert ev.cpm_ci95[0] <= ev.cpm <= ev.cpm_ci95[1]


def test_no_nodules_is_refused():
    with pytest.raises(ValueError, match="No reference nodules"):
        froc([match_scan("a", [cand(0, 0.5)], [])])


def _result(path, name, candidates, series_uid=None, size=(50, 50, 50), origin=(-24.5, -24.5, -24.5)):
    report = {
        "input": {
            "name": name,
            "series_uid": series_uid,
            "size_ijk": list(size),
            "spacing_mm": [1.0, 1.0, 1.0],
            "origin_lps_mm": list(origin),
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
        },
        "threshold": 0.5,
        "candidates": candidates,
    }
    path.write_text(json.dumps(report))


def test_evaluate_command_with_references_and_series_map(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _result(res / "caseA_nodules.json", "caseA", [cand(0, 0.9), cand(50, 0.7)])
    _result(res / "x_nodules.json", "x", [cand(100, 0.6)], series_uid="1.2.3")
    (tmp_path / "ann.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n9.9.9,0,0,0,10\n1.2.3,100,0,0,8\n")
    (tmp_path / "excl.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n9.9.9,50,0,0,6\n")
    (tmp_path / "map.csv").write_text("case,seriesuid\ncaseA,9.9.9\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "LungNoduleAILib.cli",
            "evaluate",
            str(res),
            "--annotations",
            str(tmp_path / "ann.csv"),
            "--excluded",
            str(tmp_path / "excl.csv"),
            "--series-map",
            str(tmp_path / "map.csv"),
            "--output-dir",
            str(tmp_path / "eval"),
            "--bootstrap",
            "50",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["nodules"] == 2 and report["operating_point"]["sensitivity"] == 1.0
    assert report["operating_point"]["false_positives"] == 0  # the 0.7 candidate sits on an excluded finding
    assert report["cpm"] == pytest.approx(1.0)
    assert (tmp_path / "eval" / "froc.png").stat().st_size > 5000


def test_evaluate_cube_mode(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _result(res / "c1_nodules.json", "uid1_dcm_0", [cand(0.5, 0.9), cand(20, 0.6)])  # hit + one FP
    _result(res / "c2_nodules.json", "uid2_dcm_0", [cand(15, 0.8)])  # miss (radius 3) + FP
    (tmp_path / "cubes.csv").write_text("image,mask,seriesuid,diameter_mm\nuid1_dcm_0.mha,uid1_seg_0.mha,uid1,8\nuid2_dcm_0.mha,uid2_seg_0.mha,uid2,6\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "LungNoduleAILib.cli",
            "evaluate",
            str(res),
            "--cubes",
            str(tmp_path / "cubes.csv"),
            "--output-dir",
            str(tmp_path / "eval"),
            "--bootstrap",
            "20",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["scans"] == 2 and report["nodules"] == 2
    assert report["operating_point"] == {**report["operating_point"], "sensitivity": 0.5, "fp_per_scan": 1.0}


def test_cube_mode_ignores_a_neighbouring_nodule_of_the_same_series(tmp_path):
    """Two cubes of one series 15 mm apart: a candidate on the neighbour's nodule is no false positive; in another series it is."""
    res = tmp_path / "results"
    res.mkdir()
    _result(res / "a_nodules.json", "s1_dcm_0", [cand(0, 0.9), cand(15, 0.8)], origin=(-24.5, -24.5, -24.5))  # own nodule + the neighbour's
    _result(res / "b_nodules.json", "s1_dcm_1", [cand(15, 0.9)], origin=(-9.5, -24.5, -24.5))  # centred at x = 15
    _result(res / "c_nodules.json", "s2_dcm_0", [cand(0, 0.9), cand(15, 0.8)], origin=(-24.5, -24.5, -24.5))  # same layout, alone in its series
    csv_path = tmp_path / "cubes.csv"
    csv_path.write_text("image,mask,seriesuid,diameter_mm\ns1_dcm_0.mha,s1_seg_0.mha,s1,6\ns1_dcm_1.mha,s1_seg_1.mha,s1,6\ns2_dcm_0.mha,s2_seg_0.mha,s2,6\n")
    from LungNoduleAILib.evaluate import read_results, scans_from_cubes

    scans, _ = scans_from_cubes(read_results([res]), csv_path)
    by_name = {s.name: s for s in scans}
    assert by_name["s1_dcm_0"].fp_probs == [] and by_name["s1_dcm_0"].tp_probs == [0.9]
    assert by_name["s1_dcm_1"].tp_probs == [0.9]
    assert by_name["s2_dcm_0"].fp_probs == [0.8]


def test_excluded_findings_from_the_lidc_xml_follow_luna16():
    import SimpleITK as sitk

    from conftest import LIDC0001_NODULE_DIAMETER_MM, LIDC0001_NODULE_LPS, shared
    from LungNoduleAILib.evaluate import lidc_excluded_findings, lidc_reader_marks

    xml = shared("scans", "LIDC-IDRI-0001.xml")
    image = sitk.ReadImage(str(shared("scans", "LIDC-IDRI-0001.nii.gz")))
    marks = lidc_reader_marks(xml, image)
    outlined = [m for m in marks if m.kind == "nodule"]
    # the reference nodule was outlined by all 4 readers, each centre within its radius
    assert len(outlined) == 4
    for m in outlined:
        assert np.linalg.norm(np.subtract(m.center_mm, LIDC0001_NODULE_LPS)) < LIDC0001_NODULE_DIAMETER_MM / 2
        assert 20.0 < m.diameter_mm < 40.0
    reference = Finding(LIDC0001_NODULE_LPS, LIDC0001_NODULE_DIAMETER_MM)
    excluded = lidc_excluded_findings(marks, [reference])
    assert len(excluded) == len(marks) - 4  # every other mark: small nodules and non-nodules
    assert all(f.diameter_mm == 10.0 for f in excluded)  # LUNA16's size for marks without one
    # a candidate on a non-nodule mark is ignored, one far from every mark is a false positive
    on_mark = {"center_lps_mm": list(excluded[0].center_mm), "probability": 0.9}
    far = {"center_lps_mm": [0.0, 0.0, 0.0], "probability": 0.9}
    result = match_scan("0001", [on_mark, far], [reference], excluded)
    assert result.fp_probs == [0.9] and result.tp_probs == []


def test_excluded_csv_without_a_size_counts_as_10_mm(tmp_path):
    from LungNoduleAILib.evaluate import read_reference_csv

    path = tmp_path / "excluded.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1,2,3,-1\n", encoding="utf-8")
    assert read_reference_csv(path)["1.2.3"][0].diameter_mm == 10.0


LUNA_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("csv_as_result", "is not JSON"),
        ("json_not_a_result", "not a detection result"),
        ("missing_result", "does not exist"),
        ("same_scan_twice", "are both for '1.2.3'"),
        ("coordinate_not_a_number", "line 2: coordX, coordY, coordZ and diameter_mm must be numbers"),
        ("no_result_matches", "series map"),
        ("cubes_csv_without_diameter", "lacks column(s) ['diameter_mm']"),
    ],
)
def test_bad_evaluation_input_is_refused_with_what_to_do(tmp_path, case, message):
    from LungNoduleAILib.evaluate import read_reference_csv, read_results, scans_from_cubes, scans_from_references

    res = tmp_path / "results"
    res.mkdir()
    _result(res / "a_nodules.json", "a", [cand(0, 0.9)], series_uid="1.2.3")
    ann = tmp_path / "ann.csv"
    ann.write_text(LUNA_HEADER + "1.2.3,0,0,0,10\n")
    paths = [res]
    if case == "csv_as_result":
        (tmp_path / "a_nodules.csv").write_text("rank,probability\n1,0.9\n")
        paths = [tmp_path / "a_nodules.csv"]
    elif case == "json_not_a_result":
        (tmp_path / "evaluation.json").write_text(json.dumps({"cpm": 0.9}))
        paths = [tmp_path / "evaluation.json"]
    elif case == "missing_result":
        paths = [res / "a_nodules.json", tmp_path / "gone_nodules.json"]
    elif case == "same_scan_twice":
        (tmp_path / "again").mkdir()
        _result(tmp_path / "again" / "a_nodules.json", "a_copy", [cand(30, 0.8)], series_uid="1.2.3")
        paths = [res, tmp_path / "again"]
    elif case == "coordinate_not_a_number":
        ann.write_text(LUNA_HEADER + "1.2.3,12.5mm,0,0,10\n")
    elif case == "no_result_matches":
        ann.write_text(LUNA_HEADER + "9.9.9,0,0,0,10\n")
    elif case == "cubes_csv_without_diameter":
        (tmp_path / "cubes.csv").write_text("image,mask,seriesuid\na.mha,a_seg.mha,1.2.3\n")
    with pytest.raises(ValueError) as err:
        results = read_results(paths)
        if case == "cubes_csv_without_diameter":
            scans_from_cubes(results, tmp_path / "cubes.csv")
        scans_from_references(results, read_reference_csv(ann))
    assert message in str(err.value)


def test_evaluate_command_refuses_bad_input_and_keeps_an_earlier_report(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _result(res / "a_nodules.json", "a", [cand(0, 0.9)])
    (tmp_path / "ann.csv").write_text(LUNA_HEADER + "1.2.3,0,0,0,10\n")
    (tmp_path / "map.csv").write_text("name,uid\na,1.2.3\n")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "evaluation.json").write_text('{"cpm": 0.5}')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "LungNoduleAILib.cli",
            "evaluate",
            str(res),
            "--annotations",
            str(tmp_path / "ann.csv"),
            "--series-map",
            str(tmp_path / "map.csv"),
            "--output-dir",
            str(out),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "needs case,seriesuid" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "evaluation.json").read_text() == '{"cpm": 0.5}'

"""Follow-up comparison (issue 26): registration, one entry per nodule, matching, reproducible volumes, growth and VDT."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from followup import grow_nodule, move_and_reslice

from conftest import LIDC0001_NODULE_LPS, SAMPLE_CT
from LungNoduleAILib.compare import Nodule, growth_status, match_nodules, merge_split, nodule_volume_mm3, volume_doubling_time_days


def test_one_nodule_one_entry():
    """Two candidates 4.9 mm apart (the detector's split of an 8.8 mm nodule) are one nodule; a nodule 20 mm away is not."""
    split = [Nodule(1, [0.0, 0.0, 0.0], 150.0, 6.5), Nodule(2, [4.9, 0.0, 0.0], 100.0, 5.5), Nodule(3, [20.0, 0.0, 0.0], 100.0, 5.5)]
    merged = merge_split(split)
    assert len(merged) == 2
    one = next(n for n in merged if n.merged_ids)
    assert one.merged_ids == (1, 2) and one.volume_mm3 == 250.0 and one.center_lps_mm[0] == pytest.approx(4.9 * 100 / 250)


def test_matching_gate_scales_with_size():
    prior = [Nodule(1, [0, 0, 0], 100, 5.0), Nodule(2, [50, 0, 0], 8000, 25.0)]
    current = [Nodule(1, [9.0, 0, 0], 100, 5.0), Nodule(2, [64, 0, 0], 9000, 26.0)]
    pairs = match_nodules(prior, current, [n.center_lps_mm for n in prior])
    # small nodule 9 mm off: beyond 5 + 0.75 x 5 = 8.75 mm -> new + resolved; big one 14 mm off: within 5 + 0.75 x 25.5
    assert sorted(pairs, key=str) == sorted([(1, 1, 14.0), (None, 0, None), (0, None, None)], key=str)


def test_vdt_and_growth_rule():
    assert volume_doubling_time_days(100.0, 200.0, 365) == 365.0
    assert volume_doubling_time_days(100.0, 150.0, 183) == pytest.approx(183 * math.log(2) / math.log(1.5), abs=0.1)
    assert volume_doubling_time_days(100.0, 150.0, None) is None
    assert volume_doubling_time_days(100.0, 80.0, 100) < 0  # shrinking: a negative doubling time, as reported
    assert [growth_status(6.0, v) for v in (7.5, 7.6, 4.4, 4.5)] == ["stable", "grown", "shrunk", "stable"]  # > 1.5 mm
    assert growth_status(None, 5.0) is None
    assert growth_status(6.0, 8.0, volume_change_pct=4.0) == "stable"  # the outline moved, the volume did not
    assert growth_status(6.0, 8.0, volume_change_pct=40.0) == "grown" and growth_status(8.0, 6.0, volume_change_pct=-40.0) == "shrunk"


@pytest.fixture(scope="module")
def moved_sample(tmp_path_factory):
    ct = sitk.ReadImage(str(SAMPLE_CT))
    moved, transform = move_and_reslice(ct, 4.0, (6.0, -4.0, 3.0), (0.8, 0.8, 2.0))
    path = tmp_path_factory.mktemp("followup") / "moved.nrrd"
    sitk.WriteImage(moved, str(path), useCompression=True)
    return ct, moved, transform, path


def test_volume_is_reproducible_on_a_moved_resliced_copy(moved_sample):
    ct, moved, transform, _ = moved_sample
    centre_moved = transform.GetInverse().TransformPoint(LIDC0001_NODULE_LPS)
    v0 = nodule_volume_mm3(ct, LIDC0001_NODULE_LPS, 23.0)
    v1 = nodule_volume_mm3(moved, centre_moved, 23.0)
    assert v1 == pytest.approx(v0, rel=0.05)  # the reproducibility the README claims for this nodule


def test_compare_with_itself_moved_and_resliced(moved_sample, tmp_path):
    from LungNoduleAILib.cli import main

    *_, path = moved_sample
    assert main(["compare", str(SAMPLE_CT), str(path), "-o", str(tmp_path), "--device", "cpu", "--interval-days", "365"]) == 0
    report = json.loads((tmp_path / "moved_comparison.json").read_text())
    assert report["registration"]["lung_mask_dice"] > 0.9 and report["registration"]["residual_mm"] < 3.0
    statuses = [n["status"] for n in report["nodules"]]
    assert statuses and set(statuses) == {"matched"}  # nothing new, nothing resolved
    top = next(n for n in report["nodules"] if np.linalg.norm(np.subtract(n["prior"]["center_lps_mm"], LIDC0001_NODULE_LPS)) < 10)
    assert abs(top["volume_change_pct"]) < 5 and top["growth"] == "stable"
    assert (tmp_path / "moved_comparison.csv").read_text().splitlines()[0].startswith("status,tracking_uid")
    png = sitk.ReadImage(str(tmp_path / "moved_comparison.png"))  # the picture: prior and current side by side
    assert png.GetWidth() == 600 and png.GetHeight() >= 300


def test_compare_finds_known_growth(tmp_path):
    """The sample's nodule grown by 1.15 in each direction (volume x 1.52) over 365 days: matched, grown, VDT about 610 days."""
    from LungNoduleAILib.cli import main

    ct = sitk.ReadImage(str(SAMPLE_CT))
    grown = grow_nodule(ct, LIDC0001_NODULE_LPS, 23.35 / 2, 1.15)
    sitk.WriteImage(grown, str(tmp_path / "grown.nrrd"), useCompression=True)
    assert main(["compare", str(SAMPLE_CT), str(tmp_path / "grown.nrrd"), "-o", str(tmp_path / "out"), "--device", "cpu", "--interval-days", "365"]) == 0
    report = json.loads((tmp_path / "out" / "grown_comparison.json").read_text())
    top = next(n for n in report["nodules"] if n["status"] == "matched" and np.linalg.norm(np.subtract(n["prior"]["center_lps_mm"], LIDC0001_NODULE_LPS)) < 10)
    truth = 1.15**3
    assert top["volume_change_pct"] == pytest.approx(100 * (truth - 1), abs=15)
    assert top["vdt_days"] == pytest.approx(365 * math.log(2) / math.log(truth), rel=0.35)
    assert top["growth"] == "grown" and top["tracking_uid"].startswith("2.25.")
    assert top["lung_rads"] == "4B"  # a growing solid nodule of 8 mm or more


def test_a_reviewed_prior_keeps_its_tracking_uids(moved_sample, tmp_path):
    """--prior-results as a reviewed .seg.nrrd: its rejected segments are left out, and a matched nodule keeps the prior's tracking UID."""
    from LungNoduleAILib.cli import main
    from LungNoduleAILib.writers import read_segmentation

    *_, moved = moved_sample
    assert main(["detect", str(SAMPLE_CT), "-o", str(tmp_path / "d"), "--device", "cpu"]) == 0
    seg = next((tmp_path / "d").glob("*.seg.nrrd"))
    assert main(["export", str(seg), "--ct", str(SAMPLE_CT), "-o", str(tmp_path / "x"), "--include-pending", "--formats", "seg.nrrd"]) == 0
    reviewed = next((tmp_path / "x").glob("*_reviewed.seg.nrrd"))
    uid = read_segmentation(reviewed).segments[0]["tags"]["LungNoduleAI.TrackingUID"]
    args = ["compare", str(SAMPLE_CT), str(moved), "-o", str(tmp_path / "c"), "--device", "cpu", "--prior-results", str(reviewed)]
    assert main(args) == 0
    report = json.loads((tmp_path / "c" / "moved_comparison.json").read_text())
    top = next(n for n in report["nodules"] if n["prior"] and np.linalg.norm(np.subtract(n["prior"]["center_lps_mm"], LIDC0001_NODULE_LPS)) < 10)
    assert top["status"] == "matched" and top["tracking_uid"] == uid
    refused = ["compare", str(SAMPLE_CT), str(moved), "-o", str(tmp_path / "c2"), "--device", "cpu", "--current-results", str(reviewed)]
    assert main(refused) == 2  # the reviewed file belongs to the prior scan, not to the moved copy
    assert not (tmp_path / "c2").exists() or not list((tmp_path / "c2").iterdir())


@pytest.mark.parametrize(
    "status, growth, kind, mean_d, solid_d, expected",
    [
        ("new", None, "solid", 3.9, 3.9, "2"),
        ("new", None, "solid", 4.0, 4.0, "3"),
        ("new", None, "solid", 5.9, 5.9, "3"),
        ("new", None, "solid", 6.0, 6.0, "4A"),
        ("new", None, "solid", 8.0, 8.0, "4B"),
        ("matched", "grown", "solid", 7.9, 7.9, "4A"),
        ("matched", "grown", "solid", 8.0, 8.0, "4B"),
        ("matched", "stable", "solid", 7.0, 7.0, "3"),  # baseline category; stepped downgrades are the reader's
        ("new", None, "part-solid", 5.9, 2.0, "3"),
        ("new", None, "part-solid", 9.0, 3.9, "4A"),
        ("matched", "grown", "part-solid", 9.0, 4.0, "4B"),
        ("new", None, "non-solid", 12.0, 0.0, "2"),
        ("resolved", None, "solid", None, None, None),
    ],
)
def test_followup_lung_rads(status, growth, kind, mean_d, solid_d, expected):
    from LungNoduleAILib.compare import followup_lung_rads

    assert followup_lung_rads(status, growth, kind, mean_d, solid_d) == expected


def test_a_nodule_gone_on_the_follow_up_is_resolved(tmp_path):
    """The sample's nodule replaced by lung: the prior's nodule is resolved, nothing matched to it, the resolved entry keeps a tracking UID."""
    from followup import erase_nodule

    from LungNoduleAILib.cli import main

    ct = sitk.ReadImage(str(SAMPLE_CT))
    sitk.WriteImage(erase_nodule(ct, LIDC0001_NODULE_LPS, 23.35 / 2), str(tmp_path / "gone.nrrd"), useCompression=True)
    assert main(["compare", str(SAMPLE_CT), str(tmp_path / "gone.nrrd"), "-o", str(tmp_path / "out"), "--device", "cpu", "--interval-days", "180"]) == 0
    report = json.loads((tmp_path / "out" / "gone_comparison.json").read_text())
    near = [n for n in report["nodules"] if n["prior"] and np.linalg.norm(np.subtract(n["prior"]["center_lps_mm"], LIDC0001_NODULE_LPS)) < 10]
    assert len(near) == 1 and near[0]["status"] == "resolved" and near[0]["current"] is None and near[0]["tracking_uid"].startswith("2.25.")
    assert near[0]["lung_rads"] is None and near[0]["vdt_days"] is None

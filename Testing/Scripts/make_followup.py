"""Synthetic follow-ups of a real scan with a known truth, and what ``lungnoduleai compare`` makes of them.

    .venv/bin/python Testing/Scripts/make_followup.py --scan ../shared/data/scans/LIDC-IDRI-0001.nii.gz --nodule 56.2,86.3,-115.9 --diameter 23.35 -o followups

Writes, next to the scan's own detection: ``moved`` (rotated 4 degrees, shifted 6/-4/3 mm, resliced to
0.8 x 0.8 x 2 mm), ``grown`` (the nodule's tissue scaled by 1.15 about its centre: volume x 1.52,
then moved and resliced the same way) and ``gone`` (the nodule replaced by lung, moved and resliced),
runs ``compare`` of the scan against each with both detections
given (--prior-results/--current-results) and an interval of 365 days, and prints matching, volume ratio,
VDT against the truth and the seconds ``compare`` took.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from followup import erase_nodule, grow_nodule, move_and_reslice  # noqa: E402

from LungNoduleAILib.cli import main as cli  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", required=True)
    ap.add_argument("--nodule", required=True, help="the nodule's centre, LPS mm: x,y,z")
    ap.add_argument("--diameter", type=float, required=True, help="its diameter (mm)")
    ap.add_argument("--factor", type=float, default=1.15, help="linear growth factor (default 1.15: volume x 1.52)")
    ap.add_argument("-o", "--output-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    centre = [float(v) for v in args.nodule.split(",")]
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    ct = sitk.ReadImage(args.scan)
    cases = {
        "moved": (ct, 1.0),
        "grown": (grow_nodule(ct, centre, args.diameter / 2, args.factor), args.factor),
        "gone": (erase_nodule(ct, centre, args.diameter / 2), 0.0),  # the nodule replaced by lung: resolved
    }
    assert cli(["detect", args.scan, "-o", str(out / "prior"), "--overwrite"]) == 0
    for name, (image, factor) in cases.items():
        moved, _ = move_and_reslice(image, 4.0, (6.0, -4.0, 3.0), (0.8, 0.8, 2.0))
        path = out / f"{name}.nrrd"
        sitk.WriteImage(moved, str(path), useCompression=True)
        assert cli(["detect", str(path), "-o", str(out / name), "--overwrite"]) == 0
        t = time.perf_counter()
        assert cli(["compare", args.scan, str(path), "-o", str(out / f"{name}_cmp"), "--overwrite", "--interval-days", "365",
                    "--prior-results", str(out / "prior"), "--current-results", str(out / name)]) == 0  # fmt: skip
        seconds = time.perf_counter() - t
        report = json.loads((out / f"{name}_cmp" / f"{name}_comparison.json").read_text())
        counts = {s: sum(n["status"] == s for n in report["nodules"]) for s in ("matched", "new", "resolved")}
        print(f"{name}: {counts}, registration {report['registration']}, compare {seconds:.1f} s")
        for n in report["nodules"]:
            if n["status"] == "matched":
                grown_one = math.dist(n["prior"]["center_lps_mm"], centre) < args.diameter / 2  # only this nodule was grown
                truth = factor**3 if grown_one else 1.0
                vdt = 365 * math.log(2) / math.log(truth) if truth != 1 else None
                print(f"  {n['prior']['id']}->{n['current']['id']}: volume x {1 + (n['volume_change_pct'] or 0) / 100:.3f} (truth {truth:.3f}), "
                      f"mean diameter {n['prior']['mean_diameter_mm']} -> {n['current']['mean_diameter_mm']}, VDT {n['vdt_days']} "
                      f"(truth {vdt and round(vdt)}), {n['growth']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

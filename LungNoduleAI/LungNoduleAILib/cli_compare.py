"""``lungnoduleai compare PRIOR CURRENT``: the follow-up comparison on the command line (:mod:`.compare` does the work)."""

from __future__ import annotations

import csv
import datetime
import sys
from pathlib import Path

__all__ = ["add_compare", "run_compare"]


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare a follow-up CT with the prior one: matched, new and resolved nodules, growth, volume doubling time",
        description="Register the prior CT to the current one, match their nodules and measure growth. Writes <current name>_comparison.json "
        "and _comparison.csv. Without --prior-results/--current-results, detection runs on that scan.",
    )
    p.add_argument("prior", help="the prior CT (file or DICOM folder)")
    p.add_argument("current", help="the current CT (file or DICOM folder)")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the outputs (created if missing)")
    p.add_argument("--interval-days", type=float, default=None, help="days between the scans (default: from the DICOM StudyDates)")
    p.add_argument("--prior-date", default=None, metavar="YYYY-MM-DD")
    p.add_argument("--current-date", default=None, metavar="YYYY-MM-DD")
    p.add_argument(
        "--prior-results",
        default=None,
        metavar="PATH",
        help="an earlier 'detect' output folder of the prior CT, or its reviewed .seg.nrrd (rejected ones left out)",
    )
    p.add_argument("--current-results", default=None, metavar="PATH", help="the same for the current CT")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _study_date(ct) -> datetime.date | None:
    if ct.dicom is None or not ct.dicom.files:
        return None
    import pydicom

    text = str(pydicom.dcmread(ct.dicom.files[0], stop_before_pixels=True).get("StudyDate", "") or "")
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def _date(text: str | None, option: str) -> datetime.date | None:
    if text is None:
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{option} '{text}' is not a date: give YYYY-MM-DD.") from None


def _reviewed_nodules(path: str, ct) -> list:
    """The nodules of a reviewed ``.seg.nrrd`` of this CT: every segment not rejected, measured on the CT, with its tracking UID."""
    from .candidates import measure_candidates
    from .compare import Nodule
    from .export import FileFront, check_segmentation_source
    from .review import REJECTED, TAG_TRACKING_UID, review_status
    from .writers import read_segmentation

    seg_file = read_segmentation(path)
    check_segmentation_source(seg_file, path, ct, f"'{ct.path}'")
    keep = [i for i, s in enumerate(seg_file.segments) if review_status(s["tags"]) != REJECTED]
    if not keep:
        return []
    measured = measure_candidates(FileFront(seg_file, Path(path), ct, f"'{ct.path}'").labels(keep), ct.image)
    return [
        Nodule(
            m.id,
            list(m.center_lps_mm),
            m.volume_mm3,
            m.mean_diameter_mm,
            m.type,
            seg_file.segments[keep[m.id - 1]]["tags"].get(TAG_TRACKING_UID),
            solid_diameter_mm=m.solid_component_mean_diameter_mm,
        )  # fmt: skip
        for m in measured
    ]


def _nodules(results: str | None, ct, detector_factory) -> list:
    """The scan's nodules: from a reviewed ``.seg.nrrd`` (rejected segments left out), an earlier detect output folder, else detected now."""
    import json

    from .candidates import Candidate
    from .compare import Nodule
    from .protocol import find_outputs

    if results is not None and str(results).lower().endswith((".seg.nrrd", ".nrrd")):
        return _reviewed_nodules(results, ct)
    if results is not None:
        report = json.loads(find_outputs(results)["json"].read_text(encoding="utf-8"))
        candidates = [Candidate.from_dict(c) for c in report["candidates"]]
    else:
        candidates = detector_factory().detect(ct).candidates
    return [
        Nodule(c.id, list(c.center_lps_mm), c.volume_mm3, c.mean_diameter_mm, c.type, solid_diameter_mm=c.solid_component_mean_diameter_mm) for c in candidates
    ]


def run_compare(args) -> int:
    from .compare import compare_nodules
    from .imageio import read_ct
    from .outputset import OutputError, OutputSet
    from .pipeline import Detector
    from .writers import write_json

    try:
        prior_date, current_date = _date(args.prior_date, "--prior-date"), _date(args.current_date, "--current-date")
        prior_ct, current_ct = read_ct(args.prior), read_ct(args.current)
        detector = None

        def factory():
            nonlocal detector
            detector = detector or Detector(None, args.device)
            return detector

        prior, current = _nodules(args.prior_results, prior_ct, factory), _nodules(args.current_results, current_ct, factory)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prior_date = prior_date or _study_date(prior_ct)
    current_date = current_date or _study_date(current_ct)
    interval = args.interval_days
    if interval is None and prior_date and current_date:
        interval = float((current_date - prior_date).days)
    result = compare_nodules(
        prior_ct.image, current_ct.image, prior, current, interval, prior_ct.series_uid or prior_ct.name, current_ct.series_uid or current_ct.name
    )
    report = {
        "prior": {"path": str(args.prior), "study_date": prior_date.isoformat() if prior_date else None},
        "current": {"path": str(args.current), "study_date": current_date.isoformat() if current_date else None},
        **result,
    }
    if interval is None:
        report["notes"] = ["No interval between the scans (no DICOM StudyDates, no --interval-days): no volume doubling time."]
    out = Path(args.output_dir)
    targets = {k: out / f"{current_ct.name}_comparison.{k}" for k in ("json", "csv", "png")}
    try:
        with OutputSet(targets, args.overwrite, name=f"{current_ct.name}_comparison", what="comparison folder ") as files:
            write_json(report, files.tmp("json"))
            _write_csv(report["nodules"], files.tmp("csv"))
            write_comparison_png(prior_ct.image, current_ct.image, report["nodules"], files.tmp("png"))
            files.commit()
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    counts = {s: sum(n["status"] == s for n in report["nodules"]) for s in ("matched", "new", "resolved")}
    reg = report["registration"]
    print(f"{counts['matched']} matched, {counts['new']} new, {counts['resolved']} resolved")
    print(f"lungs overlap (Dice) {reg['lung_mask_dice']} after registration; matched nodules {reg['residual_mm']} mm apart on average")
    print(f"outputs in {out}/: {', '.join(p.name for p in targets.values())}")
    return 0


def _write_csv(nodules: list, path) -> None:
    columns = ["status", "tracking_uid", "prior_id", "current_id", "prior_volume_mm3", "current_volume_mm3", "volume_change_pct"]
    columns += ["prior_mean_diameter_mm", "current_mean_diameter_mm", "mean_diameter_change_mm", "vdt_days", "growth"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for n in nodules:
            p, c = n["prior"] or {}, n["current"] or {}
            row = [n["status"], n["tracking_uid"], p.get("id"), c.get("id"), p.get("volume_mm3"), c.get("volume_mm3"), n.get("volume_change_pct")]
            row += [p.get("mean_diameter_mm"), c.get("mean_diameter_mm"), n.get("mean_diameter_change_mm"), n.get("vdt_days"), n.get("growth")]
            w.writerow(["" if v is None else v for v in row])


def _axial_patch(ct, center_lps, half_mm: float = 30.0, step: float = 0.5):
    """An axial slice (HU, ``(rows, columns)``) of ``2 half_mm`` square through a point, at ``step`` mm, anterior up."""
    import SimpleITK as sitk

    n = int(2 * half_mm / step)
    ref = sitk.Image([n, n, 1], sitk.sitkFloat32)
    ref.SetSpacing((step, step, step))
    ref.SetOrigin([center_lps[0] - half_mm, center_lps[1] - half_mm, center_lps[2]])
    return sitk.GetArrayFromImage(sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32))[0]


def write_comparison_png(prior_ct, current_ct, nodules: list, path, max_rows: int = 8) -> None:
    """Each matched nodule (up to ``max_rows``), prior and current side by side on the axial slice through its centre,
    with its volume change and growth; new and resolved ones are listed under the pictures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matched = [n for n in nodules if n["status"] == "matched"][:max_rows]
    rows = max(1, len(matched))
    fig, axes = plt.subplots(rows, 2, figsize=(6, 3 * rows), squeeze=False)
    for ax, n in zip(axes, matched):
        for a, ct, side in ((ax[0], prior_ct, "prior"), (ax[1], current_ct, "current")):
            a.imshow(_axial_patch(ct, n[side]["center_lps_mm"]), cmap="gray", vmin=-1000, vmax=400, extent=(-30, 30, 30, -30))
            d = n[side].get("mean_diameter_mm")
            a.set_title(f"{side} #{n[side]['id']}: {n[side]['volume_mm3']:.0f} mm3" + (f", {d} mm" if d else ""), fontsize=8)
            a.axis("off")
        change = n.get("volume_change_pct")
        ax[1].text(0.02, 0.02, f"{change:+.0f} % {n.get('growth') or ''}" if change is not None else "", color="yellow", transform=ax[1].transAxes, fontsize=8)
    if not matched:
        for a in axes[0]:
            a.axis("off")
        axes[0][0].set_title("No matched nodules", fontsize=9)
    others = [f"{n['status']}: #{(n['current'] or n['prior'])['id']}" for n in nodules if n["status"] != "matched"]
    if others:
        fig.text(0.01, 0.005, "; ".join(others)[:300], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

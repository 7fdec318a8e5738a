"""Figures for a model card: held-out cubes, and false candidates on the full scans.

    .venv/bin/python Testing/Scripts/evaluate_model.py --data-dir ../shared/data [--model M.json] [--threshold P] [--training-split] [--output figures.json]

* Validation cubes: the series the training split held out (same seed and
  fraction as ``lungnoduleai train``); each cube runs through the full engine
  (``Detector.detect``, whole cube, no lung crop). A nodule is found when a
  candidate's centre lies within the nodule's radius (cubes.csv) of the
  reference mask's centroid (robust for cubes cut short at the scan edge);
  a candidate on another LUNA16 nodule of the same series that lies in the
  cube (``other_references``) counts neither as hit nor as false, as LUNA16
  counts hits on other nodules; every other candidate is a false one. Found and other candidates come from
  a run at the threshold (what a user gets); FROC/CPM per cube and the
  threshold sweep from the components of one run down to ``--froc-threshold``.
  Each validation nodule is also sorted by its surroundings (see
  ``LungNoduleAILib.train.nodule_context``): attached to the pleura/mediastinum, attached to a
  vessel, or isolated, and the sensitivity is given for each.
  ``--training-split`` scores the training series' cubes the same way
  instead: not a held-out figure, but it tells whether the network misses a
  kind of nodule even where it trained, or fits it and fails to generalise.
* Full scans (LIDC-IDRI-0001, -0002): the LUNA16 reference nodules, whether
  the top-ranked candidate is one, and the false positives as LUNA16 counts
  them: candidates on no reference nodule and on no "irrelevant finding"
  (every other LIDC reader mark: nodules < 3 mm, non-nodules, nodules marked
  by fewer than 3 readers; built from the XML by
  ``LungNoduleAILib.evaluate.lidc_excluded_findings``), plus the FROC over
  the two scans.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LungNoduleAILib.evaluate import Finding, evaluate, lidc_excluded_findings, lidc_reader_marks, match_scan, write_reference_csv
from LungNoduleAILib.imageio import read_ct
from LungNoduleAILib.pipeline import Detector
from LungNoduleAILib.training import NODULE_CONTEXTS, NODULE_DENSITIES, nodule_context, nodule_density, validation_series

SWEEP = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
"""Thresholds of the sweep (from one run at the lowest: probability of each candidate >= t)."""


def val_cubes(data_dir: Path, seed: int, val_fraction: float = 0.15, training: bool = False) -> list[dict]:
    """cubes.csv rows of the validation series (or, with ``training``, of the training series)."""
    rows = list(csv.DictReader(open(data_dir / "cubes" / "cubes.csv", newline="")))
    val = validation_series([r["seriesuid"] for r in rows], val_fraction, seed)
    return [r for r in rows if (r["seriesuid"] in val) != training]


def other_references(data_dir: Path, rows: list[dict]) -> dict[str, list[Finding]]:
    """For each cube image of ``rows``, the other LUNA16 nodules of its series whose centre lies in the cube.

    A cube holds its own nodule at its centre, but a neighbour of the same
    series may lie in it too; its mask is not in the cube's mask. ``rows``
    (cubes.csv rows) must hold whole series, as the split by series does.
    """
    nodules, grids = {}, {}
    for r in rows:
        mask = sitk.ReadImage(str(data_dir / "cubes" / r["mask"]))
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
        nodules[r["image"]] = (r["seriesuid"], Finding(tuple(stats.GetCentroid(1)), float(r["diameter_mm"])))
        grids[r["image"]] = mask
    out = {}
    for image, (series, _) in nodules.items():
        grid = grids[image]
        size = np.array(grid.GetSize(), dtype=float)
        inside = []
        for other, (other_series, finding) in nodules.items():
            if other == image or other_series != series:
                continue
            index = np.array(grid.TransformPhysicalPointToContinuousIndex(finding.center_mm))
            if np.all(index >= -0.5) and np.all(index <= size - 0.5):
                inside.append(finding)
        out[image] = inside
    return out


def _rates(counts: dict) -> dict:
    """``{group: [found, n]}`` -> ``{group: {"found", "n", "sensitivity"}}``."""
    return {k: {"found": v[0], "n": v[1], "sensitivity": round(v[0] / max(1, v[1]), 4)} for k, v in counts.items()}


def evaluate_cubes(detector: Detector, data_dir: Path, threshold: float, seed: int, froc_threshold: float, training: bool = False) -> dict:
    rows = val_cubes(data_dir, seed, training=training)
    found, others, by_size = 0, 0, {"<6mm": [0, 0], ">=6mm": [0, 0]}
    by_context = {c: [0, 0] for c in NODULE_CONTEXTS}
    by_density = {c: [0, 0] for c in NODULE_DENSITIES}
    missed = []
    froc_scans = []
    sweep = {t: [0, 0] for t in SWEEP}
    neighbours = other_references(data_dir, rows)
    on_neighbours, n_neighbours = 0, 0
    for r in rows:
        ct = read_ct(data_dir / "cubes" / r["image"], validate=False)
        mask = sitk.ReadImage(str(data_dir / "cubes" / r["mask"]))
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
        ref = np.array(stats.GetCentroid(1))
        radius = float(r["diameter_mm"]) / 2
        excluded = neighbours[r["image"]]
        n_neighbours += len(excluded)

        def on_neighbour(c) -> bool:
            return any(np.linalg.norm(np.array(c.center_lps_mm) - np.array(f.center_mm)) <= f.diameter_mm / 2 for f in excluded)

        low = detector.detect(ct, froc_threshold, use_lung_mask=False)
        ranked = [{**c.to_dict(), "probability": c.score if c.score is not None else c.probability} for c in low.candidates]
        froc_scans.append(match_scan(r["image"], ranked, [Finding(tuple(ref), 2 * radius)], excluded))
        for t in SWEEP:
            hit_t = [c for c in low.candidates if c.probability >= t and np.linalg.norm(np.array(c.center_lps_mm) - ref) <= radius]
            sweep[t][0] += bool(hit_t)
            sweep[t][1] += sum(c.probability >= t and not on_neighbour(c) for c in low.candidates) - len(hit_t)
        res = detector.detect(ct, threshold, use_lung_mask=False) if froc_threshold < threshold else low  # what a user gets
        hits = [c for c in res.candidates if np.linalg.norm(np.array(c.center_lps_mm) - ref) <= radius]
        ignored = [c for c in res.candidates if c not in hits and on_neighbour(c)]
        on_neighbours += len(ignored)
        found += bool(hits)
        others += len(res.candidates) - len(hits) - len(ignored)
        key = "<6mm" if float(r["diameter_mm"]) < 6 else ">=6mm"
        by_size[key][0] += bool(hits)
        by_size[key][1] += 1
        context = nodule_context(sitk.GetArrayViewFromImage(ct.image), sitk.GetArrayViewFromImage(mask), ct.image.GetSpacing())
        by_context[context][0] += bool(hits)
        by_context[context][1] += 1
        density = nodule_density(sitk.GetArrayViewFromImage(ct.image), sitk.GetArrayViewFromImage(mask))
        by_density[density][0] += bool(hits)
        by_density[density][1] += 1
        if not hits:
            on_nodule = [c.probability for c in low.candidates if np.linalg.norm(np.array(c.center_lps_mm) - ref) <= radius]
            missed.append(
                {
                    "image": r["image"],
                    "diameter_mm": float(r["diameter_mm"]),
                    "context": context,
                    "density": density,
                    "best_probability_on_nodule": max(on_nodule, default=0.0),
                }
            )
    n = len(rows)
    ev = evaluate(froc_scans, threshold, bootstrap=500)
    return {
        "cpm": round(ev.cpm, 4),
        "cpm_ci95": [round(v, 4) for v in ev.cpm_ci95],
        "sensitivity_at_fp_per_cube": {str(k): round(v, 4) for k, v in ev.sensitivity_at.items()},
        "sweep": {str(t): {"sensitivity": round(v[0] / n, 4), "other_per_cube": round(v[1] / n, 3)} for t, v in sweep.items()},
        "cubes": n,
        "series": len({r["seriesuid"] for r in rows}),
        "sensitivity": round(found / n, 4),
        "other_candidates_per_cube": round(others / n, 3),
        "other_references_in_cubes": n_neighbours,
        "candidates_on_other_references": on_neighbours,
        "sensitivity_by_size": _rates(by_size),
        "sensitivity_by_context": _rates(by_context),
        "sensitivity_by_density": _rates(by_density),
        "missed": missed,
    }


def evaluate_scan(detector: Detector, scans: Path, case: str, threshold: float | None, froc_threshold: float) -> tuple[dict, object, object]:
    """One full scan under LUNA16 rules.

    Returns its figures, its FROC matching (candidates of a run down to
    ``froc_threshold``) and the matching of what a user gets (a run at ``threshold``).
    """
    path = scans / f"{case}.nii.gz"
    ct = read_ct(path)
    t = time.perf_counter()
    res = detector.detect(ct, threshold)
    seconds = time.perf_counter() - t
    refs = [
        Finding(tuple(float(row[k]) for k in ("coordX", "coordY", "coordZ")), float(row["diameter_mm"]))
        for row in csv.DictReader(open(scans / f"{case}.annotations.csv"))
    ]
    marks = lidc_reader_marks(scans / f"{case}.xml", sitk.ReadImage(str(path))) if (scans / f"{case}.xml").exists() else []
    excluded = lidc_excluded_findings(marks, refs)
    low = detector.detect(ct, min(SWEEP[0], froc_threshold, res.threshold))
    low_dicts = [c.to_dict() for c in low.candidates]
    sweep = {}
    for t in SWEEP:
        m = match_scan(case, [c for c in low_dicts if c["probability"] >= t], refs, excluded)
        sweep[str(t)] = {"candidates": sum(c["probability"] >= t for c in low_dicts), "false_positives": len(m.fp_probs), "references_found": len(m.tp_probs)}
    m = match_scan(case, [c.to_dict() for c in res.candidates], refs, excluded)
    top = match_scan(case, [res.candidates[0].to_dict()], refs, excluded) if res.candidates else None
    figures = {
        "case": case,
        "reference_nodules": len(refs),
        "excluded_findings": len(excluded),
        "references_found": len(m.tp_probs),
        "top_candidate_is_reference": bool(top and top.tp_probs),
        "candidates": len(res.candidates),
        "false_positives": len(m.fp_probs),
        "on_excluded_findings": len(res.candidates) - len(m.fp_probs) - sum(1 for c in res.candidates if match_scan(case, [c.to_dict()], refs).tp_probs),
        "top5": [{"rank": c.rank, "p": round(c.probability, 3), "diameter_mm": c.diameter_mm, "lps": c.center_lps_mm} for c in res.candidates[:5]],
        "detect_seconds": round(seconds, 1),
        "sweep": sweep,
    }
    return figures, match_scan(case, [c for c in low_dicts if c["probability"] >= froc_threshold], refs, excluded), m


def write_excluded_csv(scans: Path, path: Path) -> None:
    """LUNA16 excluded findings of the full scans, keyed by series UID (series.csv), as a LUNA16 CSV."""
    uids = {r["case"]: r["seriesuid"] for r in csv.DictReader(open(scans / "series.csv"))}
    out = {}
    for case, uid in uids.items():
        refs = [
            Finding(tuple(float(row[k]) for k in ("coordX", "coordY", "coordZ")), float(row["diameter_mm"]))
            for row in csv.DictReader(open(scans / f"{case}.annotations.csv"))
        ]
        out[uid] = lidc_excluded_findings(lidc_reader_marks(scans / f"{case}.xml", sitk.ReadImage(str(scans / f"{case}.nii.gz"))), refs)
    write_reference_csv(out, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0, help="the training split seed")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--skip-cubes", action="store_true")
    ap.add_argument(
        "--excluded-csv",
        type=Path,
        default=None,
        help="also write the full scans' LUNA16 excluded findings (from the XML) here, for lungnoduleai evaluate --excluded",
    )
    ap.add_argument("--froc-threshold", type=float, default=0.05, help="candidates down to this probability feed the FROC curve")
    ap.add_argument(
        "--training-split",
        action="store_true",
        help="score the training series' cubes instead (key training_cubes): how well the network fits what it was trained on, not a held-out figure",
    )
    args = ap.parse_args(argv)
    detector = Detector(args.model, "auto")
    threshold = args.threshold if args.threshold is not None else detector.model.spec.threshold
    figures = {"model": detector.model.spec.name, "version": detector.model.spec.version, "sha256": detector.model.sha256, "threshold": threshold}
    if not args.skip_cubes:
        key = "training_cubes" if args.training_split else "validation_cubes"
        figures[key] = evaluate_cubes(detector, args.data_dir, threshold, args.seed, min(args.froc_threshold, threshold), args.training_split)
        print(json.dumps({k: v for k, v in figures[key].items() if k != "missed"}), flush=True)
    if args.excluded_csv:
        write_excluded_csv(args.data_dir / "scans", args.excluded_csv)
    scans = [evaluate_scan(detector, args.data_dir / "scans", c, threshold, min(args.froc_threshold, threshold)) for c in ("LIDC-IDRI-0001", "LIDC-IDRI-0002")]
    figures["full_scans"] = [f for f, _, _ in scans]
    for s in figures["full_scans"]:
        print(json.dumps({k: v for k, v in s.items() if k not in ("top5", "sweep")}), flush=True)
        print("  sweep:", json.dumps(s["sweep"]), flush=True)
    ev = evaluate([m for _, m, _ in scans], threshold, bootstrap=0)
    # the operating point from the run at the threshold, as in the table: the low run's
    # components (p >= 0.05) merge neighbours and would count differently
    figures["full_scan_froc"] = {
        "scans": ev.scans,
        "nodules": ev.nodules,
        "cpm": round(ev.cpm, 4),
        "sensitivity_at_fp_per_scan": {str(k): round(v, 4) for k, v in ev.sensitivity_at.items()},
        "operating_point": evaluate([m for _, _, m in scans], threshold, bootstrap=0).operating_point,
    }
    print("full-scan FROC:", json.dumps(figures["full_scan_froc"]), flush=True)
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

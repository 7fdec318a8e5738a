"""How the engine's nodule type and mean diameter agree with the LIDC radiologists (issue 25).

    .venv/bin/python Testing/Scripts/characterisation_agreement.py --data-dir ../shared/data [--threshold 0.5] [--output agreement.json] [--max-cubes N]

For every cube of ``cubes/lidc_ratings.csv`` with ``match_flag`` ok (689), the bundled detector runs on
the cube (whole cube, no lung crop, threshold 0.5 so that faint nodules have a candidate too), and
the candidate whose centre lies within the nodule's radius of the reference mask's centroid is
characterised on its own voxels (``LungNoduleAILib.characterise``). Its type is compared with the
readers' median texture (<= 2 non-solid, 2.5-3.5 part-solid, >= 4 solid) and calcification
(median < 6: calcified), its mean diameter with the LUNA16 diameter.

Printed: the confusion matrix, per-class recall, Cohen's kappa, calcified yes/no; the same with
the rule's thresholds re-fitted in 5-fold cross-validation by series on these candidates (is the
shipped rule a lucky choice?); mean-diameter bias and spread by size; and the seconds the
characterisation takes per candidate. The per-cube results are cached in ``--cache`` so the report
can be re-made without detecting again.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LungNoduleAILib.characterise import (
    CALCIFIED_MIN_FRACTION,
    CALCIUM_HU,
    GROUND_GLASS_P90_HU,
    PART_SOLID_MAX_SOLID_FRACTION,
    SOLID_HU,
    characterise,
)
from LungNoduleAILib.imageio import read_ct
from LungNoduleAILib.pipeline import Detector

CLASSES = ("non-solid", "part-solid", "solid")


def readers_class(texture: float) -> str:
    return "non-solid" if texture <= 2 else ("part-solid" if texture < 4 else "solid")


def detect_cubes(data_dir: Path, threshold: float, max_cubes: int | None) -> list[dict]:
    detector = Detector(None, "auto")
    rows = [r for r in csv.DictReader(open(data_dir / "cubes" / "lidc_ratings.csv", newline="")) if r["match_flag"] == "ok"]
    out = []
    for n, r in enumerate(rows[:max_cubes]):
        ct = read_ct(data_dir / "cubes" / r["image"], validate=False)
        mask = sitk.ReadImage(str(data_dir / "cubes" / r["mask"]))
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
        ref = np.array(stats.GetCentroid(1))
        radius = float(r["diameter_mm"]) / 2
        res = detector.detect(ct, threshold, use_lung_mask=False)
        hits = [c for c in res.candidates if np.linalg.norm(np.array(c.center_lps_mm) - ref) <= radius]
        row = {"image": r["image"], "series": r["seriesuid"], "texture": float(r["median_texture"]), "calcification": float(r["median_calcification"])}
        row["luna_diameter_mm"] = float(r["diameter_mm"])
        if hits:
            c = hits[0]
            lab = sitk.GetArrayViewFromImage(res.labelmap) == c.id
            hu = sitk.GetArrayViewFromImage(ct.image)
            i0, j0, k0, i1, j1, k1 = c.bbox_ijk
            box = (slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1))
            m, h = np.asarray(lab[box]), np.asarray(hu[box]).astype(np.float32)
            t = time.perf_counter()
            row.update(characterise(m, h, ct.image.GetSpacing()))
            row["seconds"] = time.perf_counter() - t
            v = h[m]
            row.update(p90=float(np.percentile(v, 90)), solid_fraction=float((v >= SOLID_HU).mean()), calcium_fraction=float((v >= CALCIUM_HU).mean()))
        out.append(row)
        if (n + 1) % 50 == 0:
            print(f"{n + 1}/{len(rows)} cubes", flush=True)
    return out


def confusion(truth: list[str], pred: list[str]) -> dict:
    m = {t: {p: 0 for p in CLASSES} for t in CLASSES}
    for t, p in zip(truth, pred):
        m[t][p if p in CLASSES else "solid"] += 1  # calcified counts as solid texture (LIDC texture of a calcified nodule is 5)
    return m


def kappa(truth: list[str], pred: list[str]) -> float:
    pred = [p if p in CLASSES else "solid" for p in pred]
    n = len(truth)
    po = sum(t == p for t, p in zip(truth, pred)) / n
    pe = sum((truth.count(c) / n) * (pred.count(c) / n) for c in CLASSES)
    return (po - pe) / (1 - pe) if pe < 1 else 1.0


def type_by(p90, solid_fraction, a, b):
    return "non-solid" if p90 < a else ("part-solid" if solid_fraction < b else "solid")


def cross_validated(rows: list[dict], folds: int = 5) -> dict:
    """The rule's two thresholds re-fitted on the other folds' series (accuracy, subject to the readers' own non-solid and solid recall)."""
    series = sorted({r["series"] for r in rows})
    rng = np.random.default_rng(0)
    rng.shuffle(series)
    fold = {s: i % folds for i, s in enumerate(series)}
    pred = [None] * len(rows)
    chosen = []
    for k in range(folds):
        train = [r for r in rows if fold[r["series"]] != k]
        best = None
        for a, b in itertools.product(np.arange(-500, -250, 5), np.arange(0.0, 0.4, 0.01)):
            p = [type_by(r["p90"], r["solid_fraction"], a, b) for r in train]
            t = [readers_class(r["texture"]) for r in train]
            recall = {c: np.mean([x == c for x, y in zip(p, t) if y == c]) for c in CLASSES}
            acc = np.mean([x == y for x, y in zip(p, t)])
            score = acc + 0.3 * recall["part-solid"] if recall["non-solid"] >= 0.72 and recall["solid"] >= 0.95 else acc - 1
            if best is None or score > best[0]:
                best = (score, a, b)
        chosen.append([float(best[1]), round(float(best[2]), 2)])
        for i, r in enumerate(rows):
            if fold[r["series"]] == k:
                pred[i] = type_by(r["p90"], r["solid_fraction"], best[1], best[2])
    return {"pred": pred, "thresholds_per_fold": chosen}


def summary(truth: list[str], pred: list[str]) -> dict:
    m = confusion(truth, pred)
    recall = {c: round(m[c][c] / max(1, sum(m[c].values())), 3) for c in CLASSES}
    acc = sum(m[c][c] for c in CLASSES) / len(truth)
    return {"n": len(truth), "accuracy": round(acc, 3), "recall": recall, "kappa": round(kappa(truth, pred), 3), "confusion (rows readers, columns engine)": m}


def shipped_type(r: dict) -> str:
    """The engine's type of a cached candidate, with the rule's current thresholds (the cache keeps the features)."""
    if r["calcium_fraction"] >= CALCIFIED_MIN_FRACTION:
        return "calcified"
    return type_by(r["p90"], r["solid_fraction"], GROUND_GLASS_P90_HU, PART_SOLID_MAX_SOLID_FRACTION)


def report(rows: list[dict]) -> dict:
    hit = [r for r in rows if "type" in r]
    for r in hit:
        r["type"] = shipped_type(r)
    truth = [readers_class(r["texture"]) for r in hit]
    out = {"cubes": len(rows), "with a candidate": len(hit)}
    out["type (shipped rule)"] = summary(truth, [r["type"] for r in hit])
    cv = cross_validated(hit)
    out["type (rule re-fitted, 5-fold by series, out of fold)"] = {**summary(truth, cv["pred"]), "thresholds_per_fold": cv["thresholds_per_fold"]}
    calc_truth = [r["calcification"] < 6 for r in hit]
    calc_pred = [r["type"] == "calcified" for r in hit]
    out["calcified yes/no"] = {
        "accuracy": round(float(np.mean([a == b for a, b in zip(calc_truth, calc_pred)])), 3),
        "sensitivity": round(float(np.mean([b for a, b in zip(calc_truth, calc_pred) if a])), 3),
        "specificity": round(float(np.mean([not b for a, b in zip(calc_truth, calc_pred) if not a])), 3),
    }
    sizes = {}
    for lo, hi in ((0, 6), (6, 10), (10, 20), (20, 1e9)):
        d = np.array([r["mean_diameter_mm"] - r["luna_diameter_mm"] for r in hit if lo <= r["luna_diameter_mm"] < hi])
        if d.size:
            sizes[f"{lo}-{hi if hi < 1e9 else ''} mm"] = {"n": int(d.size), "bias_mm": round(float(d.mean()), 2), "sd_mm": round(float(d.std()), 2)}
    out["mean diameter minus LUNA16 diameter"] = sizes
    seconds = [r["seconds"] for r in hit]
    out["characterisation seconds per candidate"] = {"median": round(float(np.median(seconds)), 4), "max": round(float(np.max(seconds)), 4)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-cubes", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=Path("characterisation_cubes.json"))
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cache.exists():
        rows = json.loads(args.cache.read_text())
    else:
        rows = detect_cubes(args.data_dir, args.threshold, args.max_cubes)
        args.cache.write_text(json.dumps(rows))
    result = report(rows)
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

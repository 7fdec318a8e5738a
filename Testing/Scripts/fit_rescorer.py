"""Fit the second-stage rescorer on candidates of the training split and store it in a model's JSON.

    .venv/bin/python Testing/Scripts/fit_rescorer.py --data-dir ../shared/data --model M.json --output M2.json [--seed 0]

Candidates come from the engine itself (``Detector.detect``) at the model's
threshold: on every training-split cube (hit = centre within the radius of
the mask centroid, or of another LUNA16 nodule of the series that lies in the
cube, else a false candidate) and on the training scan(s)
(false unless within 15 mm of an LIDC reader mark, which are left out).
The rescorer's threshold keeps ``--keep`` of the training hits.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from evaluate_model import other_references

from LungNoduleAILib.imageio import read_ct
from LungNoduleAILib.model import ModelSpec, load_model
from LungNoduleAILib.pipeline import Detector
from LungNoduleAILib.rescore import candidate_features, fit_rescorer, score
from LungNoduleAILib.training import lidc_marked_points_lps, validation_series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--scans", default="LIDC-IDRI-0002")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=float, default=0.98, help="fraction of training hits the threshold keeps")
    args = ap.parse_args()
    model = load_model(args.model, "auto")
    model.spec.rescoring = None  # candidates as the network alone gives them
    detector = Detector(model)
    rows = list(csv.DictReader(open(args.data_dir / "cubes" / "cubes.csv", newline="")))
    val = validation_series([r["seriesuid"] for r in rows], 0.15, args.seed)
    neighbours = other_references(args.data_dir, [r for r in rows if r["seriesuid"] not in val])
    X, y = [], []
    for r in rows:
        if r["seriesuid"] in val:
            continue
        ct = read_ct(args.data_dir / "cubes" / r["image"], validate=False)
        mask = sitk.ReadImage(str(args.data_dir / "cubes" / r["mask"]))
        st = sitk.LabelShapeStatisticsImageFilter()
        st.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
        nodules = [(np.array(st.GetCentroid(1)), float(r["diameter_mm"]))] + [(np.array(f.center_mm), f.diameter_mm) for f in neighbours[r["image"]]]
        res = detector.detect(ct, use_lung_mask=False)
        X.append(candidate_features(res.candidates, res.labelmap, res.ct.image, res.probability))
        y += [int(any(np.linalg.norm(np.array(c.center_lps_mm) - centre) <= d / 2 for centre, d in nodules)) for c in res.candidates]
    for case in [s for s in args.scans.split(",") if s]:
        path = args.data_dir / "scans" / f"{case}.nii.gz"
        ct = read_ct(path)
        marks = lidc_marked_points_lps(path.with_name(f"{case}.xml"), sitk.ReadImage(str(path))) if path.with_name(f"{case}.xml").exists() else []
        res = detector.detect(ct)
        feats = candidate_features(res.candidates, res.labelmap, res.ct.image, res.probability)
        for f, c in zip(feats, res.candidates):
            if all(np.linalg.norm(np.array(c.center_lps_mm) - np.array(m)) > 15 for m in marks):
                X.append(f[None])
                y.append(0)
    X = np.concatenate(X)
    y = np.array(y)
    rescorer = fit_rescorer(X, y)
    s = score(rescorer, X)
    rescorer["threshold"] = float(np.quantile(s[y == 1], 1.0 - args.keep))
    rescorer["trained_on"] = {
        "candidates": int(len(y)),
        "hits": int(y.sum()),
        "false": int((y == 0).sum()),
        "keep_hits": args.keep,
        "seed": args.seed,
        "scans": args.scans,
    }
    kept_fp = float(((s >= rescorer["threshold"]) & (y == 0)).sum() / max(1, (y == 0).sum()))
    rescorer["trained_on"]["false_kept_fraction"] = round(kept_fp, 4)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out = ModelSpec.from_json(args.model)
    out.rescoring = rescorer
    shutil.copy(args.model.with_suffix(".pt"), args.output.with_suffix(".pt"))
    out.weights = args.output.with_suffix(".pt").name
    out.to_json(args.output)
    print(json.dumps(rescorer["trained_on"]), "threshold", round(rescorer["threshold"], 4))
    print("coefficients:", dict(zip(rescorer["features"], np.round(rescorer["coef"], 3))))


if __name__ == "__main__":
    main()

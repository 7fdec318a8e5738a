"""Second stage: re-score candidates with a logistic regression on their features.

The network's probability says "this voxel looks like nodule"; the second
stage looks at the whole candidate (size, shape, density, probability
statistics) and gives a candidate-level score. The model is a scikit-learn
``LogisticRegression`` on standardised features, stored as plain numbers in
the model's metadata JSON (no pickle): ``{"features", "mean", "scale",
"coef", "intercept", "threshold"}``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .candidates import Candidate, relabel

__all__ = ["FEATURES", "candidate_features", "fit_rescorer", "apply_rescorer"]

FEATURES = (
    "probability",
    "probability_mean",
    "probability_std",
    "log_volume_mm3",
    "diameter_mm",
    "axial_elongation",
    "bbox_elongation",
    "fill_ratio",
    "mean_hu",
    "hu_std",
    "hu_p10",
    "hu_p90",
)
"""Feature names, in column order."""


def candidate_features(candidates: Sequence[Candidate], labelmap: sitk.Image, ct_hu: sitk.Image, probability: sitk.Image) -> np.ndarray:
    """``(N, len(FEATURES))`` float64 features of candidates (labels = ``candidate.id``) on the CT grid."""
    if not candidates:
        return np.zeros((0, len(FEATURES)))
    lab = sitk.GetArrayViewFromImage(labelmap)
    ct = sitk.GetArrayViewFromImage(ct_hu)
    prob = sitk.GetArrayViewFromImage(probability)
    spacing = np.array(ct_hu.GetSpacing())
    rows = []
    for c in candidates:
        i0, j0, k0, i1, j1, k1 = c.bbox_ijk
        sl = (slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1))
        mask = np.asarray(lab[sl]) == c.id
        hu = np.asarray(ct[sl], dtype=np.float64)[mask]
        p = np.asarray(prob[sl], dtype=np.float64)[mask]
        extent_mm = (np.array([i1 - i0, j1 - j0, k1 - k0]) + 1) * spacing
        rows.append(
            [
                c.probability,
                c.probability_mean,
                float(p.std()) if p.size else 0.0,
                math.log(max(c.volume_mm3, 1e-3)),
                c.diameter_mm,
                c.longest_axial_diameter_mm / max(c.diameter_mm, 1e-3),
                float(extent_mm.max() / max(extent_mm.min(), 1e-3)),
                float(mask.sum() / mask.size),
                c.mean_hu,
                float(hu.std()) if hu.size else 0.0,
                float(np.percentile(hu, 10)) if hu.size else 0.0,
                float(np.percentile(hu, 90)) if hu.size else 0.0,
            ]
        )
    return np.array(rows, dtype=np.float64)


def fit_rescorer(features: np.ndarray, labels: np.ndarray, C: float = 1.0, class_weight: str | None = "balanced") -> dict:
    """Fit the logistic regression; returns the JSON-able description (threshold left to the caller)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=C, class_weight=class_weight, max_iter=2000).fit(scaler.transform(features), labels)
    return {
        "features": list(FEATURES),
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": model.coef_[0].tolist(),
        "intercept": float(model.intercept_[0]),
        "threshold": 0.5,
    }


def score(rescorer: dict, features: np.ndarray) -> np.ndarray:
    """Candidate-level scores in [0, 1] for ``(N, F)`` features."""
    if rescorer["features"] != list(FEATURES):
        raise ValueError(f"Rescorer features {rescorer['features']} differ from this engine's {list(FEATURES)}.")
    z = (features - np.array(rescorer["mean"])) / np.array(rescorer["scale"])
    return 1.0 / (1.0 + np.exp(-(z @ np.array(rescorer["coef"]) + rescorer["intercept"])))


def apply_rescorer(
    rescorer: dict, candidates: list[Candidate], labelmap: sitk.Image, ct_hu: sitk.Image, probability: sitk.Image, threshold: float | None = None
) -> tuple[sitk.Image, list[Candidate]]:
    """Score candidates, drop those under the rescorer's threshold, re-rank by score (labels follow the ranks)."""
    if not candidates:
        return labelmap, candidates
    s = score(rescorer, candidate_features(candidates, labelmap, ct_hu, probability))
    cut = rescorer["threshold"] if threshold is None else threshold
    kept = sorted([(float(v), c) for v, c in zip(s, candidates) if v >= cut], key=lambda t: -t[0])
    for v, c in kept:
        c.score = round(v, 4)
    result = [c for _, c in kept]
    return relabel(labelmap, result), result

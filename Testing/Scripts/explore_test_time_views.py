"""Score other test-time views of a model on the held-out cubes (and the full scans): a diagnostic, not the engine's path.

    PYTHONPATH=LungNoduleAI .venv/bin/python Testing/Scripts/explore_test_time_views.py --data-dir ../shared/data \
        [--model M.json] [--views id,z,y,x,zy,zx,yx,zyx,idT,...] [--scales 1.0,0.8] [--threshold 0.9] [--scans] --output F.json

Each view is a set of flipped axes (``id`` = none, ``z``, ``y``, ``x`` and
their combinations) with an optional ``T`` for swapping the in-plane axes;
each scale resamples the 1 mm volume by that factor before the network (0.8:
as if at 0.8 mm voxels) and the probability back. The probability is the mean
over all views and scales, over the whole volume; candidates, matching and
figures are :mod:`evaluate_model`'s. Views ``id,x`` at scale 1 reproduce the
bundled model's cube figures (a cube is one window, flipped everywhere).
Used for the model card's "more test-time views" note.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import evaluate_model  # noqa: E402

from LungNoduleAILib.pipeline import Detector  # noqa: E402

AXES = {"z": 2, "y": 3, "x": 4}


def parse_view(text: str) -> tuple[list[int], bool]:
    """``'zyT'`` -> (tensor dims to flip, swap y and x)."""
    swap = text.endswith("T")
    name = text[:-1] if swap else text
    if name != "id" and (not name or any(c not in AXES for c in name)):
        raise ValueError(f"View '{text}' is not valid: give id or a combination of z, y, x, optionally followed by T")
    return ([] if name == "id" else [AXES[c] for c in name]), swap


class ViewsPredictor:
    """Stands in for the detector's sliding-window predictor: the mean probability over ``views`` x ``scales``."""

    def __init__(self, network, roi_size, overlap: float, views: list[tuple[list[int], bool]], scales: list[float]):
        self.network, self.roi_size, self.overlap, self.views, self.scales = network, tuple(roi_size), overlap, views, scales
        self._cache: dict[str, np.ndarray] = {}

    def _passes(self, x):
        import torch

        out = []
        for dims, swap in self.views:
            v = x.flip(dims) if dims else x
            v = v.transpose(3, 4) if swap else v
            p = torch.sigmoid(self.network(v.contiguous()))
            p = p.transpose(3, 4) if swap else p
            out.append(p.flip(dims) if dims else p)
        return torch.cat(out, dim=1)  # (B, views, z, y, x)

    def __call__(self, volume: np.ndarray, progress=None, should_cancel=None) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        from monai.inferers import sliding_window_inference

        key = hashlib.sha1(volume.tobytes()).hexdigest()  # a cube runs twice (FROC run and threshold run)
        if key in self._cache:
            return self._cache[key]
        total = []
        for scale in self.scales:
            v = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
            if scale != 1.0:
                v = F.interpolate(v, size=[max(8, int(round(n * scale))) for n in volume.shape], mode="trilinear", align_corners=False)
            shape = v.shape[2:]
            pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(shape, self.roi_size)]
            a = v[0, 0].numpy()
            if any(p for pair in pads for p in pair):
                a = np.pad(a, pads, mode="reflect" if all(max(p) < n for p, n in zip(pads, shape)) else "edge")
            with torch.inference_mode():
                prob = sliding_window_inference(
                    torch.from_numpy(np.ascontiguousarray(a))[None, None], self.roi_size, 1, self._passes, overlap=self.overlap, mode="gaussian"
                )
            prob = prob[(slice(None), slice(None)) + tuple(slice(p[0], p[0] + n) for p, n in zip(pads, shape))]
            if scale != 1.0:
                prob = F.interpolate(prob, size=volume.shape, mode="trilinear", align_corners=False)
            total.append(prob[0])
        out = torch.cat(total).mean(0).numpy().astype(np.float32)
        self._cache = {key: out}
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--views", default="id,x", help="comma-separated views (default: %(default)s, the bundled model's on a cube)")
    ap.add_argument("--scales", default="1.0", help="comma-separated resampling factors (default: %(default)s)")
    ap.add_argument("--threshold", type=float, default=None, help="default: the model's")
    ap.add_argument("--seed", type=int, default=0, help="the training split seed")
    ap.add_argument("--scans", action="store_true", help="also the full scans (slow: every view over the whole lung)")
    ap.add_argument("--output", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        views = [parse_view(v) for v in args.views.split(",")]
        scales = [float(s) for s in args.scales.split(",")]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    detector = Detector(args.model, device="cpu")
    spec = detector.spec
    detector.predictor = ViewsPredictor(detector.model.network, spec.roi_size, spec.overlap, views, scales)
    threshold = spec.threshold if args.threshold is None else args.threshold
    fig = {
        "views": args.views,
        "scales": scales,
        "threshold": threshold,
        "validation_cubes": evaluate_model.evaluate_cubes(detector, args.data_dir, threshold, args.seed, 0.05),
    }
    v = fig["validation_cubes"]
    print(json.dumps({k: v[k] for k in ("sensitivity", "other_candidates_per_cube", "cpm", "cpm_ci95", "sensitivity_at_fp_per_cube")}))
    print(
        json.dumps({k: f"{x['found']}/{x['n']}" for k, x in {**v["sensitivity_by_context"], **v["sensitivity_by_size"], **v["sensitivity_by_density"]}.items()})
    )
    if args.scans:
        fig["full_scans"] = [
            evaluate_model.evaluate_scan(detector, args.data_dir / "scans", c, threshold, 0.05)[0] for c in ("LIDC-IDRI-0001", "LIDC-IDRI-0002")
        ]
        for s in fig["full_scans"]:
            print(s["case"], "false positives", s["false_positives"], "sweep", {t: x["false_positives"] for t, x in s["sweep"].items()})
    args.output.write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

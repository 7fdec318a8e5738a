"""LUNA16-style evaluation of detection results: FROC, CPM, operating point.

Rules (as the LUNA16 challenge defines them):

* a candidate *hits* a reference nodule when its centre lies within the
  nodule's radius (``diameter_mm / 2``) of the nodule's centre (world mm);
* a nodule hit by several candidates counts once, with the highest probability;
  the other hits are neither true nor false positives;
* a candidate that hits no reference nodule but hits an *excluded* finding
  is ignored; every other candidate is a false positive.

FROC: sensitivity against the average number of false positives per scan,
computed with MONAI's ``compute_froc_curve_data``; CPM: mean sensitivity at
1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per scan (``compute_froc_score``),
with a bootstrap 95 % interval over scans.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "LidcMark",
    "lidc_reader_marks",
    "lidc_excluded_findings",
    "write_reference_csv",
    "Finding",
    "ScanResult",
    "match_scan",
    "froc",
    "evaluate",
    "Evaluation",
    "read_reference_csv",
    "read_results",
    "FP_RATES",
]

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class Finding:
    """A reference nodule or an excluded finding: centre (world LPS mm) and diameter (mm)."""

    center_mm: tuple
    diameter_mm: float


@dataclass
class ScanResult:
    """Matched candidates of one scan.

    Attributes:
        name: series UID or case name.
        tp_probs: for each *hit* reference nodule, its highest candidate probability.
        fp_probs: probabilities of the false positives.
        n_nodules: reference nodules in the scan.
    """

    name: str
    tp_probs: list = field(default_factory=list)
    fp_probs: list = field(default_factory=list)
    n_nodules: int = 0


_LIDC_NS = "{http://www.nih.gov}"
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0
"""LUNA16: an excluded finding without a diameter (small nodule, non-nodule) counts as 10 mm wide."""


@dataclass
class LidcMark:
    """One LIDC reader's mark: centre (world LPS mm), diameter (mm; -1 when not outlined) and kind."""

    center_mm: tuple
    diameter_mm: float
    kind: str  # "nodule" (>= 3 mm, outlined), "small nodule" (< 3 mm, a point) or "non-nodule"


def lidc_reader_marks(xml_path: str | os.PathLike, image) -> list[LidcMark]:
    """Every mark of every reading session in an LIDC-IDRI XML, in the world frame of ``image``.

    Pixel coordinates map through ``image``'s geometry (the scan the XML
    belongs to); ``imageZposition`` picks the nearest slice. An outlined
    nodule's diameter is its longest in-plane extent over its contours.
    """
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    zs = np.array([image.TransformIndexToPhysicalPoint([0, 0, k])[2] for k in range(image.GetSize()[2])])
    spacing = image.GetSpacing()

    def to_lps(x: float, y: float, z: float) -> tuple:
        k = int(np.argmin(np.abs(z - zs)))
        return tuple(image.TransformContinuousIndexToPhysicalPoint([x, y, k]))

    marks = []
    for nod in root.iter(_LIDC_NS + "unblindedReadNodule"):
        pts, longest = [], 0.0
        rois = list(nod.iter(_LIDC_NS + "roi"))
        for roi in rois:
            z = float(roi.findtext(_LIDC_NS + "imageZposition"))
            xy = np.array([(float(em.findtext(_LIDC_NS + "xCoord")), float(em.findtext(_LIDC_NS + "yCoord"))) for em in roi.iter(_LIDC_NS + "edgeMap")])
            if xy.size:
                pts += [(x, y, z) for x, y in xy]
                mm = xy * np.asarray(spacing[:2])
                longest = max(longest, float(np.max(np.linalg.norm(mm[:, None] - mm[None], axis=-1))))
        if not pts:
            continue
        outlined = any(len(list(roi.iter(_LIDC_NS + "edgeMap"))) > 1 for roi in rois)
        centre = to_lps(*np.mean(pts, axis=0))
        marks.append(LidcMark(centre, longest if outlined else -1.0, "nodule" if outlined else "small nodule"))
    for nn in root.iter(_LIDC_NS + "nonNodule"):
        z = float(nn.findtext(_LIDC_NS + "imageZposition"))
        locus = nn.find(_LIDC_NS + "locus")
        marks.append(LidcMark(to_lps(float(locus.findtext(_LIDC_NS + "xCoord")), float(locus.findtext(_LIDC_NS + "yCoord")), z), -1.0, "non-nodule"))
    return marks


def lidc_excluded_findings(marks: Sequence[LidcMark], references: Sequence[Finding]) -> list[Finding]:
    """LUNA16's "irrelevant findings": every reader mark that is not part of a reference nodule.

    A mark whose centre lies within a reference nodule's radius belongs to it.
    Marks without a diameter get :data:`EXCLUDED_DEFAULT_DIAMETER_MM`.
    """
    out = []
    for m in marks:
        if _hits(np.asarray(m.center_mm), references):
            continue
        out.append(Finding(tuple(m.center_mm), m.diameter_mm if m.diameter_mm > 0 else EXCLUDED_DEFAULT_DIAMETER_MM))
    return out


def write_reference_csv(findings: dict[str, list[Finding]], path: str | os.PathLike) -> None:
    """Findings per series UID as a LUNA16 CSV (``seriesuid,coordX,coordY,coordZ,diameter_mm``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for uid, items in findings.items():
            for item in items:
                w.writerow([uid, *(f"{v:.3f}" for v in item.center_mm), f"{item.diameter_mm:.2f}"])


def _hits(center: np.ndarray, findings: Sequence[Finding]) -> list[int]:
    return [i for i, f in enumerate(findings) if np.linalg.norm(center - np.asarray(f.center_mm)) <= f.diameter_mm / 2.0]


def match_scan(name: str, candidates: Sequence[dict], nodules: Sequence[Finding], excluded: Sequence[Finding] = ()) -> ScanResult:
    """Apply the LUNA16 matching rules to one scan.

    Args:
        candidates: dicts with ``center_lps_mm`` and ``probability`` (the engine's JSON); a
            second-stage ``score``, when present, ranks the candidates instead.
        nodules: reference nodules.
        excluded: findings that count neither as hit nor as false positive.
    """
    best = {}
    fps = []
    for c in candidates:
        centre = np.asarray(c["center_lps_mm"], dtype=float)
        p = float(c["score"] if c.get("score") is not None else c["probability"])
        hit = _hits(centre, nodules)
        if hit:
            for i in hit:
                best[i] = max(best.get(i, -1.0), p)
        elif not _hits(centre, excluded):
            fps.append(p)
    return ScanResult(name, [best[i] for i in sorted(best)], fps, len(nodules))


def froc(scans: Sequence[ScanResult]) -> tuple[np.ndarray, np.ndarray, float]:
    """FROC curve and CPM over scans.

    Returns:
        ``(fps_per_scan, sensitivity, cpm)``: the curve (thresholds from high to low
        read right to left, as MONAI returns it) and the competition performance metric.
    """
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    tp = np.array([p for s in scans for p in s.tp_probs], dtype=float)
    fp = np.array([p for s in scans for p in s.fp_probs], dtype=float)
    n_targets = sum(s.n_nodules for s in scans)
    if n_targets == 0:
        raise ValueError("No reference nodules in the evaluated scans: FROC needs at least one.")
    # MONAI skips the lowest probability as a threshold: add a floor so every candidate counts.
    fp_ext = np.concatenate([fp, [-1.0]])
    fps, sens = compute_froc_curve_data(fp_ext, np.concatenate([tp, [-1.0]]) if tp.size else np.array([-1.0]), n_targets, len(scans))
    cpm = float(compute_froc_score(fps, sens, FP_RATES))
    return fps, sens, cpm


@dataclass
class Evaluation:
    """Figures of one evaluation (see :func:`evaluate`)."""

    scans: int
    nodules: int
    cpm: float
    cpm_ci95: tuple
    sensitivity_at: dict
    threshold: float
    operating_point: dict
    curve: dict

    def to_dict(self) -> dict:
        return {
            "scans": self.scans,
            "nodules": self.nodules,
            "cpm": round(self.cpm, 4),
            "cpm_ci95": [round(v, 4) for v in self.cpm_ci95],
            "sensitivity_at_fp_per_scan": {str(k): round(v, 4) for k, v in self.sensitivity_at.items()},
            "threshold": self.threshold,
            "operating_point": self.operating_point,
            "curve": self.curve,
        }


def evaluate(scans: Sequence[ScanResult], threshold: float, bootstrap: int = 1000, seed: int = 0) -> Evaluation:
    """FROC, CPM (with a bootstrap 95 % interval over scans) and the figures at ``threshold``.

    The operating point gives sensitivity and false positives per scan at
    ``threshold`` and scikit-learn's precision, recall and F1 over findings
    (a hit nodule is a true positive, a missed nodule a false negative, a
    false positive candidate a false positive).
    """
    from monai.metrics import compute_froc_score
    from sklearn.metrics import precision_recall_fscore_support

    fps, sens, cpm = froc(scans)
    sensitivity_at = {r: float(np.interp(r, fps[::-1], sens[::-1])) for r in FP_RATES}
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        sample = [scans[i] for i in rng.integers(0, len(scans), len(scans))]
        if sum(s.n_nodules for s in sample) == 0:
            continue
        f, s, _ = froc(sample)
        boot.append(float(compute_froc_score(f, s, FP_RATES)))
    ci = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if boot else (cpm, cpm)
    n_nodules = sum(s.n_nodules for s in scans)
    tp = sum(sum(p >= threshold for p in s.tp_probs) for s in scans)
    fp = sum(sum(p >= threshold for p in s.fp_probs) for s in scans)
    y_true = [1] * n_nodules + [0] * fp
    y_pred = [1] * tp + [0] * (n_nodules - tp) + [1] * fp
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="binary", zero_division=0)
    op = {
        "sensitivity": round(tp / n_nodules, 4),
        "fp_per_scan": round(fp / len(scans), 4),
        "true_positives": int(tp),
        "false_positives": int(fp),
        "missed": int(n_nodules - tp),
        "precision": round(float(precision), 4),
        "recall": round(float(recall), 4),
        "f1": round(float(f1), 4),
    }
    curve = {"fp_per_scan": [round(float(v), 4) for v in fps], "sensitivity": [round(float(v), 4) for v in sens]}
    return Evaluation(len(scans), n_nodules, cpm, ci, sensitivity_at, threshold, op, curve)


def read_reference_csv(path: str | os.PathLike) -> dict[str, list[Finding]]:
    """LUNA16 CSV (``seriesuid,coordX,coordY,coordZ,diameter_mm``) -> findings per series."""
    out: dict[str, list[Finding]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"seriesuid", "coordX", "coordY", "coordZ"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"'{path}' lacks column(s) {sorted(missing)}: a LUNA16 CSV has seriesuid,coordX,coordY,coordZ,diameter_mm.")
        for row in reader:
            try:
                d = float(row.get("diameter_mm") or 0.0)
                centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
                if not np.all(np.isfinite([*centre, d])):  # an infinite diameter would count every candidate as a hit
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(
                    f"'{path}' line {reader.line_num}: coordX, coordY, coordZ and diameter_mm must be numbers (finite, mm), got "
                    f"{[row.get(k) for k in ('coordX', 'coordY', 'coordZ', 'diameter_mm')]}."
                ) from None
            if d < 0:  # LUNA16: excluded findings without a size count as 10 mm
                d = EXCLUDED_DEFAULT_DIAMETER_MM
            out.setdefault(row["seriesuid"], []).append(Finding(centre, d))
    return out


def read_results(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """The engine's ``*_nodules.json`` files (folders are searched) keyed by every name they answer to.

    A result is matched to references by its DICOM series UID, else by its
    input name (file name without extensions).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*_nodules.json")) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"No *_nodules.json results found in {[str(p) for p in paths]}.")
    out: dict[str, dict] = {}
    for f in files:
        if not f.is_file():
            raise ValueError(f"Result '{f}' does not exist: give the *_nodules.json files (or their folders) that 'lungnoduleai detect' wrote.")
        try:
            report = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"Result '{f}' is not JSON ({exc}): give the *_nodules.json files that 'lungnoduleai detect' wrote, not its CSV or images."
            ) from None
        if (
            not isinstance(report, dict)
            or not isinstance(report.get("input"), dict)
            or "name" not in report["input"]
            or not isinstance(report.get("candidates"), list)
        ):
            raise ValueError(
                f"Result '{f}' is JSON but not a detection result (it needs 'input' with a 'name' and a 'candidates' list): give the *_nodules.json files "
                "that 'lungnoduleai detect' wrote."
            )
        report["_file"] = str(f)
        key = report["input"].get("series_uid") or report["input"]["name"]
        if key in out:
            raise ValueError(f"Results '{out[key]['_file']}' and '{f}' are both for '{key}': each scan may be evaluated once; leave one of them out.")
        out[key] = report
    return out


def scans_from_references(
    results: dict[str, dict], references: dict[str, list[Finding]], excluded: dict[str, list[Finding]] | None = None, names: dict[str, str] | None = None
) -> tuple[list[ScanResult], list[str]]:
    """Match result files to reference scans; returns the matched scans and notes (unmatched names).

    Args:
        results: from :func:`read_results`.
        references: nodules per series UID.
        excluded: excluded findings per series UID.
        names: optional map from a result's name (e.g. ``LIDC-IDRI-0001``) to its series UID.
    """
    excluded = excluded or {}
    names = names or {}
    scans, notes = [], []
    seen = set()
    for key, report in results.items():
        uid = names.get(key, key)
        seen.add(uid)
        scans.append(match_scan(key, report["candidates"], references.get(uid, []), excluded.get(uid, [])))
    if references and not seen & set(references):
        raise ValueError(
            f"None of the {len(results)} result(s) ({', '.join(sorted(results)[:3])}{' ...' if len(results) > 3 else ''}) is a series of the annotations "
            f"({', '.join(sorted(references)[:3])}{' ...' if len(references) > 3 else ''}), so no reference nodule is left to find. Results match by their "
            "DICOM series UID, or else by input name: for results from NIfTI/NRRD files give a series map (case,seriesuid; --series-map)."
        )
    missing = sorted(set(references) - seen)
    if missing:
        notes.append(f"{len(missing)} annotated scan(s) have no result and are not evaluated: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return scans, notes


def scans_from_cubes(results: dict[str, dict], cubes_csv: str | os.PathLike) -> tuple[list[ScanResult], list[str]]:
    """Cube mode: each cube's reference nodule sits at the cube's centre, radius from ``cubes.csv``.

    Results are matched to cubes by input name (the cube image's file name
    without extension); other candidates in a cube are false positives, except
    those on the nodule of another cube of the same series (``seriesuid``)
    whose centre lies in this cube: as LUNA16 counts hits on any reference
    nodule, they count neither as hit nor as false positive.
    """
    rows = {}
    with open(cubes_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image", "diameter_mm"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"'{cubes_csv}' lacks column(s) {sorted(missing)}: a cubes CSV has image,mask,seriesuid,diameter_mm (as shared/data/cubes/cubes.csv)."
            )
        for row in reader:
            try:
                diameter = float(row["diameter_mm"])
                if not np.isfinite(diameter) or diameter <= 0:
                    raise ValueError
                rows[Path(row["image"]).name.split(".")[0]] = (diameter, row.get("seriesuid") or "")
            except (TypeError, ValueError):
                raise ValueError(
                    f"'{cubes_csv}' line {reader.line_num}: diameter_mm must be a positive finite number (mm), got {row.get('diameter_mm')!r}."
                ) from None
    cubes, notes = [], []
    for key, report in results.items():
        name = report["input"]["name"]
        if name not in rows:
            notes.append(f"result '{name}' is not a cube in {cubes_csv}; skipped")
            continue
        size = np.array(report["input"]["size_ijk"], dtype=float)
        spacing = np.array(report["input"]["spacing_mm"], dtype=float)
        direction = np.array(report["input"]["direction"], dtype=float).reshape(3, 3)
        origin = np.array(report["input"]["origin_lps_mm"], dtype=float)
        centre = origin + direction @ (spacing * (size - 1) / 2.0)
        cubes.append((name, report, Finding(tuple(centre), rows[name][0]), rows[name][1], (origin, direction * spacing, size)))
    if not cubes:
        raise ValueError(f"No result matches a cube listed in {cubes_csv}.")
    scans = []
    for name, report, nodule, series, (origin, axes, size) in cubes:
        neighbours = []
        for other, _, finding, other_series, _ in cubes:
            if other != name and series and other_series == series:
                index = np.linalg.solve(axes, np.asarray(finding.center_mm) - origin)
                if np.all(index >= -0.5) and np.all(index <= size - 0.5):
                    neighbours.append(finding)
        scans.append(match_scan(name, report["candidates"], [nodule], neighbours))
    return scans, notes


def report_paths(output_dir: str | os.PathLike) -> dict[str, Path]:
    """Where :func:`write_report` writes: ``evaluation.json``, ``froc.csv``, ``froc.png``."""
    out = Path(output_dir)
    return {"json": out / "evaluation.json", "csv": out / "froc.csv", "png": out / "froc.png"}


def write_report(evaluation: Evaluation, output_dir: str | os.PathLike, title: str = "", overwrite: bool = False, out=None) -> dict[str, Path]:
    """``evaluation.json``, ``froc.csv`` and ``froc.png`` in ``output_dir``, all or none.

    Args:
        overwrite: replace an earlier evaluation (refused otherwise, ``FileExistsError``).
        out: an :class:`.outputset.OutputSet` of :func:`report_paths` entered before the work
            (so that an existing or unwritable output is refused first); default: one made here.
    """
    from .outputset import OutputSet, output_error

    if out is None:
        with OutputSet(report_paths(output_dir), overwrite, name="evaluation") as own:
            return write_report(evaluation, output_dir, title, overwrite, own)
    try:
        _write_report_files(evaluation, {k: out.tmp(k) for k in out.targets}, title)
    except (OSError, RuntimeError) as exc:
        raise output_error(out.folder, exc) from exc
    return out.commit()


def _write_report_files(evaluation: Evaluation, paths: dict[str, Path], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths["json"].write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n", encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["fp_per_scan", "sensitivity"])
        for rate, sens in evaluation.sensitivity_at.items():
            w.writerow([rate, f"{sens:.4f}"])
        w.writerow(["CPM", f"{evaluation.cpm:.4f}"])
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    fps, sens = np.array(evaluation.curve["fp_per_scan"]), np.array(evaluation.curve["sensitivity"])
    keep = fps > 0
    ax.plot(fps[keep], sens[keep], "-", color="tab:blue", label=f"CPM {evaluation.cpm:.3f} [{evaluation.cpm_ci95[0]:.3f}, {evaluation.cpm_ci95[1]:.3f}]")
    ax.plot(list(evaluation.sensitivity_at), list(evaluation.sensitivity_at.values()), "o", color="tab:orange")
    op = evaluation.operating_point
    ax.plot([max(op["fp_per_scan"], 1 / 16)], [op["sensitivity"]], "*", ms=12, color="tab:red", label=f"p >= {evaluation.threshold:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, 16)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or f"FROC: {evaluation.scans} scans, {evaluation.nodules} nodules", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)

"""The ``lungnoduleai`` command line: detect, demo, evaluate, export, train, pack, average.

Exit status: 0 all inputs processed; 1 at least one input failed (the
others were still processed); 2 bad command line; 3 cancelled (Ctrl-C);
4 the output could not be written (not a folder, read-only, disk full).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from .cli_compare import add_compare, run_compare
from .cli_train import add_average, add_pack, add_train, run_average, run_pack, run_train
from .protocol import EVENT_PREFIXES, emit

__all__ = ["main", "build_parser", "EXIT_OUTPUT"]

EXIT_OUTPUT = 4
"""Exit status when the output location cannot be written (the input may be fine)."""

# Rough share of each stage in a run, to turn stages into one fraction.
_STAGE_SPAN = {
    "read": (0.0, 0.05),
    "preprocess": (0.05, 0.15),
    "lung mask": (0.15, 0.2),
    "inference": (0.2, 0.85),
    "candidates": (0.85, 0.93),
    "write": (0.93, 1.0),
}


class _Progress:
    """Turns ``progress(done, total, stage)`` callbacks into a tqdm bar or machine-readable lines."""

    def __init__(self, lines: bool, inputs: int):
        self.lines = lines
        self.inputs = inputs
        self.index = 0
        self.name = ""
        self.start = time.monotonic()
        self.bar = None
        self.last_line = 0.0

    def begin(self, index: int, name: str) -> None:
        self.index, self.name, self.start = index, name, time.monotonic()
        if not self.lines and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=f"[{index + 1}/{self.inputs}] {name}", unit="%", leave=True, bar_format="{l_bar}{bar}| {postfix}")

    def __call__(self, done: int, total: int, stage: str) -> None:
        lo, hi = _STAGE_SPAN.get(stage, (0.0, 1.0))
        frac = lo + (hi - lo) * (done / total if total else 0.0)
        if self.lines:
            now = time.monotonic()
            if now - self.last_line >= 0.2 or done == total:
                self.last_line = now
                msg = {
                    "input": self.index,
                    "inputs": self.inputs,
                    "name": self.name,
                    "stage": stage,
                    "done": done,
                    "total": total,
                    "fraction": round(frac, 4),
                    "elapsed_s": round(now - self.start, 2),
                }
                emit("progress", msg)
        elif self.bar is not None:
            self.bar.n = int(frac * 100)
            self.bar.set_postfix_str(stage)
            self.bar.refresh()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _add_detect(sub) -> None:
    p = sub.add_parser(
        "detect",
        help="detect nodules in CT volumes",
        description="Detect lung nodule candidates in one or more chest CTs (NIfTI, NRRD, MHA/MHD files or DICOM series folders). "
        "Writes per input: <name>_probability.nrrd, <name>_candidates.nrrd, <name>.seg.nrrd, <name>_nodules.csv, <name>_nodules.json "
        "(and <name>_overview.png with --png). A bad input is reported and skipped; the exit status is 1 if any input failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="CT file or DICOM folder")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the outputs (created if missing)")
    _add_common_detect(p)
    g = p.add_argument_group("patient (Brock risk; DICOM inputs give age and sex from their header, these options take precedence)")
    g.add_argument("--patient-age", type=float, default=None, metavar="YEARS", help="the patient's age")
    g.add_argument("--patient-sex", choices=["F", "M"], default=None, help="the patient's sex")
    g.add_argument("--family-history", action="store_true", help="a first-degree relative had lung cancer")
    g.add_argument("--spiculated", default="", metavar="ID,...", help="candidate ids (ranks) the reader calls spiculated")


def _add_common_detect(p) -> None:
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs; auto = CUDA when available (default: %(default)s)"
    )
    p.add_argument("--threshold", type=float, default=None, help="probability threshold for candidates (default: the model's)")
    p.add_argument("--model", default=None, help="model metadata .json (default: the bundled model)")
    p.add_argument("--no-lung-mask", action="store_true", help="search the whole volume instead of the lungs' bounding box")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--png", action="store_true", help="also write <name>_overview.png")
    p.add_argument(
        "--progress-lines",
        action="store_true",
        help=f"print machine-readable progress lines ('{EVENT_PREFIXES['progress'].strip()} {{json}}') instead of a progress bar",
    )


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run detection on the bundled sample CT",
        description="Detect nodules in the sample chest CT that ships with LungNoduleAI and write all outputs (with the overview PNG).",
    )
    p.add_argument("-o", "--output-dir", default="demo-output", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--keep", action="store_true", help="keep existing outputs (default: replace them)")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="LUNA16-style FROC/CPM of detection results",
        description="Score *_nodules.json results against LUNA16-format references (seriesuid,coordX,coordY,coordZ,diameter_mm) "
        "or, with --cubes, against nodule cubes (one reference at each cube's centre). Writes evaluation.json, froc.csv and froc.png.",
    )
    p.add_argument("results", nargs="+", help="*_nodules.json files or folders holding them")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--annotations", help="LUNA16 reference CSV")
    ref.add_argument("--cubes", help="cubes.csv (cube mode)")
    p.add_argument("--excluded", help="LUNA16 CSV of findings that count neither as hit nor as false positive")
    p.add_argument("--series-map", help="CSV with columns case,seriesuid mapping result names to series UIDs")
    p.add_argument("--threshold", type=float, default=None, help="operating point (default: the threshold stored in the results)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CPM interval")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --output-dir")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export reviewed nodules (DICOM SEG and SR, NIfTI labels, CSV, JSON)",
        description="Turn a reviewed segmentation (.seg.nrrd from Slicer or from lungnoduleai detect) and its source CT into export files: "
        "<name>_reviewed_seg.dcm (DICOM SEG), <name>_reviewed_sr.dcm (DICOM SR, TID 1500 measurements), <name>_reviewed_labels.nii.gz, "
        "<name>_reviewed_nodules.csv/.json and <name>_reviewed.seg.nrrd. Accepted segments are exported; rejected ones never.",
    )
    p.add_argument("segmentation", metavar="REVIEWED.seg.nrrd", help="reviewed segmentation file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dicom", metavar="SOURCE_DIR", help="the CT's DICOM series folder (needed for dcm-seg and dcm-sr)")
    src.add_argument("--ct", metavar="FILE", help="the CT as a NIfTI/NRRD/MHA file (no DICOM formats then)")
    p.add_argument("-o", "--output-dir", required=True, help="folder for the files (created if missing)")
    p.add_argument("--formats", default=None, help="comma-separated, any of seg.nrrd,nii.gz,csv,json,dcm-seg,dcm-sr (default: all that the CT allows)")
    p.add_argument("--include-pending", action="store_true", help="also export segments not yet reviewed or flagged (rejected ones never)")
    p.add_argument(
        "--probability", metavar="FILE", help="the detection's _probability.nrrd: write a fractional (probability) DICOM SEG instead of a binary one"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files")


def _run_export(args) -> int:
    from .export import OptionError, export_reviewed
    from .outputset import OutputError

    try:
        written = export_reviewed(
            args.segmentation,
            args.output_dir,
            dicom=args.dicom,
            ct_path=args.ct,
            formats=args.formats.split(",") if args.formats else None,
            include_pending=args.include_pending,
            overwrite=args.overwrite,
            probability_path=args.probability,
        )
    except (OptionError, OutputError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, OptionError) else EXIT_OUTPUT if isinstance(exc, OutputError) else 1
    for kind, path in written.items():
        print(f"{kind:9s} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungnoduleai", description="Lung nodule detection in chest CT (LungNoduleAI engine).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_detect(sub)
    _add_demo(sub)
    _add_evaluate(sub)
    _add_export(sub)
    add_compare(sub)
    add_train(sub)
    add_pack(sub)
    add_average(sub)
    return parser


def _run_detect(args, inputs=None, png=None, overwrite=None) -> int:
    from .model import read_model_spec
    from .pipeline import Detector

    inputs = inputs or args.inputs
    png = args.png if png is None else png
    overwrite = args.overwrite if overwrite is None else overwrite
    lines = getattr(args, "progress_lines", False)
    model = args.model if hasattr(args, "model") else None
    try:
        spec = read_model_spec(model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        print(f"error: --threshold {args.threshold} is outside (0, 1); give a probability such as {spec.threshold}.", file=sys.stderr)
        return 2
    if getattr(args, "patient_age", None) is not None and not 0 < args.patient_age < 130:
        print(f"error: --patient-age {args.patient_age} is not an age in years.", file=sys.stderr)
        return 2
    if getattr(args, "spiculated", "") and not all(v.strip().isdigit() for v in args.spiculated.split(",")):
        print(f"error: --spiculated takes candidate ids separated by commas (e.g. 1,3), got '{args.spiculated}'.", file=sys.stderr)
        return 2
    print(f"model {spec.name} {spec.version} (device: {args.device})", flush=True)
    detector = Detector(model, args.device, background=True)  # the network loads while the first CT is read and prepared
    try:
        return _detect_inputs(detector, args, inputs, png, overwrite, lines)
    finally:
        detector.join()


def _patient_inputs(args):
    """The Brock inputs given on the command line (each marked as such), ``None`` when none was."""
    from .exam import PatientInputs

    patient, source = PatientInputs(), "command line"
    if getattr(args, "patient_age", None) is not None:
        patient.age, patient.sources["age"] = args.patient_age, source
    if getattr(args, "patient_sex", None):
        patient.sex, patient.sources["sex"] = args.patient_sex, source
    if getattr(args, "family_history", False):
        patient.family_history, patient.sources["family_history"] = True, source
    if getattr(args, "spiculated", ""):
        patient.spiculated, patient.sources["spiculated"] = [int(v) for v in args.spiculated.split(",") if v.strip()], source
    return patient if patient.sources else None


def _detect_inputs(detector, args, inputs, png, overwrite, lines) -> int:
    from .inference import DetectionCancelled
    from .outputset import OutputError

    progress = _Progress(lines, len(inputs))
    failed = []
    for i, path in enumerate(inputs):
        progress.begin(i, Path(path).name)
        try:
            result = detector.detect_to_files(
                path,
                args.output_dir,
                args.threshold,
                not getattr(args, "no_lung_mask", False),
                overwrite,
                png,
                progress,
                patient=_patient_inputs(args),
            )
        except KeyboardInterrupt:
            progress.end()
            print("cancelled: no partial outputs were left.", file=sys.stderr)
            return 3
        except DetectionCancelled:
            progress.end()
            return 3
        except OutputError as exc:  # the output, not this input: every further input would fail alike
            progress.end()
            print(f"error: {exc}", file=sys.stderr, flush=True)
            if lines:
                emit("error", {"input": str(path), "error": str(exc)})
            return EXIT_OUTPUT
        except (ValueError, FileExistsError, OSError, RuntimeError) as exc:
            progress.end()
            if detector.load_failed:  # the model, not this input: every input would fail alike
                print(f"error: {exc}", file=sys.stderr, flush=True)
                if lines:  # what the Slicer module shows as the reason
                    emit("error", {"input": str(path), "error": str(exc)})
                return 2
            failed.append(path)
            print(f"error: {path}: {exc}", file=sys.stderr, flush=True)
            if lines:
                emit("error", {"input": str(path), "error": str(exc)})
            continue
        progress.end()
        for note in result.notes:
            print(f"note: {path}: {note}", flush=True)
        _print_summary(result)
        if lines:
            emit("model", {"input": str(path), "model": detector.spec.name, "version": detector.spec.version, "device": result.device})
            emit("result", {"input": str(path), "json": str(result.outputs["json"]), "candidates": len(result.candidates)})
    if failed:
        print(f"{len(failed)} of {len(inputs)} inputs failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


def _print_summary(result) -> None:
    total = sum(result.timings_s.values())
    print(f"{result.ct.name}: {len(result.candidates)} candidate(s) at p >= {result.threshold:g} in {total:.1f} s ({result.device})")
    for c in result.candidates[:10]:
        r = c.center_ras_mm
        print(f"  #{c.rank}: p={c.probability:.2f}  {c.diameter_mm:5.1f} mm  {c.volume_mm3:8.0f} mm3  RAS ({r[0]:.1f}, {r[1]:.1f}, {r[2]:.1f})")
    if len(result.candidates) > 10:
        print(f"  ... {len(result.candidates) - 10} more (see the CSV)")
    folder = next(iter(result.outputs.values())).parent if result.outputs else None
    if folder is not None:
        print(f"  outputs in {folder}/: " + ", ".join(p.name for p in result.outputs.values()))


def _run_demo(args) -> int:
    from .sample import sample_ct_path

    sample = sample_ct_path()
    print(f"Sample CT: {sample}")
    args.threshold = None
    args.model = None
    return _run_detect(args, inputs=[str(sample)], png=True, overwrite=not args.keep)


def _run_evaluate(args) -> int:
    import contextlib

    from .evaluate import report_paths
    from .outputset import OutputError, OutputSet

    with contextlib.ExitStack() as stack:
        try:  # the output is checked and reserved before the work
            output = stack.enter_context(OutputSet(report_paths(args.output_dir), args.overwrite, name="evaluation"))
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OutputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_OUTPUT
        return _evaluate_into(args, output)


def _evaluate_into(args, output) -> int:
    import csv as _csv

    from .evaluate import evaluate, read_reference_csv, read_results, scans_from_cubes, scans_from_references, write_report
    from .outputset import OutputError

    try:
        results = read_results(args.results)
        if args.cubes:
            scans, notes = scans_from_cubes(results, args.cubes)
        else:
            names = {}
            if args.series_map:
                with open(args.series_map, newline="", encoding="utf-8") as f:
                    reader = _csv.DictReader(f)
                    if not {"case", "seriesuid"} <= set(reader.fieldnames or []):
                        raise ValueError(
                            f"--series-map '{args.series_map}' has columns {reader.fieldnames}; it needs case,seriesuid (a result's input name, its series "
                            "UID)."
                        )
                    names = {r["case"]: r["seriesuid"] for r in reader}
            scans, notes = scans_from_references(
                results, read_reference_csv(args.annotations), read_reference_csv(args.excluded) if args.excluded else None, names
            )
        threshold = args.threshold if args.threshold is not None else float(next(iter(results.values())).get("threshold", 0.5))
        ev = evaluate(scans, threshold, args.bootstrap)
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    try:
        paths = write_report(ev, args.output_dir, out=output)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    print(f"{ev.scans} scans, {ev.nodules} nodules: CPM {ev.cpm:.3f} (95% CI {ev.cpm_ci95[0]:.3f}-{ev.cpm_ci95[1]:.3f})")
    print("FP/scan     " + "  ".join(f"{r:>6g}" for r in ev.sensitivity_at))
    print("sensitivity " + "  ".join(f"{v:6.3f}" for v in ev.sensitivity_at.values()))
    op = ev.operating_point
    print(
        f"at p >= {threshold:g}: sensitivity {op['sensitivity']:.3f}, {op['fp_per_scan']:.2f} FP/scan, precision {op['precision']:.3f}, recall "
        f"{op['recall']:.3f}, F1 {op['f1']:.3f}"
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _terminate(signum, frame):  # SIGTERM (e.g. Cancel in Slicer): unwind so temporary files are removed
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with trained and averaged models
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {
        "detect": _run_detect,
        "demo": _run_demo,
        "evaluate": _run_evaluate,
        "export": _run_export,
        "compare": run_compare,
        "train": run_train,
        "pack": run_pack,
        "average": run_average,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

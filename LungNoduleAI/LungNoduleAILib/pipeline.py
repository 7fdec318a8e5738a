"""The detection pipeline: read -> preprocess -> lung crop -> infer -> candidates -> write.

``Detector`` loads a model once and processes volumes; ``detect`` is the
function form for a single volume. Progress is reported as
``progress(done, total, stage)`` and ``should_cancel()`` is polled between
steps and between sliding windows.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import __version__
from .candidates import Candidate, find_candidates, lung_mask_on_grid
from .exam import EMPHYSEMA_LAA_PERCENT, LungGeometry, PatientInputs, apply_brock, emphysema_laa_percent, exam_lung_rads, patient_from_dicom
from .imageio import CTVolume, read_ct
from .inference import DetectionCancelled, SlidingWindowPredictor
from .model import LoadedModel, load_model, read_model_spec
from .outputset import choose_output_name, output_error, source_key
from .preprocess import lung_crop, orient_lps, resample_to_spacing, scale_intensity
from .writers import (
    PROBABILITY_SCALE,
    OutputSet,
    output_paths,
    quantize_probability,
    write_candidates_csv,
    write_json,
    write_labelmap,
    write_overview_png,
    write_probability,
    write_segmentation,
)

__all__ = ["DetectionResult", "Detector", "detect", "DetectionCancelled", "STAGES"]

log = logging.getLogger(__name__)

STAGES = ("read", "preprocess", "lung mask", "inference", "candidates", "write")
"""Stage names passed to progress callbacks, in order."""


@dataclass
class DetectionResult:
    """What a detection run produced.

    Attributes:
        ct: the input volume.
        probability_u8: probabilities on the CT grid as uint8, p = value / 255 (what the
            probability file stores; a quarter of the memory of float32 for a long CT).
        labelmap: uint16 labelmap on the CT grid, label i = candidate of rank i.
        candidates: ranked candidates.
        threshold: probability threshold used.
        device: torch device used.
        timings_s: seconds per stage.
        lung_found: whether the lung crop was used.
        notes: remarks for the user (warnings, chosen DICOM series...).
        outputs: written files keyed by kind (after :meth:`Detector.detect_to_files`).
        exam: per-exam findings (``lung_rads``, ``emphysema``, ``patient``; :meth:`Detector._findings`).
    """

    ct: CTVolume
    probability_u8: sitk.Image
    labelmap: sitk.Image
    candidates: list[Candidate]
    threshold: float
    device: str
    timings_s: dict[str, float] = field(default_factory=dict)
    lung_found: bool = False
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    exam: dict = field(default_factory=dict)

    @property
    def probability(self) -> sitk.Image:
        """float32 probabilities (0-1) on the CT grid (from :attr:`probability_u8`, as the probability file reads back)."""
        return sitk.Cast(self.probability_u8, sitk.sitkFloat32) * PROBABILITY_SCALE

    def report(self, model: LoadedModel) -> dict:
        """The JSON contract (``<name>_nodules.json``)."""
        return {
            "engine": {"name": "LungNoduleAI", "version": __version__},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "input": {"path": os.path.abspath(self.ct.path), "name": self.ct.name, **self.ct.identity()},
            "model": {"name": model.spec.name, "version": model.spec.version, "sha256": model.sha256, "path": os.path.abspath(model.path)},
            "device": self.device,
            "threshold": self.threshold,
            "lung_mask": {"used": self.lung_found},
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "notes": self.notes,
            **self.exam,
            "outputs": {k: p.name for k, p in self.outputs.items()},
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _covering_index_box(image: sitk.Image, reference: sitk.Image) -> tuple[list[int], list[int]]:
    """Index box ``[lo, hi)`` (x, y, z) of ``reference`` that covers ``image``'s extent (plus one voxel)."""
    size = image.GetSize()
    corners = []
    for i in (-0.5, size[0] - 0.5):
        for j in (-0.5, size[1] - 0.5):
            for k in (-0.5, size[2] - 0.5):
                p = image.TransformContinuousIndexToPhysicalPoint((i, j, k))
                corners.append(reference.TransformPhysicalPointToContinuousIndex(p))
    c = np.array(corners)
    ref_size = np.array(reference.GetSize())
    lo = np.clip(np.floor(c.min(axis=0)).astype(int) - 1, 0, ref_size - 1)
    hi = np.clip(np.ceil(c.max(axis=0)).astype(int) + 2, lo + 1, ref_size)
    return lo.tolist(), hi.tolist()


def _paste_into(sub: sitk.Image, reference: sitk.Image, lo: list[int], pixel_type: int) -> sitk.Image:
    """A zero image on ``reference``'s grid with ``sub`` (a sub-grid starting at index ``lo``) pasted in."""
    full = sitk.Image(reference.GetSize(), pixel_type)
    full.CopyInformation(reference)
    return sitk.Paste(full, sitk.Cast(sub, pixel_type), sub.GetSize(), [0, 0, 0], [int(v) for v in lo])


def _candidate_box(probability: sitk.Image, lung: sitk.Image | None, threshold: float, spec) -> tuple[slice, ...]:
    """The box (plus 2 voxels) of the voxels at or above the lower of ``threshold`` and the model's segment
    threshold, inside ``lung`` (uint8 0/1 on ``probability``'s grid; ``None``: everywhere): nothing outside
    it can belong to a candidate, so :func:`.candidates.extract_candidates` on it gives the same candidates.

    Returns:
        Slices ``(i, j, k)`` of the box on ``probability``'s grid.
    """
    low = min(threshold, spec.segment_threshold) if spec.segment_threshold is not None else threshold
    arr = sitk.GetArrayViewFromImage(probability)
    keep = sitk.GetArrayViewFromImage(lung) if lung is not None else None
    hits, rows, cols = np.zeros(arr.shape[0], bool), np.zeros(arr.shape[1], bool), np.zeros(arr.shape[2], bool)
    for k in range(arr.shape[0]):  # slice by slice: no mask of the whole volume
        above = arr[k] >= low
        if keep is not None:
            above &= keep[k] > 0
        if above.any():
            hits[k] = True
            rows |= above.any(axis=1)
            cols |= above.any(axis=0)
    if not hits.any():
        lo, hi = [0, 0, 0], [1, 1, 1]
    else:
        lo = [max(0, int(np.argmax(a)) - 2) for a in (cols, rows, hits)]
        hi = [min(s, len(a) - int(np.argmax(a[::-1])) + 2) for s, a in zip(probability.GetSize(), (cols, rows, hits))]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


@dataclass
class _Run:
    """One detection's input, settings, callbacks, timings and notes, carried from stage to stage."""

    ct: CTVolume
    threshold: float
    progress: Callable[[int, int, str], None] | None
    should_cancel: Callable[[], bool] | None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    patient: PatientInputs | None = None

    def stage(self, name: str) -> None:
        """Enter stage ``name``: stop if cancelled, else report it."""
        if self.should_cancel is not None and self.should_cancel():
            raise DetectionCancelled("Detection cancelled by the user.")
        if self.progress is not None:
            self.progress(0, 1, name)


@dataclass
class _Crop:
    """Where the network looks: ``slices`` ``(z, y, x)`` of the resampled grid; the lung mask when lungs were found."""

    slices: tuple[slice, ...]
    found: bool
    mask: sitk.Image | None


class Detector:
    """Load a model once, detect nodules in many volumes.

    Args:
        model: a :class:`LoadedModel`, or a metadata path (``None`` = bundled model).
        device: ``auto|cpu|cuda`` (ignored when ``model`` is already loaded).
        background: load the network (importing torch and MONAI, several
            seconds on a CPU) in a thread, so that reading and preparing the
            first CT overlap it; :attr:`spec` is there at once, :attr:`model`
            and :attr:`predictor` wait for the load. The model files are
            checked before the constructor returns either way.

    Raises:
        ValueError: the model files are missing, or (without ``background``;
            with it, on first use of :attr:`model`) the weights do not fit or
            the device is not available.
    """

    def __init__(self, model: LoadedModel | str | os.PathLike | None = None, device: str = "auto", background: bool = False):
        self._model: LoadedModel | None = None
        self._predictor = None
        self._load_error: BaseException | None = None
        self._loading: threading.Thread | None = None
        self._names_used: dict[tuple[str, str], str] = {}  # (folder, name) -> source key of what this detector wrote there
        if isinstance(model, LoadedModel):
            self._model = model
        elif background:
            self.spec = read_model_spec(model)  # missing files: refused now, not after the CT was read
            self._loading = threading.Thread(target=self._load, args=(model, device), name="LungNoduleAI model loading", daemon=True)
            self._loading.start()
        else:
            self._model = load_model(model, device)
        if self._model is not None:
            self.spec = self._model.spec

    def _load(self, model, device: str) -> None:
        try:
            self._model = load_model(model, device)
        except BaseException as exc:  # re-raised in the caller's thread by `model`
            self._load_error = exc

    @property
    def model(self) -> LoadedModel:
        """The loaded model (waits for a background load; re-raises its error)."""
        self.join()
        if self._load_error is not None:
            raise self._load_error
        return self._model

    def join(self) -> None:
        """Wait for a background load to end, without raising its error (e.g. before the process exits)."""
        if self._loading is not None:
            self._loading.join()
            self._loading = None

    @property
    def load_failed(self) -> bool:
        """Whether loading the model (in the background) failed: every detection would fail alike."""
        return self._load_error is not None

    @property
    def predictor(self):
        """``predictor(volume, progress, should_cancel) -> probability``: the model's sliding-window predictor unless replaced."""
        if self._predictor is None:
            model, spec = self.model, self.spec
            self._predictor = SlidingWindowPredictor(
                model.network, spec.roi_size, spec.overlap, model.device, flip_axes=spec.tta_flips, flip_min_probability=spec.tta_min_probability
            )
        return self._predictor

    @predictor.setter
    def predictor(self, value) -> None:
        self._predictor = value

    def detect(
        self,
        ct: CTVolume | sitk.Image,
        threshold: float | None = None,
        use_lung_mask: bool = True,
        progress: Callable[[int, int, str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        patient: PatientInputs | None = None,
    ) -> DetectionResult:
        """Detect nodule candidates in a CT (HU) and characterise them (type, sizes, Lung-RADS, location, Brock risk).

        Args:
            ct: a :class:`CTVolume` or a SimpleITK image in HU.
            threshold: probability threshold (default: the model's).
            use_lung_mask: restrict inference to the lungs' bounding box.
            progress: ``progress(done, total, stage)``; for stages other than
                inference ``done``/``total`` are 0/1 then 1/1.
            should_cancel: return True to stop (raises :class:`DetectionCancelled`).
            patient: Brock inputs given by the caller; they take precedence over the DICOM header's.
        """
        if isinstance(ct, sitk.Image):
            ct = CTVolume(image=ct, path="<memory>", name="volume")
        threshold = self.spec.threshold if threshold is None else float(threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"Threshold {threshold} is outside (0, 1); give a probability such as {self.spec.threshold}.")
        run = _Run(ct, threshold, progress, should_cancel, notes=list(ct.notes), patient=patient)
        resampled = self._preprocess(run)
        crop = self._lung_crop(run, resampled, use_lung_mask)
        prob_ct, labelmap, cands = self._candidates(run, self._infer(run, resampled, crop), crop)
        exam = self._findings(run, resampled, crop, cands)
        if progress is not None:
            progress(1, 1, "candidates")
        return DetectionResult(ct, prob_ct, labelmap, cands, threshold, self.model.device, run.timings, crop.found, run.notes, exam=exam)

    def _findings(self, run: _Run, resampled: sitk.Image, crop: _Crop, cands: list[Candidate]) -> dict:
        """Per-exam findings (:mod:`.exam`): each candidate's location and pleural distance, emphysema, the
        patient's inputs (DICOM header, then the caller's), Brock risk per candidate, the exam's Lung-RADS category."""
        t = time.perf_counter()
        laa = None
        if crop.mask is not None:
            geometry = LungGeometry(crop.mask)
            for c in cands:
                c.location = geometry.location(c.center_lps_mm)
                c.pleural_distance_mm = geometry.pleural_distance_mm(c.center_lps_mm)
            laa = emphysema_laa_percent(resampled, crop.mask)
        patient = PatientInputs()
        if run.ct.dicom is not None and run.ct.dicom.files:
            try:
                patient = patient_from_dicom(run.ct.dicom.files[0])
            except Exception as exc:  # a header pydicom cannot read: no inputs from it, said
                run.notes.append(f"Patient age and sex could not be read from the DICOM header ({exc}); give them for the Brock risk.")
        if run.patient is not None:
            patient = patient.merged(run.patient)
        emphysema = None if laa is None else laa >= EMPHYSEMA_LAA_PERCENT
        apply_brock(cands, patient, bool(emphysema))
        if patient.age is None or patient.sex is None:
            run.notes.append("No Brock risk: the patient's age or sex is unknown (give --patient-age and --patient-sex).")
        run.timings["findings"] = time.perf_counter() - t
        return {
            "lung_rads": exam_lung_rads(cands),
            "emphysema": {"laa950_percent": laa, "present": emphysema, "cut_off_percent": EMPHYSEMA_LAA_PERCENT},
            "patient": patient.to_dict(),
        }

    def _preprocess(self, run: _Run) -> sitk.Image:
        """Stage "preprocess": the CT in LPS at the model's voxel spacing."""
        run.stage("preprocess")
        t = time.perf_counter()
        oriented = orient_lps(run.ct.image)
        resampled = resample_to_spacing(oriented, self.spec.spacing_mm, sitk.sitkLinear, -1000.0)
        del oriented
        run.timings["preprocess"] = time.perf_counter() - t
        return resampled

    def _lung_crop(self, run: _Run, resampled: sitk.Image, use_lung_mask: bool) -> _Crop:
        """Stage "lung mask": the lungs' box on the resampled grid (the whole grid without ``use_lung_mask`` or lungs)."""
        run.stage("lung mask")
        t = time.perf_counter()
        if use_lung_mask:
            crop = lung_crop(resampled, self.spec.lung_margin_mm)
            if not crop.found:
                run.notes.append("No plausible lung found: the whole volume was searched.")
            result = _Crop(crop.slices(), crop.found, crop.mask if crop.found else None)
        else:
            result = _Crop(tuple(slice(0, s) for s in reversed(resampled.GetSize())), False, None)
        run.timings["lung_mask"] = time.perf_counter() - t
        return result

    def _infer(self, run: _Run, resampled: sitk.Image, crop: _Crop) -> sitk.Image:
        """Stage "inference": the network's probabilities in the crop, as an image on the resampled grid's geometry."""
        run.stage("inference")
        if self._loading is not None:  # a background load not finished yet: its wait is not inference
            t = time.perf_counter()
            self.model
            run.timings["model_load_wait"] = time.perf_counter() - t
        t = time.perf_counter()
        arr = sitk.GetArrayViewFromImage(resampled)
        volume = scale_intensity(np.asarray(arr[crop.slices]), self.spec.hu_window)
        prob_crop = self.predictor(volume, run.progress, run.should_cancel)
        run.timings["inference"] = time.perf_counter() - t
        z0, y0, x0 = (r.start for r in crop.slices)
        image = sitk.GetImageFromArray(prob_crop)
        image.SetSpacing(resampled.GetSpacing())
        image.SetDirection(resampled.GetDirection())
        image.SetOrigin(resampled.TransformIndexToPhysicalPoint((x0, y0, z0)))
        return image

    def _candidates(self, run: _Run, prob_crop_img: sitk.Image, crop: _Crop) -> tuple[sitk.Image, sitk.Image, list[Candidate]]:
        """Stage "candidates": probability (uint8) and labelmap on the CT grid, and the ranked candidates (:func:`.candidates.find_candidates`).

        Works on the part of the CT grid that the (cropped) probability covers; zero elsewhere.
        """
        run.stage("candidates")
        t = time.perf_counter()
        spec, ct = self.spec, run.ct
        lo, hi = _covering_index_box(prob_crop_img, ct.image)
        sub_size = [b - a for a, b in zip(lo, hi)]  # the CT's sub-grid [lo, hi), resampled onto without copying the CT's voxels
        prob_sub = sitk.Resample(
            prob_crop_img, sub_size, sitk.Transform(), sitk.sitkLinear,
            ct.image.TransformIndexToPhysicalPoint(lo), ct.image.GetSpacing(), ct.image.GetDirection(), 0.0, sitk.sitkFloat32,
        )  # fmt: skip
        del prob_crop_img
        lung_sub = lung_mask_on_grid(crop.mask, prob_sub) if crop.mask is not None and spec.restrict_to_lung else None  # p counts only inside
        if spec.rescoring:  # the second stage looks around its candidates: the whole sub-grid
            box = tuple(slice(0, n) for n in sub_size)
        else:  # the box of the voxels that can be part of a candidate: the same candidates, a fraction of the memory
            box = _candidate_box(prob_sub, lung_sub, run.threshold, spec)
        prob_u8 = quantize_probability(prob_sub)
        p_box = prob_sub[box]
        if lung_sub is not None:
            prob_u8, p_box = sitk.Mask(prob_u8, lung_sub), sitk.Mask(p_box, lung_sub[box])
        del prob_sub, lung_sub  # before the connected components: the float map of the whole lung is not needed any more
        start = [a + b.start for a, b in zip(lo, box)]
        ct_box = ct.image[tuple(slice(a, a + b.stop - b.start) for a, b in zip(start, box))]
        labelmap_box, cands = find_candidates(p_box, ct_box, run.threshold, spec)
        del p_box, ct_box
        for c in cands:
            c.bbox_ijk = [v + start[i % 3] for i, v in enumerate(c.bbox_ijk)]
            c.center_ijk = [round(v + start[i], 3) for i, v in enumerate(c.center_ijk)]
        prob_ct = _paste_into(prob_u8, ct.image, lo, sitk.sitkUInt8)
        del prob_u8
        labelmap = _paste_into(labelmap_box, ct.image, start, sitk.sitkUInt16)
        run.timings["candidates"] = time.perf_counter() - t
        return prob_ct, labelmap, cands

    def detect_to_files(
        self,
        path: str | os.PathLike,
        output_dir: str | os.PathLike,
        threshold: float | None = None,
        use_lung_mask: bool = True,
        overwrite: bool = False,
        png: bool = False,
        progress: Callable[[int, int, str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        patient: PatientInputs | None = None,
    ) -> DetectionResult:
        """Read ``path`` (file or DICOM folder), detect, and write all outputs to ``output_dir``.

        Files appear only when every one was written (the ``_nodules.json`` last);
        existing files are refused unless ``overwrite``. A name that already belongs
        to another CT in ``output_dir`` (an earlier result, a run going on, an
        earlier input of this detector) gets a short hash of the source appended
        (:func:`.outputset.choose_output_name`), so two patients' ``CT`` folders never
        replace each other's results.

        Raises:
            ValueError: the input is not a usable CT.
            FileExistsError: existing files without ``overwrite``, or another run writing the same name.
            OutputError: ``output_dir`` cannot be written (not a folder, read-only, disk full).
        """
        if progress is not None:
            progress(0, 1, "read")
        t = time.perf_counter()
        ct = read_ct(path)
        identity = ct.identity()
        read_s = time.perf_counter() - t
        name = choose_output_name(output_dir, ct.name, identity, self._names_used)
        targets = output_paths(output_dir, name, png)
        with OutputSet(targets, overwrite, name=name, source=source_key(identity)) as out:  # reserves the name, refuses existing files before the work
            result = self.detect(ct, threshold, use_lung_mask, progress, should_cancel, patient)
            result.timings_s = {"read": read_s, **result.timings_s}
            result.notes = out.notes + result.notes
            if name != ct.name:
                result.notes.append(f"Results named '{name}': '{ct.name}' in {output_dir} already holds another CT's results.")
            if should_cancel is not None and should_cancel():
                raise DetectionCancelled("Detection cancelled by the user.")
            if progress is not None:
                progress(0, 1, "write")
            t = time.perf_counter()
            try:
                write_probability(result.probability_u8, out.tmp("probability"))
                write_labelmap(result.labelmap, out.tmp("labelmap"))
                model = f"{self.model.spec.name} {self.model.spec.version}"
                write_segmentation(result.labelmap, result.candidates, out.tmp("segmentation"), model=model, source=identity)
                write_candidates_csv(result.candidates, out.tmp("csv"))
                if png:
                    write_overview_png(ct.image, result.probability_u8, result.labelmap, result.candidates, out.tmp("png"), title=ct.name)
                result.outputs = dict(targets)
                result.timings_s["write"] = time.perf_counter() - t
                write_json(result.report(self.model), out.tmp("json"))
            except (OSError, RuntimeError) as exc:  # disk full, file size limit, ITK's write errors
                raise output_error(Path(output_dir), exc) from exc
            if should_cancel is not None and should_cancel():
                raise DetectionCancelled("Detection cancelled by the user.")
            result.outputs = out.commit()
            self._names_used[(str(Path(output_dir).resolve()), name)] = source_key(identity)
        if progress is not None:
            progress(1, 1, "write")
        return result


def detect(
    ct: CTVolume | sitk.Image,
    model: LoadedModel | str | os.PathLike | None = None,
    device: str = "auto",
    threshold: float | None = None,
    use_lung_mask: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> DetectionResult:
    """Function form of :meth:`Detector.detect` (loads the model each call)."""
    return Detector(model, device).detect(ct, threshold, use_lung_mask, progress, should_cancel)

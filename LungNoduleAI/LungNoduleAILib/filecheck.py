"""Checks on an image file's own header and data that the image readers skip.

ITK reads a truncated NIfTI (plain or gzip) without an error, filling the
missing slices with 0 HU; it turns NaN voxels of a float NIfTI into 0; and it
takes a spacing of 1.0 mm where the header has 0 or none. Each of these
gives wrong measurements without a word, so :func:`check_image_file` reads
the header itself and refuses such a file before it is read as an image.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["check_image_file"]

_CHUNK_BYTES = 1 << 24
_NIFTI_FLOAT = {16: np.float32, 64: np.float64}
"""NIfTI datatype codes of float voxels (NaN possible) and their numpy types."""


def check_image_file(path: str | os.PathLike) -> None:
    """Refuse a NIfTI, NRRD or MetaImage file whose header or data would be read wrong.

    NIfTI (``.nii``, ``.nii.gz``; NIfTI-1 and -2): the file must hold every
    voxel its header announces (a gzip stream must also end properly), float
    voxels must not be NaN, and the voxel spacing (``pixdim``, or the
    ``sform`` rows when ``sform_code`` > 0) must be positive. NRRD and
    MetaImage: the header must give a spacing (``space directions``/``spacings``,
    ``ElementSpacing``/``ElementSize``). Other files pass unchanged.

    Raises:
        ValueError: naming the file, what is wrong and what to do.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(p)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_text_header(p, "NRRD", ("space directions", "spacings"), ":")
    elif name.endswith((".mha", ".mhd")):
        _check_text_header(p, "MetaImage", ("ElementSpacing", "ElementSize"), "=")


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return (gzip.open(path, "rb") if gz else open(path, "rb")), gz


def _nifti_header(head: bytes, path: Path) -> dict:
    """The fields of a NIfTI-1 or NIfTI-2 header that decide how voxels are read."""
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            return {
                "dim": dim,
                "datatype": struct.unpack(endian + "h", head[70:72])[0],
                "bitpix": struct.unpack(endian + "h", head[72:74])[0],
                "pixdim": struct.unpack(endian + "8f", head[76:108]),
                "vox_offset": struct.unpack(endian + "f", head[108:112])[0],
                "sform_code": struct.unpack(endian + "h", head[254:256])[0],
                "srow": [struct.unpack(endian + "4f", head[o : o + 16]) for o in (280, 296, 312)],
                "single_file": head[344:347] == b"n+1",
                "endian": endian,
            }
        if size == 540 and len(head) >= 540:
            return {
                "dim": struct.unpack(endian + "8q", head[16:80]),
                "datatype": struct.unpack(endian + "h", head[12:14])[0],
                "bitpix": struct.unpack(endian + "h", head[14:16])[0],
                "pixdim": struct.unpack(endian + "8d", head[104:168]),
                "vox_offset": struct.unpack(endian + "q", head[168:176])[0],
                "sform_code": struct.unpack(endian + "i", head[348:352])[0],
                "srow": [struct.unpack(endian + "4d", head[o : o + 32]) for o in (400, 432, 464)],
                "single_file": head[4:7] == b"n+2",
                "endian": endian,
            }
    raise ValueError(f"Cannot read '{path}' as a NIfTI image (its header size is neither 348 nor 540 bytes): give a CT as NIfTI, NRRD, MHA or DICOM.")


def _check_nifti(path: Path) -> None:
    stream, gz = _open(path)
    with stream:
        try:
            head = stream.read(540)
            hdr = _nifti_header(head, path)
            ndim = int(hdr["dim"][0])
            if not 1 <= ndim <= 7:
                raise ValueError(f"'{path}': NIfTI header gives {ndim} dimensions; the file is damaged or not a NIfTI image.")
            n_voxels = int(np.prod([max(int(d), 1) for d in hdr["dim"][1 : ndim + 1]]))
            if hdr["sform_code"] > 0:
                spacing = [float(np.linalg.norm([row[c] for row in hdr["srow"]])) for c in range(3)]
                where = "sform rows"
            else:
                spacing = [float(v) for v in hdr["pixdim"][1:4]]
                where = "pixdim[1..3]"
            if not all(np.isfinite(s) and s > 0 for s in spacing[: min(ndim, 3)]):
                raise ValueError(
                    f"'{path}': the NIfTI header's voxel spacing ({where} = {[round(s, 4) for s in spacing]} mm) is zero, negative or missing, "
                    "so the size of every nodule would be wrong. Re-export the CT from its DICOM series with its spacing."
                )
            if not hdr["single_file"]:
                return  # .hdr/.img pair: the voxels are in another file
            expected = n_voxels * abs(int(hdr["bitpix"])) // 8
            dtype = _NIFTI_FLOAT.get(int(hdr["datatype"]))
            if dtype is not None:
                dtype = np.dtype(dtype).newbyteorder(hdr["endian"])
            got, nans = _read_voxels(stream, head, int(hdr["vox_offset"]), expected, dtype)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno is not None:
                raise
            raise ValueError(
                f"'{path}' is truncated or damaged ({'gzip stream' if gz else 'file'}: {exc}); the missing voxels would be read as 0 HU. "
                "Copy or export the CT again."
            ) from exc
    if got < expected:
        raise ValueError(
            f"'{path}' is truncated: its header announces {n_voxels} voxels ({expected} bytes) but the file holds {got} bytes of them "
            f"({100.0 * got / expected:.1f} %); the missing voxels would be read as 0 HU. Copy or export the CT again."
        )
    if nans:
        raise ValueError(
            f"'{path}' contains NaN values ({nans} voxels); a CT in HU is needed. Replace them (e.g. with -1000 HU outside the body) or re-export the CT."
        )


def _read_voxels(stream, head: bytes, vox_offset: int, expected: int, dtype) -> tuple[int, int]:
    """Read the voxel bytes after the header: ``(bytes read, NaN voxels among the first expected bytes)``."""
    skip = max(0, vox_offset - len(head))
    while skip:
        step = stream.read(min(skip, _CHUNK_BYTES))
        if not step:
            return 0, 0
        skip -= len(step)
    pending = head[vox_offset:]
    got, nans = 0, 0
    while True:
        if dtype is not None and got < expected:
            take = min(len(pending), expected - got) // dtype.itemsize * dtype.itemsize
            nans += int(np.isnan(np.frombuffer(pending[:take], dtype)).sum())
            got, pending = got + take, pending[take:]
        if dtype is None or got >= expected:
            got, pending = got + len(pending), b""
        chunk = stream.read(_CHUNK_BYTES)
        if not chunk:
            return got + len(pending), nans
        pending += chunk


def _check_text_header(path: Path, kind: str, spacing_keys: tuple[str, ...], separator: str) -> None:
    """A NRRD or MetaImage header must state a spacing; ITK would take 1.0 mm otherwise."""
    stream, _ = _open(path)
    with stream:
        head = stream.read(65536)
    lines = head.split(b"\n\n", 1)[0].decode("latin-1", "replace").splitlines() if kind == "NRRD" else head.decode("latin-1", "replace").splitlines()
    keys = set()
    for line in lines:
        if separator in line:
            keys.add(line.split(separator, 1)[0].strip().lower())
        if kind == "MetaImage" and line.strip().lower().startswith("elementdatafile"):
            break
    if keys and not keys & {k.lower() for k in spacing_keys}:
        raise ValueError(
            f"'{path}': the {kind} header gives no voxel spacing ({' or '.join(spacing_keys)}), so it would be read at 1.0 mm and every "
            "nodule measured wrong. Re-export the CT with its spacing."
        )

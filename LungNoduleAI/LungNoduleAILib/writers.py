"""Writing detection results: probability map, labelmap, Slicer .seg.nrrd, CSV, JSON, PNG; and reading a Slicer .seg.nrrd back.

Every writer takes a target path; :class:`.outputset.OutputSet` gathers a
run's files in a temporary folder next to the targets and moves them into
place only when all were written (``commit``), so a cancelled, failed or
killed run leaves no partial files and never overwrites unless asked.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .candidates import Candidate
from .outputset import OutputError, OutputSet
from .protocol import OUTPUT_SUFFIXES
from .provenance import SOURCE_HEADER_KEY, header_identity, identity_from_tags, identity_tags, image_grid
from .review import NODULE_TERMINOLOGY, SEGMENT_COLORS, TAG_DETECTED, segment_color, segment_id, segment_name, segment_tags

__all__ = [
    "OUTPUT_SUFFIXES",
    "OutputSet",
    "OutputError",
    "output_paths",
    "write_probability",
    "write_labelmap",
    "write_segmentation",
    "write_segmentation_labelmap",
    "read_segmentation",
    "SegmentationFile",
    "write_candidates_csv",
    "write_json",
    "write_overview_png",
    "segment_tags",
    "mask_sha1",
    "NODULE_TERMINOLOGY",
    "SEGMENT_COLORS",
]

PROBABILITY_SCALE = 1.0 / 255.0
"""Probability = stored uint8 value x PROBABILITY_SCALE."""
PROBABILITY_SCALE_KEY = "LungNoduleAI.ProbabilityScale"
"""Header key of the probability file holding :data:`PROBABILITY_SCALE`."""


def output_paths(output_dir: str | os.PathLike, name: str, png: bool = False) -> dict[str, Path]:
    """Final paths of one input's outputs, keyed like :data:`OUTPUT_SUFFIXES`."""
    out = Path(output_dir)
    return {k: out / f"{name}{suffix}" for k, suffix in OUTPUT_SUFFIXES.items() if png or k != "png"}


def quantize_probability(probability: sitk.Image) -> sitk.Image:
    """Float probabilities (0-1) as uint8, value = round(p x 255): what the probability file stores."""
    if probability.GetPixelID() == sitk.sitkUInt8:
        return probability
    arr = sitk.GetArrayViewFromImage(probability)
    out = np.empty(arr.shape, np.uint8)
    for k in range(arr.shape[0]):  # slice by slice: no float copies of a whole long CT
        out[k] = np.clip(np.round(np.asarray(arr[k]) * 255.0), 0, 255)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(probability)
    return img


def write_probability(probability: sitk.Image, path: str | os.PathLike) -> None:
    """Probability map as compressed uint8 NRRD (value x 1/255); the scale is in the header.

    Args:
        probability: float probabilities (0-1), or already quantized by :func:`quantize_probability`.
    """
    img = sitk.Image(quantize_probability(probability))  # a copy shares the buffer until changed: the metadata below stay on it
    img.SetMetaData(PROBABILITY_SCALE_KEY, repr(PROBABILITY_SCALE))
    img.SetMetaData("LungNoduleAI.Quantity", "nodule probability")
    sitk.WriteImage(img, str(path), useCompression=True)


def read_probability(path: str | os.PathLike) -> sitk.Image:
    """Read a probability map written by :func:`write_probability` as float32 0-1."""
    img = sitk.ReadImage(str(path))
    scale = float(img.GetMetaData(PROBABILITY_SCALE_KEY)) if img.HasMetaDataKey(PROBABILITY_SCALE_KEY) else 1.0
    return sitk.Cast(img, sitk.sitkFloat32) * scale


def write_labelmap(labelmap: sitk.Image, path: str | os.PathLike) -> None:
    """Candidates labelmap (label i = candidate of rank i) as compressed NRRD/NIfTI."""
    sitk.WriteImage(labelmap, str(path), useCompression=True)


def mask_sha1(mask: np.ndarray, bbox: Sequence[int]) -> str:
    """Fingerprint of a segment as detected: its voxel bounding box ``[i0, j0, k0, i1, j1, k1]`` and cropped mask.

    Stored as tag ``LungNoduleAI.DetectedMaskSha1``; a segment whose voxels no
    longer give the same fingerprint was edited by the annotator.
    """
    h = hashlib.sha1(np.asarray(bbox, dtype=np.int64).tobytes())
    h.update(np.packbits(np.asarray(mask).astype(bool)).tobytes())
    return h.hexdigest()


def detected_fingerprint(labelmap_zyx: np.ndarray, candidate: Candidate) -> str:
    """:func:`mask_sha1` of ``candidate`` in the candidates labelmap (array ``(k, j, i)``)."""
    i0, j0, k0, i1, j1, k1 = candidate.bbox_ijk
    return mask_sha1(np.asarray(labelmap_zyx[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1]) == candidate.id, candidate.bbox_ijk)


def write_segmentation(
    labelmap: sitk.Image, candidates: Sequence[Candidate], path: str | os.PathLike, model: str | None = None, source: dict | None = None
) -> None:
    """A Slicer segmentation file (``.seg.nrrd``): one segment per candidate.

    All segments share one layer (candidates never overlap); segment i has
    label value i, a name with size and probability, a colour, the SNOMED
    "Nodule" terminology, review status "not started" and custom tags
    (``model``, "name version", identifies the detector in DICOM exports).
    ``source`` (:func:`.provenance.source_identity` of the CT) is recorded in
    the header and in each segment's tags, so an export can check its CT.
    """
    arr = sitk.GetArrayViewFromImage(labelmap)
    source_tags = identity_tags(source) if source else {}
    segments = [
        {
            "id": segment_id(c),
            "name": segment_name(c),
            "color": segment_color(i),
            "label": c.rank,
            "tags": {**segment_tags(c, model=model), TAG_DETECTED: detected_fingerprint(arr, c), **source_tags},
        }
        for i, c in enumerate(candidates)
    ]
    write_segmentation_labelmap(labelmap, segments, path, source)


def write_segmentation_labelmap(labelmap: sitk.Image, segments: Sequence[dict], path: str | os.PathLike, source: dict | None = None) -> None:
    """Write a one-layer Slicer ``.seg.nrrd`` from a labelmap and segment descriptions.

    Args:
        labelmap: integer image; segment ``s`` holds the voxels equal to ``s["label"]``.
        segments: dicts with ``id``, ``name``, ``color`` (r, g, b in 0-1), ``label`` and
            ``tags`` (a dict of Slicer segment tags, e.g. ``Segmentation.Status``, ``TerminologyEntry``).
        path: output file (``.seg.nrrd``).
        source: the CT's identity, stored as header key ``LungNoduleAI.Source`` (JSON).
    """
    pixel = sitk.sitkUInt8 if max((s["label"] for s in segments), default=0) < 256 else sitk.sitkUInt16
    img = sitk.Image(sitk.Cast(labelmap, pixel))  # in ITK, no numpy copies of a long CT's labelmap
    for key in img.GetMetaDataKeys():
        img.EraseMetaData(key)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(img)
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    if source:
        img.SetMetaData(SOURCE_HEADER_KEY, json.dumps(source, separators=(",", ":")))
    for i, seg in enumerate(segments):
        prefix = f"Segment{i}_"
        if stats.HasLabel(int(seg["label"])):
            x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(int(seg["label"]))
            extent = f"{x0} {x0 + sx - 1} {y0} {y0 + sy - 1} {z0} {z0 + sz - 1}"
        else:
            extent = "0 -1 0 -1 0 -1"
        img.SetMetaData(prefix + "ID", str(seg["id"]))
        img.SetMetaData(prefix + "Name", str(seg["name"]))
        img.SetMetaData(prefix + "NameAutoGenerated", "0")
        img.SetMetaData(prefix + "Color", " ".join(f"{v:.6f}" for v in seg["color"]))
        img.SetMetaData(prefix + "ColorAutoGenerated", "0")
        img.SetMetaData(prefix + "Extent", extent)
        img.SetMetaData(prefix + "Layer", "0")
        img.SetMetaData(prefix + "LabelValue", str(int(seg["label"])))
        img.SetMetaData(prefix + "Tags", "|".join(f"{k}:{v}" for k, v in seg["tags"].items()) + "|")
    sitk.WriteImage(img, str(path), useCompression=True)


CSV_COLUMNS = [
    "id",
    "rank",
    "probability",
    "probability_mean",
    "center_lps_x_mm",
    "center_lps_y_mm",
    "center_lps_z_mm",
    "center_ras_x_mm",
    "center_ras_y_mm",
    "center_ras_z_mm",
    "volume_mm3",
    "diameter_mm",
    "longest_axial_diameter_mm",
    "mean_hu",
    "voxels",
    "score",
    "type",
    "long_axis_mm",
    "short_axis_mm",
    "mean_diameter_mm",
    "solid_component_mean_diameter_mm",
    "solid_component_volume_mm3",
    "lung_rads",
    "side",
    "zone",
    "pleural_distance_mm",
    "brock_risk",
]


def _cell(value, fmt: str = "") -> str:
    """A CSV cell: empty for a value not known (``None``)."""
    return "" if value is None else format(value, fmt)


def write_candidates_csv(candidates: Sequence[Candidate], path: str | os.PathLike, reader_overrides: Sequence[dict | None] | None = None) -> None:
    """One row per candidate with the columns in ``CSV_COLUMNS`` (units in the names).

    Args:
        reader_overrides: for a reviewed export, what the reader set on each candidate instead of the engine
            (:func:`.review.reader_overrides`): adds a ``reader_overrides`` column such as ``type=non-solid;spiculated=yes``.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS + (["reader_overrides"] if reader_overrides is not None else []))
        for n, c in enumerate(candidates):
            w.writerow(
                [
                    c.id,
                    c.rank,
                    f"{c.probability:.4f}",
                    f"{c.probability_mean:.4f}",
                    *[f"{v:.2f}" for v in c.center_lps_mm],
                    *[f"{v:.2f}" for v in c.center_ras_mm],
                    f"{c.volume_mm3:.1f}",
                    f"{c.diameter_mm:.2f}",
                    f"{c.longest_axial_diameter_mm:.2f}",
                    f"{c.mean_hu:.1f}",
                    c.voxels,
                    _cell(c.score, ".4f"),
                    _cell(c.type),
                    _cell(c.long_axis_mm, ".1f"),
                    _cell(c.short_axis_mm, ".1f"),
                    _cell(c.mean_diameter_mm, ".1f"),
                    _cell(c.solid_component_mean_diameter_mm, ".1f"),
                    _cell(c.solid_component_volume_mm3, ".1f"),
                    _cell(c.lung_rads),
                    _cell((c.location or {}).get("side")),
                    _cell((c.location or {}).get("zone")),
                    _cell(c.pleural_distance_mm, ".1f"),
                    _cell(c.brock_risk, ".4f"),
                    *([_overrides_cell(reader_overrides[n])] if reader_overrides is not None else []),
                ]
            )


def _overrides_cell(overrides: dict | None) -> str:
    return ";".join(f"{k}={('yes' if v else 'no') if isinstance(v, bool) else v}" for k, v in (overrides or {}).items())


def write_json(report: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def write_overview_png(
    ct_hu: sitk.Image,
    probability: sitk.Image,
    labelmap: sitk.Image,
    candidates: Sequence[Candidate],
    path: str | os.PathLike,
    max_panels: int = 4,
    title: str = "",
) -> None:
    """Axial slices through the top candidates: CT (lung window), probability overlay, outlines, labels.

    Images are shown in radiological convention (patient's right on the left, anterior up).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct = sitk.DICOMOrient(ct_hu, "LPS")
    prob = sitk.DICOMOrient(probability, "LPS")
    lab = sitk.DICOMOrient(labelmap, "LPS")
    ct_a, prob_a, lab_a = (sitk.GetArrayViewFromImage(i) for i in (ct, prob, lab))
    sx, sy, _ = ct.GetSpacing()
    shown = list(candidates[:max_panels])
    n = max(1, len(shown))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    for ax, c in zip(axes[0], shown or [None]):
        if c is None:
            k = ct_a.shape[0] // 2
        else:
            k = int(round(ct.TransformPhysicalPointToContinuousIndex(c.center_lps_mm)[2]))
            k = min(max(k, 0), ct_a.shape[0] - 1)
        extent = (0, ct_a.shape[2] * sx, ct_a.shape[1] * sy, 0)
        ax.imshow(ct_a[k], cmap="gray", vmin=-1350, vmax=150, extent=extent, interpolation="bilinear")
        p = np.asarray(prob_a[k]) * (PROBABILITY_SCALE if prob_a.dtype == np.uint8 else 1.0)
        p = np.ma.masked_less(p, 0.1)
        ax.imshow(p, cmap="hot", vmin=0, vmax=1, alpha=0.45, extent=extent, interpolation="nearest")
        sl = np.asarray(lab_a[k])
        for other in candidates:
            if (sl == other.id).any():
                color = segment_color(other.rank - 1)
                ax.contour((sl == other.id).astype(float), levels=[0.5], colors=[color], linewidths=1.2, extent=extent, origin="upper")
        if c is None:
            ax.set_title("No candidates above the threshold", fontsize=10)
        else:
            ci, cj, _ = ct.TransformPhysicalPointToContinuousIndex(c.center_lps_mm)
            ax.annotate(
                str(c.rank),
                xy=(ci * sx, cj * sy),
                xytext=(ci * sx + 18, cj * sy - 18),
                color="yellow",
                fontsize=11,
                arrowprops={"color": "yellow", "arrowstyle": "-", "lw": 1},
            )
            ax.set_title(f"#{c.rank}: p={c.probability:.2f}, {c.diameter_mm:.1f} mm, slice {k}", fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)


@dataclass
class SegmentationFile:
    """A Slicer segmentation file.

    Attributes:
        layers: one label image per layer (LPS geometry of the file).
        segments: dicts with ``id``, ``name``, ``color``, ``layer``, ``label`` and ``tags``, in file order.
        extent_offset: voxel offset ``(i, j, k)`` of the file's first voxel in
            the reference image (Slicer crops files to their content).
    """

    layers: list
    segments: list = field(default_factory=list)
    extent_offset: tuple = (0, 0, 0)
    source: dict | None = None

    def mask(self, index: int) -> np.ndarray:
        """Boolean ``(k, j, i)`` mask of segment ``index`` on its layer's grid."""
        seg = self.segments[index]
        return sitk.GetArrayViewFromImage(self.layers[seg["layer"]]) == seg["label"]

    def bbox(self, index: int) -> list[int] | None:
        """``[i0, j0, k0, i1, j1, k1]`` of segment ``index``'s voxels on the file's grid (``None`` when empty)."""
        nz = np.argwhere(self.mask(index))
        if nz.size == 0:
            return None
        (k0, j0, i0), (k1, j1, i1) = nz.min(0), nz.max(0)
        return [int(i0), int(j0), int(k0), int(i1), int(j1), int(k1)]

    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix from the file's voxel index ``(i, j, k)`` to LPS mm."""
        layer = self.layers[0]
        m = np.eye(4)
        m[:3, :3] = np.asarray(layer.GetDirection()).reshape(3, 3) * np.asarray(layer.GetSpacing())
        m[:3, 3] = layer.GetOrigin()
        return m

    def reference_grid(self) -> dict:
        """Spacing, direction and origin of the grid the segmentation was drawn on (the file may be cropped to its segments)."""
        grid = image_grid(self.layers[0])
        grid["origin_lps_mm"] = (self.index_to_lps() @ np.array([-v for v in self.extent_offset] + [1.0]))[:3].tolist()
        return grid

    def recorded_source(self, what: str) -> dict | None:
        """The CT identity the file records: its header key, else its segments' tags (a file saved by Slicer keeps only those)."""
        return self.source or identity_from_tags((s["tags"] for s in self.segments), what)


def _parse_tags(text: str) -> dict:
    tags = {}
    for item in text.split("|"):
        if ":" in item:
            k, v = item.split(":", 1)
            tags[k] = v
    return tags


def read_segmentation(path: str | os.PathLike) -> SegmentationFile:
    """Read a ``.seg.nrrd`` written by Slicer or by this engine.

    Raises:
        ValueError: the file is missing, not an image, or has no segment metadata.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"Segmentation file '{p}' does not exist.")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ValueError(f"Cannot read '{p}' as a segmentation (.seg.nrrd): {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from exc
    keys = set(img.GetMetaDataKeys())
    if "Segment0_ID" not in keys and "Segment0_Name" not in keys:
        raise ValueError(
            f"'{p}' has no segment metadata (Segment0_...): it is an image, not a Slicer segmentation. "
            "Give the .seg.nrrd saved from Slicer or written by lungnoduleai detect/export."
        )
    if img.GetNumberOfComponentsPerPixel() > 1:
        layers = [sitk.VectorIndexSelectionCast(img, i) for i in range(img.GetNumberOfComponentsPerPixel())]
    else:
        layers = [img]
    layers = [sitk.Cast(layer, sitk.sitkUInt16) for layer in layers]
    offset = (0, 0, 0)
    if "Segmentation_ReferenceImageExtentOffset" in keys:
        try:
            offset = tuple(int(v) for v in img.GetMetaData("Segmentation_ReferenceImageExtentOffset").split()[:3])
        except ValueError:
            pass
    segments = []
    i = 0
    while f"Segment{i}_ID" in keys or f"Segment{i}_Name" in keys:

        def get(name, default=""):
            key = f"Segment{i}_{name}"
            return img.GetMetaData(key) if key in keys else default

        try:
            color = tuple(float(v) for v in get("Color", "1 0 0").split()[:3])
        except ValueError:
            color = segment_color(i)
        name = get("Name", f"Segment {i + 1}")
        numbers = {}
        for key, default in (("Layer", "0"), ("LabelValue", "1")):
            text = get(key, default) or default
            try:
                numbers[key] = int(text)
            except ValueError:
                raise ValueError(
                    f"'{p}': Segment{i}_{key} of segment '{name}' is '{text}', not a whole number: the file is damaged. Save it again from Slicer."
                ) from None
        if not 0 <= numbers["Layer"] < len(layers):
            raise ValueError(
                f"'{p}': segment '{name}' (Segment{i}_Layer={numbers['Layer']}) is on a layer the file does not have ({len(layers)} layer(s)): "
                "the file is damaged. Save it again from Slicer."
            )
        segments.append(
            {
                "id": get("ID", f"Segment_{i + 1}"),
                "name": name,
                "color": color,
                "layer": numbers["Layer"],
                "label": numbers["LabelValue"],
                "tags": _parse_tags(get("Tags", "")),
            }
        )
        i += 1
    source = header_identity(img.GetMetaData(SOURCE_HEADER_KEY) if SOURCE_HEADER_KEY in keys else None)
    return SegmentationFile(layers=layers, segments=segments, extent_offset=offset, source=source)

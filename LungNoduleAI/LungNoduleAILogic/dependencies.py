"""What the module needs installed in Slicer's Python, and how to install it without replacing what Slicer bundles.

Qt-free decisions; the widget asks the user and runs the installers
(``PyTorchUtils.installTorch``, ``slicer.util.pip_install``) with what these functions return.

* torch comes from the PyTorch extension (``PyTorchUtils``), asked for with :data:`TORCH_REQUIREMENT`.
* Detection in Slicer needs only MONAI besides torch: the panel runs ``lungnoduleai detect
  --progress-lines`` (no tqdm progress bar, no PNG, so neither tqdm nor matplotlib), and
  scikit-learn is used only to fit a second stage, never to apply one.
* pip gets a constraints file pinning every installed package that Slicer bundles or that the
  PyTorch extension installed (:func:`pipConstraints`), so that installing MONAI or highdicom
  can never upgrade torch, numpy or pydicom underneath Slicer.
* DICOM SEG/SR export needs highdicom (:func:`dicomExportRequirement`): Slicer 5.12 bundles
  highdicom 0.27 with pydicom 3.0.2 (nothing to install); Slicer 5.10 bundles pydicom 2.4.4 and no
  highdicom, and highdicom 0.22.0 is the last release that works with pydicom 2.3-2.4 (0.23 and later
  need pydicom >= 3.0.1), so that one is installed there, with pydicom pinned.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Callable, Mapping

__all__ = [
    "TORCH_REQUIREMENT",
    "DETECTION_REQUIREMENTS",
    "PROTECTED_PACKAGES",
    "missingForDetection",
    "installedVersions",
    "pipConstraints",
    "dicomExportRequirement",
]

TORCH_REQUIREMENT = ">=2.2"
"""The torch versions the engine runs on (passed to ``PyTorchUtilsLogic.installTorch(torchVersionRequirement=...)``)."""

DETECTION_REQUIREMENTS = {"monai": "monai>=1.4"}
"""Import name -> pip requirement of what detection needs in Slicer besides torch."""

PROTECTED_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "SimpleITK", "pydicom", "highdicom", "dicomweb-client", "Pillow", "requests")
"""Distributions that Slicer bundles or the PyTorch extension installed: pip must never replace them."""


def missingForDetection(findSpec: Callable[[str], object] = importlib.util.find_spec) -> list[str]:
    """The pip requirements of :data:`DETECTION_REQUIREMENTS` that cannot be imported (``findSpec``: for tests)."""
    return [requirement for name, requirement in DETECTION_REQUIREMENTS.items() if findSpec(name) is None]


def installedVersions(names=PROTECTED_PACKAGES) -> dict[str, str]:
    """Installed version of each distribution in ``names`` that is installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def pipConstraints(installed: Mapping[str, str]) -> str:
    """A pip constraints file (``-c FILE``) that pins each installed protected package to its version.

    Args:
        installed: distribution name -> installed version (:func:`installedVersions`).
    """
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()) if name in PROTECTED_PACKAGES)


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def dicomExportRequirement(pydicomVersion: str | None, highdicomVersion: str | None) -> str | None:
    """What to install for DICOM SEG/SR export, given the installed pydicom and highdicom; ``None`` when ready.

    Raises:
        ValueError: no pydicom at all (not a Slicer with a DICOM module), or a highdicom that does not fit the pydicom installed.
    """
    if not pydicomVersion:
        raise ValueError("DICOM export needs pydicom, which this Python does not have: use 3D Slicer 5.10 or later, or export seg.nrrd/NIfTI/CSV/JSON.")
    pydicom3 = _release(pydicomVersion) >= (3, 0, 1)
    if highdicomVersion:
        highdicomNeeds3 = _release(highdicomVersion) >= (0, 23)
        if highdicomNeeds3 and not pydicom3:
            raise ValueError(
                f"highdicom {highdicomVersion} needs pydicom 3.0.1 or later, but Slicer's pydicom is {pydicomVersion}: "
                "uninstall that highdicom (pip_uninstall('highdicom')), restart Slicer and export again; highdicom 0.22.0 will be installed."
            )
        return None
    return "highdicom>=0.26" if pydicom3 else "highdicom==0.22.0"

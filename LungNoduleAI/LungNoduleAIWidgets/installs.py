"""Installing what the module needs, after asking: torch through the PyTorch extension, MONAI and highdicom through pip.

The dialogs of the module panel (Qt, through ``slicer.util``); what to install and how is decided
Qt-free in :mod:`LungNoduleAILogic.dependencies`, which the tests run.
"""

import importlib.util
import os

import slicer
from slicer.i18n import tr as _

from LungNoduleAILogic.dependencies import TORCH_REQUIREMENT, dicomExportRequirement, installedVersions, missingForDetection, pipConstraints

__all__ = ["ensureDependencies", "ensureDicomExport", "pipInstall"]


def pipInstall(requirements: list) -> None:
    """pip install that never replaces a package Slicer bundles or the PyTorch extension installed (a constraints file pins them)."""
    constraints = os.path.join(slicer.util.tempDirectory("LungNoduleAI"), "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as f:
        f.write(pipConstraints(installedVersions()))
    with slicer.util.WaitCursor():
        slicer.util.pip_install([*requirements, "-c", constraints])
    importlib.invalidate_caches()


def ensureDicomExport() -> bool:
    """highdicom for DICOM SEG/SR: Slicer's own on 5.12; on 5.10 the release that fits its pydicom 2.4, after asking."""
    versions = installedVersions(("pydicom", "highdicom"))
    try:
        requirement = dicomExportRequirement(versions.get("pydicom"), versions.get("highdicom"))
    except ValueError as exc:
        slicer.util.errorDisplay(str(exc), windowTitle=_("DICOM export"))
        return False
    if requirement is None:
        return True
    if not slicer.util.confirmOkCancelDisplay(
        _("DICOM SEG/SR export needs '{package}', which is not installed. Install it now (from PyPI)? Slicer's own pydicom is kept.").format(
            package=requirement
        ),
        windowTitle=_("Install highdicom"),
    ):
        return False
    pipInstall([requirement])
    if importlib.util.find_spec("highdicom") is None:
        slicer.util.errorDisplay(_("highdicom was installed but cannot be imported yet: restart Slicer and export again."))
        return False
    return True


def ensureDependencies() -> bool:
    """Make sure torch and MONAI can be imported; ask before installing anything."""
    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(
                _("Lung Nodule AI needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, then click Detect again.")
            )
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                slicer.util.errorDisplay(_("PyTorch was not installed, so detection cannot run."))
                return False
    missing = missingForDetection()
    if missing:
        if not slicer.util.confirmOkCancelDisplay(
            _("Lung Nodule AI needs these Python packages: {packages}. Install them now? (needs a network connection, a few minutes)").format(
                packages=", ".join(missing)
            ),
            _("Install Python packages"),
        ):
            return False
        pipInstall(missing)  # torch, numpy... pinned: MONAI cannot pull another torch over the PyTorch extension's
        stillMissing = missingForDetection()
        if stillMissing:
            slicer.util.errorDisplay(
                _("Packages {packages} were installed but cannot be imported yet: restart Slicer and click Detect again.").format(
                    packages=", ".join(stillMissing)
                )
            )
            return False
    return True

"""LungNoduleAI: 3D Slicer module for AI lung nodule detection and review.

Thin GUI layer: widgets, parameter node, the background engine process and
dependency installation. Computation lives in the engine (``LungNoduleAILib``)
and the MRML bridge (``LungNoduleAILogic``).
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LungNoduleAILib.review import ACCEPTED, FLAGGED, PENDING, REJECTED, UNRESOLVED_STATUSES
from LungNoduleAILogic import LungNoduleAILogic  # the module's logic: Qt-free, tested headless
from LungNoduleAILogic.names import ATTR_OUTPUT, REF_PROBABILITY, REF_VOLUME

# Packages the engine needs besides torch (import name -> pip requirement); torch comes from the PyTorch extension.
PIP_REQUIREMENTS = {"monai": "monai>=1.4", "sklearn": "scikit-learn>=1.3", "matplotlib": "matplotlib>=3.7", "tqdm": "tqdm>=4.60"}
DEVICES = [("auto", "Auto (CUDA when available)"), ("cpu", "CPU"), ("cuda", "CUDA")]
TABLE_COLUMNS = [("rank", "#"), ("probability", "p"), ("diameter_mm", "Diameter (mm)"), ("volume_mm3", "Volume (mm³)"), ("status", "Status")]


#
# LungNoduleAI
#


class LungNoduleAI(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Lung Nodule AI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LungNoduleAI developers"]
        self.parent.helpText = _(
            "Detects lung nodule candidates in a chest CT with a 3-D U-Net (PyTorch/MONAI). "
            "Each candidate becomes an editable segment with its probability, size and a review status: "
            "accept, reject, flag or edit each one, then export the reviewed labels "
            "(.seg.nrrd, NIfTI labelmap, CSV/JSON with measurements). "
            "The network runs in a separate process: Slicer stays responsive and the run can be cancelled. "
            "Candidates are suggestions for a reader to review; this is not a medical device."
        )
        self.parent.acknowledgementText = _(
            "The bundled model was trained on LUNA16 nodule cubes and LIDC-IDRI scans. "
            "LIDC-IDRI: Armato SG III et al., Medical Physics 38(2):915-931, 2011; data from The Cancer Imaging Archive, CC BY 3.0. "
            "LUNA16: Setio AAA et al., Medical Image Analysis 42:1-13, 2017, CC BY 4.0."
        )


#
# Parameter node
#


@parameterNodeWrapper
class LungNoduleAIParameterNode:
    """Module state saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    threshold: Annotated[float, WithinRange(0.05, 0.99)] = 0.5
    useLungMask: bool = True
    segmentation: vtkMRMLSegmentationNode


#
# Widget
#


class LungNoduleAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._workDir = None
        self._runVolume = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPollProcess)
        self._rethresholdTimer = qt.QTimer()
        self._rethresholdTimer.setSingleShot(True)
        self._rethresholdTimer.setInterval(600)
        self._rethresholdTimer.timeout.connect(self.onRethreshold)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LungNoduleAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LungNoduleAILogic(slicer.mrmlScene)

        for key, title in DEVICES:
            self.ui.deviceComboBox.addItem(_(title), key)
        self.ui.modelPathLineEdit.nameFilters = [_("Model metadata (*.json)")]
        self.ui.exportDirectoryButton.directory = qt.QDir.homePath()
        self.ui.candidatesTable.setColumnCount(len(TABLE_COLUMNS))
        self.ui.candidatesTable.setHorizontalHeaderLabels([_(title) for _key, title in TABLE_COLUMNS])
        self.ui.candidatesTable.horizontalHeader().setStretchLastSection(True)
        self.ui.candidatesTable.verticalHeader().setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", lambda _path: self.onModelPathChanged())
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", lambda _value: self._rethresholdTimer.start())
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda _node: self.updateCandidatesTable())
        self.ui.showProbabilityCheckBox.connect("toggled(bool)", lambda _checked: self.updateOverlay())
        self.ui.opacitySliderWidget.connect("valueChanged(double)", lambda _value: self.updateOverlay())
        self.ui.candidatesTable.connect("itemSelectionChanged()", self.onCandidateSelected)
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.setSelectedStatus(ACCEPTED))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.setSelectedStatus(REJECTED))
        self.ui.flagButton.connect("clicked(bool)", lambda: self.setSelectedStatus(FLAGGED))
        self.ui.nextButton.connect("clicked(bool)", self.selectNextPending)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self._shortcuts = []
        for key, callback in (
            ("A", lambda: self.setSelectedStatus(ACCEPTED)),
            ("R", lambda: self.setSelectedStatus(REJECTED)),
            ("F", lambda: self.setSelectedStatus(FLAGGED)),
            ("N", self.selectNextPending),
        ):
            shortcut = qt.QShortcut(qt.QKeySequence(key), self.ui.candidatesTable)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.connect("activated()", callback)
            self._shortcuts.append(shortcut)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelProcess()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelProcess()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterLogic = ScriptedLoadableModuleLogic()
        parameterLogic.moduleName = "LungNoduleAI"  # the singleton parameter node of this module
        node = parameterLogic.getParameterNode()
        fresh = not node.GetParameter("threshold")  # a new scene: start at the model's own threshold
        self.setParameterNode(LungNoduleAIParameterNode(node))
        if fresh:
            self.onModelPathChanged()
        if not self._parameterNode.inputVolume:
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            volumes = [v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode") and not v.GetAttribute(ATTR_OUTPUT)]
            if volumes:
                self._parameterNode.inputVolume = volumes[-1]  # the last loaded volume

    def setParameterNode(self, inputParameterNode: Optional[LungNoduleAIParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)
            self._checkCanDetect()

    def onModelPathChanged(self) -> None:
        """Set the threshold to the one the chosen (or bundled) model was validated at."""
        path = self.ui.modelPathLineEdit.currentPath or None
        if self._parameterNode and (path is None or os.path.isfile(path)):
            with slicer.util.tryWithErrorDisplay(_("Could not read the model's threshold."), waitCursor=False):
                self._parameterNode.threshold = self.logic.defaultThreshold(path)

    def _checkCanDetect(self, caller=None, event=None) -> None:
        running = self._process is not None
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.detectButton.enabled = running or hasInput
        self.ui.detectButton.text = _("Cancel") if running else _("Detect nodules")
        self.ui.detectButton.toolTip = _("Stop the running detection") if running else _("Detect lung nodules in the input CT")

    # ------------------------------------------------------------------ dependencies

    def ensurePackage(self, importName: str, requirement: str) -> bool:
        """Install one optional package with pip after asking; False if the user declined or it cannot be imported yet."""
        if importlib.util.find_spec(importName) is not None:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("This export needs the Python package '{package}', which is not installed. Install it now (from PyPI)?").format(package=requirement),
            windowTitle=_("Install {package}").format(package=importName),
        ):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(requirement)
        importlib.invalidate_caches()
        if importlib.util.find_spec(importName) is None:
            slicer.util.errorDisplay(_("'{package}' was installed but cannot be imported yet: restart Slicer and export again.").format(package=importName))
            return False
        return True

    def ensureDependencies(self) -> bool:
        """Make sure torch and the engine's packages can be imported; ask before installing anything."""
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
                torch = torchLogic.installTorch(askConfirmation=True)
                if torch is None:
                    slicer.util.errorDisplay(_("PyTorch was not installed, so detection cannot run."))
                    return False
        missing = [req for name, req in PIP_REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                _("Lung Nodule AI needs these Python packages: {packages}. Install them now? (needs a network connection, a few minutes)").format(
                    packages=", ".join(missing)
                ),
                _("Install Python packages"),
            ):
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(" ".join(missing))
            importlib.invalidate_caches()
            stillMissing = [name for name in PIP_REQUIREMENTS if importlib.util.find_spec(name) is None]
            if stillMissing:
                slicer.util.errorDisplay(
                    _("Packages {packages} were installed but cannot be imported yet: restart Slicer and click Detect again.").format(
                        packages=", ".join(stillMissing)
                    )
                )
                return False
        return True

    # ------------------------------------------------------------------ detection

    def onDetectButton(self) -> None:
        if self._process is not None:
            self.cancelProcess()
            self.ui.statusLabel.text = _("Cancelled. Nothing was added to the scene.")
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start nodule detection."), waitCursor=True):
            volume = self._parameterNode.inputVolume
            self.logic.ctFromVolume(volume)  # refuses what is not a CT, with the reason
            if not self.ensureDependencies():
                return
            from LungNoduleAILogic.process import EngineProcess, detectCommand, engineEnvironment

            self._workDir = tempfile.mkdtemp(prefix="LungNoduleAI-")
            inputPath = os.path.join(self._workDir, "input.nrrd")
            self.logic.writeVolume(volume, inputPath)
            command = detectCommand(
                inputPath,
                os.path.join(self._workDir, "output"),
                device=self.ui.deviceComboBox.currentData,
                threshold=self._parameterNode.threshold,
                modelPath=self.ui.modelPathLineEdit.currentPath or None,
                useLungMask=self._parameterNode.useLungMask,
            )
            env = engineEnvironment(slicer.util.startupEnvironment())
            logging.info("LungNoduleAI: %s", " ".join(command))
            self._runVolume = volume
            self._process = EngineProcess(command, env)
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()
            self._checkCanDetect()

    def onPollProcess(self) -> None:
        if self._process is None:
            self._timer.stop()
            return
        for event in self._process.poll():
            if event.kind == "progress":
                self.ui.progressBar.value = int(100 * event.data.get("fraction", 0))
                self.ui.statusLabel.text = _("{stage}... {seconds:.0f} s").format(stage=event.data.get("stage", ""), seconds=self._process.elapsed())
            elif event.kind == "model":
                self.ui.deviceUsedLabel.text = event.data.get("device", "")
            elif event.kind == "finished":
                self._onProcessFinished(event.data)

    def _onProcessFinished(self, data: dict) -> None:
        process, self._process = self._process, None
        self._timer.stop()
        self.ui.progressBar.visible = False
        self._checkCanDetect()
        try:
            if data["cancelled"]:
                return
            if data["returncode"] != 0:
                reason = process.errors[-1]["error"] if process.errors else "\n".join(process.log[-3:])
                slicer.util.errorDisplay(_("Nodule detection failed: {reason}").format(reason=reason), detailedText="\n".join(process.log[-200:]))
                self.ui.statusLabel.text = _("Detection failed; the scene is unchanged.")
                return
            with slicer.util.tryWithErrorDisplay(_("Could not load the detection results."), waitCursor=True):
                result = self.logic.importResults(self._runVolume, os.path.join(self._workDir, "output"))
                self.showResult(result)
                self.ui.statusLabel.text = _("{count} candidate(s) in {seconds:.0f} s on {device}.").format(
                    count=len(result.candidates), seconds=process.elapsed(), device=result.report.get("device", "?")
                )
                self.ui.deviceUsedLabel.text = result.report.get("device", "?")
        finally:
            self._removeWorkDir()

    def cancelProcess(self) -> None:
        """Kill the engine process tree; nothing is added to the scene."""
        if self._process is not None:
            self._process.cancel()
            self._process = None
        self._timer.stop()
        self.ui.progressBar.visible = False
        self._removeWorkDir()
        self._checkCanDetect()

    def _removeWorkDir(self) -> None:
        if self._workDir:
            shutil.rmtree(self._workDir, ignore_errors=True)
            self._workDir = None

    # ------------------------------------------------------------------ results and review

    def showResult(self, result) -> None:
        for node in (result.probabilityNode, result.labelmapNode, result.segmentationNode, result.tableNode):
            node.SetAttribute(ATTR_OUTPUT, "1")
        self._parameterNode.segmentation = result.segmentationNode
        if result.labelmapNode.GetDisplayNode() is not None:
            result.labelmapNode.GetDisplayNode().SetVisibility(False)  # the segmentation shows the same voxels
        self.updateOverlay()
        self.updateCandidatesTable()
        if self.ui.candidatesTable.rowCount:
            self.ui.candidatesTable.selectRow(0)

    def currentSegmentation(self):
        return self._parameterNode.segmentation if self._parameterNode else None

    def updateOverlay(self) -> None:
        seg = self.currentSegmentation()
        if seg is None:
            return
        probability = seg.GetNodeReference(REF_PROBABILITY)
        volume = seg.GetNodeReference(REF_VOLUME)
        show = self.ui.showProbabilityCheckBox.checked and probability is not None
        slicer.util.setSliceViewerLayers(
            background=volume if volume is not None else "keep-current",
            foreground=probability if show else None,
            foregroundOpacity=self.ui.opacitySliderWidget.value,
        )

    def updateCandidatesTable(self) -> None:
        table = self.ui.candidatesTable
        seg = self.currentSegmentation()
        selected = self.selectedSegmentId()
        table.setRowCount(0)
        if seg is None:
            return
        ids = self.logic.candidateSegmentIds(seg)
        table.setRowCount(len(ids))
        segmentation = seg.GetSegmentation()
        for row, segmentId in enumerate(ids):
            segment = segmentation.GetSegment(segmentId)
            values = {**self.logic.segmentMeasurements(segment), "status": _(self.logic.candidateStatus(seg, segmentId))}
            for col, (key, _title) in enumerate(TABLE_COLUMNS):
                item = qt.QTableWidgetItem(str(values[key]))
                item.setData(qt.Qt.UserRole, segmentId)
                table.setItem(row, col, item)
            if segmentId == selected:
                table.selectRow(row)

    def selectedSegmentId(self) -> Optional[str]:
        items = self.ui.candidatesTable.selectedItems()
        return items[0].data(qt.Qt.UserRole) if items else None

    def onCandidateSelected(self) -> None:
        seg, segmentId = self.currentSegmentation(), self.selectedSegmentId()
        if seg is None or segmentId is None:
            return
        segment = seg.GetSegmentation().GetSegment(segmentId)
        center = self.logic.segmentCenterRas(segment)
        if center:
            r, a, s = center
        else:
            r, a, s = seg.GetSegmentCenterRAS(segmentId)
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)
        display = seg.GetDisplayNode()
        if display is not None:
            for sid in self.logic.candidateSegmentIds(seg):
                display.SetSegmentOpacity2DOutline(sid, 1.0 if sid == segmentId else 0.6)

    def setSelectedStatus(self, status: str) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not set the review status."), waitCursor=False):
            seg, segmentId = self.currentSegmentation(), self.selectedSegmentId()
            if seg is None or segmentId is None:
                raise ValueError(_("Select a candidate in the table first."))
            self.logic.setCandidateStatus(seg, segmentId, status)
            self.updateCandidatesTable()
            if status != FLAGGED:
                self.selectNextPending()

    def selectNextPending(self) -> None:
        seg = self.currentSegmentation()
        if seg is None:
            return
        ids = self.logic.candidateSegmentIds(seg)
        current = self.selectedSegmentId()
        start = ids.index(current) + 1 if current in ids else 0
        for offset in range(len(ids)):
            sid = ids[(start + offset) % len(ids)]
            if self.logic.candidateStatus(seg, sid) == PENDING:
                self.ui.candidatesTable.selectRow(ids.index(sid))
                return
        self.ui.statusLabel.text = _("All candidates are reviewed.")

    def onEditButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not open the Segment Editor."), waitCursor=True):
            seg, segmentId = self.currentSegmentation(), self.selectedSegmentId()
            if seg is None or segmentId is None:
                raise ValueError(_("Select a candidate in the table first."))
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(seg)
            editor.setSourceVolumeNode(seg.GetNodeReference(REF_VOLUME))
            editor.setCurrentSegmentID(segmentId)

    def onRethreshold(self) -> None:
        seg = self.currentSegmentation()
        if seg is None or seg.GetNodeReference(REF_PROBABILITY) is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not apply the new threshold."), waitCursor=True):
            self.logic.rethreshold(seg, self._parameterNode.threshold)
            self.updateCandidatesTable()

    def onExportButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed; nothing was written."), waitCursor=True):
            seg = self.currentSegmentation()
            if seg is None:
                raise ValueError(_("Select the nodule segmentation to export."))
            volume = seg.GetNodeReference(REF_VOLUME) or self._parameterNode.inputVolume
            formats = [
                fmt
                for fmt, box in (
                    ("seg.nrrd", self.ui.exportSegNrrdCheckBox),
                    ("nii.gz", self.ui.exportNiftiCheckBox),
                    ("csv", self.ui.exportCsvCheckBox),
                    ("json", self.ui.exportJsonCheckBox),
                    ("dcm-seg", self.ui.exportDicomSegCheckBox),
                    ("dcm-sr", self.ui.exportDicomSrCheckBox),
                )
                if box.checked
            ]
            if ("dcm-seg" in formats or "dcm-sr" in formats) and not self.ensurePackage("highdicom", "highdicom>=0.26"):
                return
            ids = self.logic.candidateSegmentIds(seg)
            pending = [sid for sid in ids if self.logic.candidateStatus(seg, sid) in UNRESOLVED_STATUSES]
            # DICOM files come from the DICOM database through the volume's DICOM.instanceUIDs (see the Logic)
            paths = self.logic.exportReviewed(
                seg,
                volume,
                self.ui.exportDirectoryButton.directory,
                formats,
                includePending=self.ui.includePendingCheckBox.checked,
                segmentationType="fractional" if self.ui.fractionalSegCheckBox.checked else "binary",
            )
            message = _("Wrote:\n{files}").format(files="\n".join(paths))
            if pending:
                message += "\n\n" + _("Warning: {count} candidate(s) are still pending or flagged.").format(count=len(pending))
            slicer.util.infoDisplay(message, windowTitle=_("Export reviewed labels"))


#
# Test
#


class LungNoduleAITest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: detection on the bundled sample, review, export."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectReviewExport()

    def test_DetectReviewExport(self):
        import json

        import numpy as np

        from LungNoduleAILib.sample import sample_ct_path

        self.delayDisplay("Loading the bundled sample CT")
        volume = slicer.util.loadVolume(str(sample_ct_path()))
        logic = LungNoduleAILogic()
        self.delayDisplay("Detecting nodules (in-process)")
        result = logic.detect(volume, device="auto")
        self.assertGreaterEqual(len(result.candidates), 1)
        noduleRAS = np.array([-56.208, -86.343, -115.868])  # LIDC-IDRI-0001 reference nodule
        top = np.array(result.candidates[0]["center_ras_mm"])
        self.assertLess(float(np.linalg.norm(top - noduleRAS)), 23.35 / 2)
        seg = result.segmentationNode
        ids = logic.candidateSegmentIds(seg)
        self.assertEqual(len(ids), len(result.candidates))
        logic.setCandidateStatus(seg, ids[0], ACCEPTED)
        for sid in ids[1:]:
            logic.setCandidateStatus(seg, sid, REJECTED)
        outDir = tempfile.mkdtemp(prefix="LungNoduleAITest-")
        try:
            paths = logic.exportReviewed(seg, volume, outDir)
            self.assertEqual(len(paths), 4)
            with open(os.path.join(outDir, f"{volume.GetName()}_reviewed_nodules.json")) as f:
                report = json.load(f)
            self.assertEqual(len(report["nodules"]), 1)
        finally:
            shutil.rmtree(outDir, ignore_errors=True)
        self.delayDisplay("Test passed")

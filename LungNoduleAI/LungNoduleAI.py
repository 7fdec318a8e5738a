"""LungNoduleAI: 3D Slicer module for AI lung nodule detection and review.

Thin GUI layer: widgets, parameter node, the background engine process and
dependency installation. Computation lives in the engine (``LungNoduleAILib``)
and the MRML bridge (``LungNoduleAILogic``).
"""

import dataclasses
import importlib.util
import logging
import os
import pathlib
import shutil
from typing import Annotated, Optional

import qt
import slicer
import vtk
from LungNoduleAIWidgets.installs import ensureDependencies, ensureDicomExport
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

from LungNoduleAILib.review import ACCEPTED, FLAGGED, REJECTED
from LungNoduleAILogic import LungNoduleAILogic  # the module's logic: Qt-free, tested headless
from LungNoduleAILogic.names import ATTR_OUTPUT, REF_PROBABILITY, REF_VOLUME
from LungNoduleAILogic.process import EngineProcess, detectCommand, engineEnvironment
from LungNoduleAILogic.session import RETHRESHOLD_DELAY_MS, ReviewSession

DEVICES = [("auto", "Auto (CUDA when available)"), ("cpu", "CPU"), ("cuda", "CUDA")]
TABLE_COLUMNS = [
    ("rank", "#"),
    ("probability", "p"),
    ("type", "Type"),
    ("mean_diameter_mm", "Mean Ø (mm)"),
    ("solid_diameter_mm", "Solid Ø (mm)"),
    ("lung_rads", "Lung-RADS"),
    ("brock_risk", "Brock"),
    ("volume_mm3", "Volume (mm³)"),
    ("status", "Status"),
    ("followup", "Since prior"),
]


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
            "Candidates are suggestions for a reader to review; this is not a medical device. "
            '<a href="https://github.com/lungnoduleai/LungNoduleAI#readme">Documentation (README)</a>.'
        )
        self.parent.acknowledgementText = _(
            "The bundled model was trained on LUNA16 nodule cubes and LIDC-IDRI scans. "
            "LIDC-IDRI: Armato SG III et al., Medical Physics 38(2):915-931, 2011; data from The Cancer Imaging Archive, CC BY 3.0. "
            "LUNA16: Setio AAA et al., Medical Image Analysis 42:1-13, 2017, CC BY 4.0."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """The bundled demo CT (a crop of LIDC-IDRI-0001, shipped with the module) in the Sample Data module."""
    import SampleData

    moduleDir = os.path.dirname(__file__)
    sample = os.path.join(moduleDir, "Resources", "Sample", "LIDC-IDRI-0001_sample.nii.gz")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Lung Nodule AI",
        sampleName="LungNoduleAISample",
        uris=pathlib.Path(sample).as_uri(),  # a local file: nothing is downloaded
        fileNames="LIDC-IDRI-0001_sample.nii.gz",
        nodeNames="LIDC-IDRI-0001_sample",
        thumbnailFileName=os.path.join(moduleDir, "Resources", "Icons", "LungNoduleAI.png"),
        loadFileType="VolumeFile",
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
    """The module panel: widget bindings and dialogs only. State and decisions are in
    :class:`LungNoduleAILogic.session.ReviewSession`, which the headless tests run."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.session = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._workDir = None
        self._runVolume = None
        self._settingThreshold = False  # a threshold set by the panel itself (another model chosen): for the next run only
        self._shortcuts = []
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onPollProcess)
        self._rethresholdTimer = qt.QTimer()
        self._rethresholdTimer.setSingleShot(True)
        self._rethresholdTimer.setInterval(RETHRESHOLD_DELAY_MS)
        self._rethresholdTimer.timeout.connect(self.onRethreshold)
        self._remeasureTimer = qt.QTimer()  # an edit in the Segment Editor fires many events: measure once it rests
        self._remeasureTimer.setSingleShot(True)
        self._remeasureTimer.setInterval(1000)
        self._remeasureTimer.timeout.connect(self.onRemeasure)
        self._fillingFindings = False
        self._observedSegmentation = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LungNoduleAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LungNoduleAILogic(slicer.mrmlScene)
        self.session = ReviewSession(self.logic)

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
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        # the node the signal passes: the parameter node may still hold the previous one when this runs
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.showProbabilityCheckBox.connect("toggled(bool)", lambda _checked: self.updateOverlay())
        self.ui.opacitySliderWidget.connect("valueChanged(double)", lambda _value: self.updateOverlay())
        self.ui.candidatesTable.connect("itemSelectionChanged()", self.onCandidateSelected)
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.setSelectedStatus(ACCEPTED))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.setSelectedStatus(REJECTED))
        self.ui.flagButton.connect("clicked(bool)", lambda: self.setSelectedStatus(FLAGGED))
        self.ui.nextButton.connect("clicked(bool)", self.selectNextPending)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.readerTypeComboBox.connect("currentIndexChanged(int)", lambda _index: self.onReaderFindingChanged())
        self.ui.spiculatedCheckBox.connect("toggled(bool)", lambda _checked: self.onReaderFindingChanged())
        self.ui.upperLobeCheckBox.connect("toggled(bool)", lambda _checked: self.onReaderFindingChanged())
        self.ui.patientAgeSpinBox.connect("valueChanged(int)", lambda _value: self.onPatientChanged())
        self.ui.patientSexComboBox.connect("currentIndexChanged(int)", lambda _index: self.onPatientChanged())
        self.ui.familyHistoryCheckBox.connect("toggled(bool)", lambda _checked: self.onPatientChanged())
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        for key, callback in (
            ("A", lambda: self.setSelectedStatus(ACCEPTED)),
            ("R", lambda: self.setSelectedStatus(REJECTED)),
            ("F", lambda: self.setSelectedStatus(FLAGGED)),
            ("N", self.selectNextPending),
        ):
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())  # panel-wide: enabled only while the module is shown
            shortcut.setContext(qt.Qt.WindowShortcut)
            shortcut.setEnabled(False)
            shortcut.connect("activated()", callback)
            self._shortcuts.append(shortcut)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._rethresholdTimer.stop()
        self._remeasureTimer.stop()
        self._timer.stop()
        if self._process is not None:
            self._process.cancel(timeout=2.0)  # the application is closing: wait for the kill here
            self._process = None
        self._removeWorkDir()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)

    def onSceneStartClose(self, caller, event) -> None:
        self._rethresholdTimer.stop()
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
        """Set the threshold of the next run to the one the chosen (or bundled) model was validated at; shown candidates stay."""
        path = self.ui.modelPathLineEdit.currentPath or None
        if not self._parameterNode or (path is not None and not os.path.isfile(path)):
            return
        try:
            threshold = self.logic.defaultThreshold(path)
        except ValueError as exc:
            self.ui.statusLabel.text = str(exc)
            return
        self._settingThreshold = True
        try:
            self._parameterNode.threshold = threshold
        finally:
            self._settingThreshold = False

    def _checkCanDetect(self, caller=None, event=None) -> None:
        running = self._process is not None
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.detectButton.enabled = (running and not self._process.cancelling) or (not running and hasInput)
        self.ui.detectButton.text = _("Cancel") if running else _("Detect nodules")
        self.ui.detectButton.toolTip = _("Stop the running detection") if running else _("Detect lung nodules in the input CT")

    def _expected(self, exc: ValueError) -> None:
        """An expected condition (nothing selected, nothing to export...): say it in the panel, no traceback."""
        self.ui.statusLabel.text = str(exc)

    # ------------------------------------------------------------------ dependencies

    # ------------------------------------------------------------------ detection

    def onDetectButton(self) -> None:
        if self._process is not None:
            self.cancelProcess()
            return
        volume = self._parameterNode.inputVolume
        try:
            self.logic.ctFromVolume(volume)  # refuses what is not a CT, with the reason
        except ValueError as exc:
            self._expected(exc)
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start nodule detection."), waitCursor=True):
            if not ensureDependencies():
                return
            self._workDir = slicer.util.tempDirectory("LungNoduleAI")
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
            logging.info("LungNoduleAI: %s", " ".join(command))
            self._runVolume = volume
            self._process = EngineProcess(command, engineEnvironment(slicer.util.startupEnvironment()))
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
            update = ReviewSession.panelUpdate(event)
            if update.progressPercent is not None and not self._process.cancelling:
                self.ui.progressBar.value = update.progressPercent
                self.ui.statusLabel.text = _("{stage}... {seconds:.0f} s").format(stage=update.stage, seconds=self._process.elapsed())
            if update.deviceText is not None:
                self.ui.deviceUsedLabel.text = update.deviceText
            if update.finished:
                self._onProcessFinished(event.data)
                return

    def _onProcessFinished(self, data: dict) -> None:
        process, self._process = self._process, None
        self._timer.stop()
        self.ui.progressBar.visible = False
        self._checkCanDetect()
        try:
            if data["cancelled"]:
                self.ui.statusLabel.text = _("Cancelled. Nothing was added to the scene.")
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
        finally:
            self._removeWorkDir()

    def cancelProcess(self) -> None:
        """Ask the engine process tree to stop without waiting here; polling reports when it is gone. Nothing is added to the scene."""
        if self._process is None:
            return
        self._process.requestCancel()
        self.ui.statusLabel.text = _("Cancelling...")
        self._checkCanDetect()

    def _removeWorkDir(self) -> None:
        if self._workDir:
            shutil.rmtree(self._workDir, ignore_errors=True)
            self._workDir = None

    # ------------------------------------------------------------------ results and review

    def showResult(self, result) -> None:
        for node in (result.probabilityNode, result.labelmapNode, result.segmentationNode, result.tableNode):
            node.SetAttribute(ATTR_OUTPUT, "1")
        if result.labelmapNode.GetDisplayNode() is not None:
            result.labelmapNode.GetDisplayNode().SetVisibility(False)  # the segmentation shows the same voxels
        self._parameterNode.segmentation = result.segmentationNode  # the selector's signal (onSegmentationChanged) fills the table
        if self.ui.candidatesTable.rowCount:
            self.ui.candidatesTable.selectRow(0)

    def onSegmentationChanged(self, node) -> None:
        if self._observedSegmentation is not None:
            self.removeObserver(self._observedSegmentation, slicer.vtkSegmentation.SegmentModified, self.onSegmentModified)
        self._observedSegmentation = node.GetSegmentation() if node is not None else None
        if self._observedSegmentation is not None:
            self.addObserver(self._observedSegmentation, slicer.vtkSegmentation.SegmentModified, self.onSegmentModified)
        self.session.setSegmentation(node)
        self.updateOverlay()
        self.updateCandidatesTable()
        self.updateFindings()

    def onSegmentModified(self, caller=None, event=None) -> None:
        if not self._fillingFindings:
            self._remeasureTimer.start()

    def onRemeasure(self) -> None:
        self._fillingFindings = True  # re-measuring sets tags, which modify segments
        try:
            changed = self.session.remeasureEdited()
        finally:
            self._fillingFindings = False
        if changed:
            self.updateCandidatesTable()
            self.updateFindings()

    def updateFindings(self) -> None:
        """The findings fields from the selected candidate and the exam (signals blocked: filling them is not the reader's input)."""
        exam = self.session.examSummary()
        patient = exam.get("patient", {})
        overrides = self.session.readerFinding()
        widgets = (self.ui.readerTypeComboBox, self.ui.spiculatedCheckBox, self.ui.upperLobeCheckBox,
                   self.ui.patientAgeSpinBox, self.ui.patientSexComboBox, self.ui.familyHistoryCheckBox)  # fmt: skip
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            index = self.ui.readerTypeComboBox.findText(overrides.get("type", ""))
            self.ui.readerTypeComboBox.currentIndex = max(0, index)
            self.ui.spiculatedCheckBox.checked = bool(overrides.get("spiculated", False))
            self.ui.upperLobeCheckBox.checked = bool(overrides.get("upper_lobe", False))
            self.ui.patientAgeSpinBox.value = int(round(patient.get("age") or 0))
            self.ui.patientSexComboBox.currentIndex = {"F": 1, "M": 2}.get(patient.get("sex"), 0)
            self.ui.familyHistoryCheckBox.checked = bool(patient.get("family_history", False))
        finally:
            for w, b in zip(widgets, blocked):
                w.blockSignals(b)
        category = (exam.get("lung_rads") or {}).get("category")
        sources = ", ".join(f"{k}: {v}" for k, v in (patient.get("sources") or {}).items())
        self.ui.examLabel.text = (
            _("Exam: Lung-RADS {category} (suggested; v2022 baseline). Patient inputs: {sources}.").format(category=category, sources=sources or _("none"))
            if category
            else ""
        )

    def onCompareButton(self) -> None:
        try:
            with slicer.util.WaitCursor():
                report = self.session.compareWithPrior(self.ui.priorSegmentationSelector.currentNode(), self.ui.intervalSpinBox.value)
        except ValueError as exc:  # no prior chosen, no lungs, a CT missing: said, nothing changed
            self._expected(exc)
            return
        counts = {s: sum(n["status"] == s for n in report["nodules"]) for s in ("matched", "new", "resolved")}
        self.ui.statusLabel.text = _("{matched} matched, {new} new, {resolved} resolved; lungs overlap {dice} after registration.").format(
            dice=report["registration"]["lung_mask_dice"], **counts
        )
        self.updateCandidatesTable()

    def _showInPrior(self, positionRas) -> None:
        """The prior CT in the yellow view, centred where the selected nodule's match lies (the current one stays in the others)."""
        if positionRas is None:
            return
        prior = self.ui.priorSegmentationSelector.currentNode()
        volume = prior.GetNodeReference(REF_VOLUME) if prior is not None else None
        widget = slicer.app.layoutManager().sliceWidget("Yellow") if volume is not None else None
        if widget is None:
            return
        widget.sliceLogic().GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
        widget.mrmlSliceNode().JumpSliceByCentering(*positionRas)

    def onReaderFindingChanged(self) -> None:
        seg, sid = self.session.segmentationNode, self.session.selectedId
        if seg is None or sid is None:
            self._expected(ValueError(_("Select a candidate in the table first.")))
            return
        kind = self.ui.readerTypeComboBox.currentText if self.ui.readerTypeComboBox.currentIndex > 0 else ""
        self.logic.setReaderFinding(seg, sid, type=kind, spiculated=self.ui.spiculatedCheckBox.checked, upperLobe=self.ui.upperLobeCheckBox.checked)
        self.updateCandidatesTable()
        self.updateFindings()

    def onPatientChanged(self) -> None:
        seg = self.session.segmentationNode
        if seg is None:
            return
        age = self.ui.patientAgeSpinBox.value or None
        sex = {1: "F", 2: "M"}.get(self.ui.patientSexComboBox.currentIndex)
        try:
            self.logic.setPatientInputs(seg, age=age, sex=sex, familyHistory=self.ui.familyHistoryCheckBox.checked)
        except ValueError as exc:
            self._expected(exc)
            return
        self.updateCandidatesTable()
        self.updateFindings()

    def updateOverlay(self) -> None:
        seg = self.session.segmentationNode if self.session else None
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
        rows = self.session.rows()
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            values = {**dataclasses.asdict(row), "status": _(row.status)}
            for col, (key, _title) in enumerate(TABLE_COLUMNS):
                item = qt.QTableWidgetItem(str(values[key]))
                item.setData(qt.Qt.UserRole, row.segmentId)
                table.setItem(r, col, item)
            if row.segmentId == self.session.selectedId:
                table.selectRow(r)
        table.blockSignals(wasBlocked)

    def _selectRow(self, segmentId: Optional[str]) -> None:
        ids = [row.segmentId for row in self.session.rows()]
        if segmentId in ids:
            self.ui.candidatesTable.selectRow(ids.index(segmentId))

    def onCandidateSelected(self) -> None:
        items = self.ui.candidatesTable.selectedItems()
        center = self.session.select(items[0].data(qt.Qt.UserRole) if items else None)
        if center is None:
            return
        slicer.modules.markups.logic().JumpSlicesToLocation(*center, True)
        self.updateFindings()
        self._showInPrior(self.session.priorPosition())
        seg = self.session.segmentationNode
        display = seg.GetDisplayNode()
        if display is not None:
            for row in self.session.rows():
                display.SetSegmentOpacity2DOutline(row.segmentId, 1.0 if row.segmentId == self.session.selectedId else 0.6)

    def setSelectedStatus(self, status: str) -> None:
        try:
            nextId = self.session.setStatus(status)
        except ValueError as exc:
            self._expected(exc)
            return
        self.updateCandidatesTable()
        self._selectRow(nextId)
        if status != FLAGGED and self.session.nextPending() is None:
            self.ui.statusLabel.text = _("All candidates are reviewed.")

    def selectNextPending(self) -> None:
        nextId = self.session.nextPending()
        if nextId is None:
            self.ui.statusLabel.text = _("All candidates are reviewed.")
            return
        self._selectRow(nextId)

    def onEditButton(self) -> None:
        try:
            seg, volume, segmentId = self.session.editTarget()
        except ValueError as exc:
            self._expected(exc)
            return
        with slicer.util.tryWithErrorDisplay(_("Could not open the Segment Editor."), waitCursor=True):
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(seg)
            editor.setSourceVolumeNode(volume)
            editor.setCurrentSegmentID(segmentId)

    def onThresholdChanged(self, value: float) -> None:
        if self.session.thresholdEdited(value, byUser=not self._settingThreshold):
            self._rethresholdTimer.start()  # once the slider rests: a drag re-derives once

    def onRethreshold(self) -> None:
        try:
            with slicer.util.WaitCursor():
                self.session.rethreshold(self._parameterNode.threshold)
        except ValueError as exc:  # e.g. the model that made the candidates is gone
            slicer.util.warningDisplay(str(exc), windowTitle=_("Threshold not applied"))
            return
        self.updateCandidatesTable()

    def onExportButton(self) -> None:
        seg = self.session.segmentationNode
        if seg is None:
            self._expected(ValueError(_("Select the nodule segmentation to export.")))
            return
        volume = self.session.exportVolume(self._parameterNode.inputVolume)
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
        if ("dcm-seg" in formats or "dcm-sr" in formats) and not ensureDicomExport():
            return
        unresolved = self.session.unresolvedCount()
        folder = self.session.exportFolder(self.ui.exportDirectoryButton.directory, volume)  # a new folder each time: earlier exports stay
        try:
            with slicer.util.WaitCursor():
                # DICOM files come from the DICOM database through the volume's DICOM.instanceUIDs (see the Logic)
                paths = self.logic.exportReviewed(
                    seg,
                    volume,
                    folder,
                    formats,
                    includePending=self.ui.includePendingCheckBox.checked,
                    segmentationType="fractional" if self.ui.fractionalSegCheckBox.checked else "binary",
                )
        except ValueError as exc:  # unresolved candidates, none accepted, another CT...: said as it is, nothing written
            slicer.util.warningDisplay(str(exc), windowTitle=_("Export reviewed labels"))
            return
        message = _("Wrote:\n{files}").format(files="\n".join(paths))
        if unresolved and self.ui.includePendingCheckBox.checked:
            message += "\n\n" + _("Warning: {count} candidate(s) are still pending or flagged.").format(count=unresolved)
        slicer.util.infoDisplay(message, windowTitle=_("Export reviewed labels"))


#
# Test
#


class LungNoduleAITest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: detect on the bundled sample, review, save and reload the segmentation, re-threshold, export.

    Needs torch and MONAI in Slicer's Python (the PyTorch extension, then Detect once in the panel installs
    MONAI after asking); without them it says so and stops, installing nothing.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectReviewReloadRethresholdExport()

    def test_DetectReviewReloadRethresholdExport(self):
        import json

        import numpy as np

        from LungNoduleAILib.sample import sample_ct_path
        from LungNoduleAILogic.names import ATTR_MODEL, ATTR_THRESHOLD, REF_TABLE

        missing = [name for name in ("torch", "monai") if importlib.util.find_spec(name) is None]
        if missing:
            self.delayDisplay(f"Skipped: {', '.join(missing)} not installed (install the PyTorch extension, then click Detect once in the module).")
            return
        self.delayDisplay("Loading the bundled sample CT")
        volume = slicer.util.loadVolume(str(sample_ct_path()))
        logic = LungNoduleAILogic()
        self.delayDisplay("Detecting nodules (in-process)")
        result = logic.detect(volume, device="auto", threshold=0.1)  # a low threshold: several candidates to review
        self.assertGreaterEqual(len(result.candidates), 2)
        noduleRAS = np.array([-56.208, -86.343, -115.868])  # LIDC-IDRI-0001 reference nodule
        top = np.array(result.candidates[0]["center_ras_mm"])
        self.assertLess(float(np.linalg.norm(top - noduleRAS)), 23.35 / 2)
        seg = result.segmentationNode
        ids = logic.candidateSegmentIds(seg)
        self.assertEqual(len(ids), len(result.candidates))
        logic.setCandidateStatus(seg, ids[0], ACCEPTED)
        outDir = slicer.util.tempDirectory("LungNoduleAITest")
        try:
            self.delayDisplay("Saving and reloading the segmentation")
            path = os.path.join(outDir, "review.seg.nrrd")
            self.assertTrue(slicer.util.saveNode(seg, path))
            back = slicer.util.loadSegmentation(path)
            for role in (REF_PROBABILITY, REF_VOLUME, REF_TABLE):
                back.SetNodeReferenceID(role, seg.GetNodeReferenceID(role))
            for attr in (ATTR_MODEL, ATTR_THRESHOLD):
                back.SetAttribute(attr, seg.GetAttribute(attr))
            self.assertEqual([logic.isEdited(back, sid) for sid in ids], [False] * len(ids))  # shared layers after reload
            self.assertEqual(logic.candidateStatus(back, ids[0]), ACCEPTED)
            self.delayDisplay("Re-thresholding: the accepted candidate stays, the pending ones are re-derived")
            logic.rethreshold(back, 0.9)
            self.assertIn(ids[0], logic.candidateSegmentIds(back))
            for sid in logic.candidateSegmentIds(back)[1:]:
                logic.setCandidateStatus(back, sid, REJECTED)
            self.delayDisplay("Exporting the reviewed labels")
            paths = logic.exportReviewed(back, volume, os.path.join(outDir, "export"))
            self.assertEqual(len(paths), 4)
            with open(os.path.join(outDir, "export", f"{volume.GetName()}_reviewed_nodules.json")) as f:
                report = json.load(f)
            self.assertEqual([n["algorithm_type"] for n in report["nodules"]], ["AUTOMATIC"])
        finally:
            shutil.rmtree(outDir, ignore_errors=True)
        self.delayDisplay("Test passed")

"""Slicer packaging: every module file is listed in CMake, and the .ui has every widget the code uses."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from conftest import REPO

MODULE = REPO / "LungNoduleAI"

# Widget class each name must have, by how LungNoduleAI.py uses it.
EXPECTED_CLASSES = {
    "priorSegmentationSelector": "qMRMLNodeComboBox",
    "intervalSpinBox": "QSpinBox",
    "compareButton": "QPushButton",
    "readerTypeComboBox": "QComboBox",
    "spiculatedCheckBox": "QCheckBox",
    "upperLobeCheckBox": "QCheckBox",
    "patientAgeSpinBox": "QSpinBox",
    "patientSexComboBox": "QComboBox",
    "familyHistoryCheckBox": "QCheckBox",
    "examLabel": "QLabel",
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "segmentationSelector": "qMRMLNodeComboBox",
    "detectButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "deviceComboBox": "QComboBox",
    "deviceUsedLabel": "QLabel",
    "thresholdSliderWidget": "ctkSliderWidget",
    "lungMaskCheckBox": "QCheckBox",
    "modelPathLineEdit": "ctkPathLineEdit",
    "showProbabilityCheckBox": "QCheckBox",
    "opacitySliderWidget": "ctkSliderWidget",
    "candidatesTable": "QTableWidget",
    "acceptButton": "QPushButton",
    "rejectButton": "QPushButton",
    "flagButton": "QPushButton",
    "nextButton": "QPushButton",
    "editButton": "QPushButton",
    "exportDirectoryButton": "ctkDirectoryButton",
    "exportSegNrrdCheckBox": "QCheckBox",
    "exportNiftiCheckBox": "QCheckBox",
    "exportCsvCheckBox": "QCheckBox",
    "exportJsonCheckBox": "QCheckBox",
    "exportDicomSegCheckBox": "QCheckBox",
    "exportDicomSrCheckBox": "QCheckBox",
    "fractionalSegCheckBox": "QCheckBox",
    "includePendingCheckBox": "QCheckBox",
    "exportButton": "QPushButton",
}


def ui_widgets() -> dict[str, str]:
    root = ET.parse(MODULE / "Resources" / "UI" / "LungNoduleAI.ui").getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_every_widget_the_code_uses_exists_with_the_right_class():
    code = (MODULE / "LungNoduleAI.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    widgets = ui_widgets()
    assert used, "no self.ui.<name> found: the parser is broken"
    unknown = used - set(EXPECTED_CLASSES)
    assert not unknown, f"add the expected class of {unknown} to EXPECTED_CLASSES"
    for name in sorted(used):
        assert name in widgets, f"{name} is used in LungNoduleAI.py but missing from LungNoduleAI.ui"
        assert widgets[name] == EXPECTED_CLASSES[name], f"{name} is a {widgets[name]}, code expects {EXPECTED_CLASSES[name]}"


def test_parameter_node_names_match_ui():
    root = ET.parse(MODULE / "Resources" / "UI" / "LungNoduleAI.ui").getroot()
    bound = {p.findtext("string") for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    code = (MODULE / "LungNoduleAI.py").read_text(encoding="utf-8")
    wrapper = code[code.index("class LungNoduleAIParameterNode") : code.index("# Widget")]
    fields = set(re.findall(r"^    (\w+):", wrapper, re.M))
    assert bound and bound <= fields, f"UI binds {bound - fields} which the parameter node lacks"


def test_cmake_lists_every_python_and_resource_file():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "LungNoduleAI")
    listed = set(re.findall(r"^\s+([\w/.\-]+\.\w+)\s*$", cmake, re.M))
    files = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    assert files - listed == set(), f"not listed in LungNoduleAI/CMakeLists.txt: {sorted(files - listed)}"
    assert listed - files == set(), f"listed but missing: {sorted(listed - files)}"


def test_top_level_cmake_is_a_slicer_extension():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert re.search(rf"set\({key} \"[^\"]+\"\)", cmake), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    assert "add_subdirectory(LungNoduleAI)" in cmake


def test_engine_never_imports_slicer_qt_or_vtk():
    for path in (MODULE / "LungNoduleAILib").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk)\b", text, re.M), path.name


def test_bridge_never_imports_qt():
    for path in (MODULE / "LungNoduleAILogic").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk|slicer\.ScriptedLoadableModule|slicer\.parameterNodeWrapper)\b", text, re.M), path.name


def test_the_panel_code_holds_bindings_not_decisions():
    """The Qt file, which no test here can run, uses the Logic's public API and the review session, not private Logic methods or tag names."""
    code = (MODULE / "LungNoduleAI.py").read_text(encoding="utf-8")
    assert not re.findall(r"self\.logic\._\w+", code), "the panel calls private Logic methods"
    names = re.findall(r"[\"']LungNoduleAI\.[A-Z]\w*[\"']", code)  # tag, attribute and reference names look like LungNoduleAI.ReviewStatus
    assert not names, f"{names}: tag and attribute names belong in LungNoduleAILib.review / LungNoduleAILogic.names"
    assert "ReviewSession(" in code and "tryWithErrorDisplay" in code  # decisions in the session; unexpected faults still shown with their traceback
    input_selector = ET.parse(MODULE / "Resources" / "UI" / "LungNoduleAI.ui").getroot().find(".//widget[@name='inputVolumeSelector']")
    none_enabled = [p.findtext("bool") for p in input_selector.iter("property") if p.get("name") == "noneEnabled"]
    assert none_enabled == ["false"], "a CT loaded while the module is open must be picked (noneEnabled false)"

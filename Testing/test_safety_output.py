"""Results never replaced or mixed unasked, killed runs cleaned up, output failures said once (issue 24, parts 4 and 5).

Real command-line processes on files made from the bundled sample, with a
tiny real network (``--model``) so that each run takes seconds.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import SimpleITK as sitk
from test_cli import run_cli
from test_evaluate import LUNA_HEADER, _result, cand

from conftest import REPO, SAMPLE_CT
from dicom_series import write_ct_series
from LungNoduleAILib.export import read_segmentation
from LungNoduleAILib.imageio import read_ct
from LungNoduleAILib.writers import write_segmentation_labelmap

SUFFIXES = ["_probability.nrrd", "_candidates.nrrd", ".seg.nrrd", "_nodules.csv", "_nodules.json"]


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory):
    """Two DICOM folders both called CT, of two patients (as PACS exports name them)."""
    root = tmp_path_factory.mktemp("patients")
    image = read_ct(SAMPLE_CT).image
    for n, pid in ((1, "PAT-A"), (2, "PAT-B")):
        write_ct_series(image, root / f"p{n}" / "CT", patient={"PatientName": f"P^{n}", "PatientID": pid})
    return root / "p1" / "CT", root / "p2" / "CT"


def _detect(tiny_model, *args, **kw):
    return run_cli("detect", *args, "--device", "cpu", "--model", tiny_model.path, **kw)


def _sets(folder):
    """Result names in ``folder`` with their patient IDs, and anything else left there."""
    names = {p.name[: -len("_nodules.json")]: json.loads(p.read_text())["input"]["patient_id"] for p in folder.glob("*_nodules.json")}
    other = sorted(p.name for p in folder.iterdir() if not any(p.name == n + s for n in names for s in SUFFIXES))
    return names, other


def test_same_named_inputs_of_two_patients_keep_both_results(tmp_path, two_patients, tiny_model):
    a, b = two_patients
    out = tmp_path / "out"
    proc = _detect(tiny_model, a, b, "--output-dir", out, "--overwrite")  # --overwrite must not let b replace a
    assert proc.returncode == 0, proc.stderr
    names, other = _sets(out)
    assert sorted(names.values()) == ["PAT-A", "PAT-B"] and names["CT"] == "PAT-A" and other == []
    hashed = next(n for n in names if n != "CT")
    assert hashed.startswith("CT_") and len(hashed) == 11
    assert f"Results named '{hashed}'" in proc.stdout
    # a later run of patient B alone goes to its own name again, and is refused there without --overwrite
    proc = _detect(tiny_model, b, "--output-dir", out)
    assert proc.returncode == 1 and f"{hashed}_nodules.json" in proc.stderr and "--overwrite" in proc.stderr
    assert _sets(out) == (names, [])


def test_two_runs_racing_into_one_folder_one_is_refused(tmp_path, two_patients, tiny_model):
    a, _ = two_patients
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "LungNoduleAILib.cli", "detect", str(a), "--output-dir", str(out), "--device", "cpu", "--model", str(tiny_model.path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "Another LungNoduleAI run" in loser or "already exist" in loser
    assert _sets(out) == ({"CT": "PAT-A"}, [])


def test_a_live_run_of_another_ct_under_the_same_name_gets_a_new_name(tmp_path, two_patients, tiny_model):
    a, b = two_patients
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "source": read_ct(a).identity()["series_uid"], "targets": [], "tmp": ""}
        (out / ".CT.lungnoduleai-lock").write_text(json.dumps(lock))
        proc = _detect(tiny_model, b, "--output-dir", out)  # another patient: its own name
        assert proc.returncode == 0, proc.stderr
        assert list(_sets(out)[0].values()) == ["PAT-B"] and "CT" not in _sets(out)[0]
        proc = _detect(tiny_model, a, "--output-dir", out)  # the same CT as the live run: refused
        assert proc.returncode == 1 and f"Another LungNoduleAI run (process {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_run_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path, tiny_model):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "LungNoduleAILib.cli", "detect", str(SAMPLE_CT), "--output-dir", str(out), "--device", "cpu", "--model", str(tiny_model.path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    lock = out / ".LIDC-IDRI-0001_sample.lungnoduleai-lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.exists() and lock.stat().st_size > 0):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in out.iterdir())
    assert lock.name in left and any(n.startswith(".lungnoduleai-tmp-") for n in left), left
    # and a set cut short in its renames: one file in place, no marker
    (out / "LIDC-IDRI-0001_sample_probability.nrrd").write_bytes(b"from the killed run")
    proc = _detect(tiny_model, SAMPLE_CT, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "Removed what an interrupted run left" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(f"LIDC-IDRI-0001_sample{s}" for s in SUFFIXES)
    assert sitk.ReadImage(str(out / "LIDC-IDRI-0001_sample_probability.nrrd")).GetSize() == (503, 376, 40)


def test_output_location_failures_are_said_once_with_their_own_status(tmp_path, tiny_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = _detect(tiny_model, SAMPLE_CT, SAMPLE_CT, "--output-dir", blocker)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("Cannot write to") == 1 and "it is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr

    def small_disk():  # every file the run writes may hold 20 kB: a full disk as the writers see it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "full"
    proc = subprocess.run(
        [sys.executable, "-m", "LungNoduleAILib.cli", "detect", str(SAMPLE_CT), "--output-dir", str(out), "--device", "cpu", "--model", str(tiny_model.path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=small_disk,
        timeout=300,
    )
    assert proc.returncode == 4, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"Cannot write to '{out}'" in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "inputs failed" not in proc.stderr
    assert list(out.iterdir()) == []  # no temporary folder, no lock, no partial file


def test_evaluate_keeps_an_earlier_evaluation_and_checks_its_output_first(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _result(res / "a_nodules.json", "a", [cand(0, 0.9)], series_uid="1.2.3")
    (tmp_path / "ann.csv").write_text(LUNA_HEADER + "1.2.3,0,0,0,10\n")
    out = tmp_path / "eval"
    args = ["evaluate", res, "--annotations", tmp_path / "ann.csv", "--output-dir", out, "--bootstrap", "10"]
    assert run_cli(*args).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_cli(*args)
    assert proc.returncode == 2 and "already exist" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run_cli(*args, "--overwrite").returncode == 0
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli(*args[:-2], "--output-dir", blocker / "eval")
    assert proc.returncode == 4 and "Cannot write to" in proc.stderr and "Traceback" not in proc.stderr and "CPM" not in proc.stdout


@pytest.mark.parametrize("row", ["1.2.3,nan,0,0,10", "1.2.3,0,0,0,inf", "1.2.3,0,-inf,0,10"])
def test_evaluate_refuses_non_finite_references_with_the_line(tmp_path, row):
    res = tmp_path / "results"
    res.mkdir()
    _result(res / "a_nodules.json", "a", [cand(0, 0.9)], series_uid="1.2.3")
    (tmp_path / "ann.csv").write_text(LUNA_HEADER + "1.2.3,5,5,5,8\n" + row + "\n")
    proc = run_cli("evaluate", res, "--annotations", tmp_path / "ann.csv", "--output-dir", tmp_path / "eval")
    assert proc.returncode == 2 and "line 3: coordX, coordY, coordZ and diameter_mm must be numbers (finite, mm)" in proc.stderr
    assert not (tmp_path / "eval" / "evaluation.json").exists()


@pytest.fixture(scope="module")
def reviewed_seg(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("rev")
    proc = run_cli("detect", SAMPLE_CT, "--output-dir", out, "--device", "cpu", "--model", tiny_model.path, "--threshold", "0.05")
    assert proc.returncode == 0, proc.stderr
    return out


def _damaged(reviewed_seg, tmp_path, key, value):
    seg = read_segmentation(reviewed_seg / "LIDC-IDRI-0001_sample.seg.nrrd")
    if not seg.segments:
        pytest.skip("the tiny network found no candidate")
    path = tmp_path / "damaged.seg.nrrd"
    write_segmentation_labelmap(seg.layers[0], seg.segments, path)
    img = sitk.ReadImage(str(path))
    img.SetMetaData(key, value)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("Segment0_Layer", "3", "(Segment0_Layer=3) is on a layer the file does not have (1 layer(s))"),
        ("Segment0_LabelValue", "abc", "Segment0_LabelValue of segment"),
    ],
)
def test_damaged_segmentation_files_are_refused_without_a_traceback(reviewed_seg, tmp_path, key, value, message):
    path = _damaged(reviewed_seg, tmp_path, key, value)
    proc = run_cli("export", path, "--ct", SAMPLE_CT, "-o", tmp_path / "x", "--include-pending")
    assert proc.returncode == 1 and message in proc.stderr and "is '" + value in proc.stderr if key.endswith("LabelValue") else message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_export_probability_that_is_missing_or_not_an_image(reviewed_seg, tmp_path):
    seg = reviewed_seg / "LIDC-IDRI-0001_sample.seg.nrrd"
    for prob, message in ((tmp_path / "gone_probability.nrrd", "does not exist"), (REPO / "README.md", "Cannot read")):
        proc = run_cli("export", seg, "--ct", SAMPLE_CT, "-o", tmp_path / "x", "--include-pending", "--probability", prob, "--formats", "csv")
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()


def test_rethreshold_with_a_string_says_what_was_given(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed (make test installs it)")
    sys.path.insert(0, str(REPO / "LungNoduleAI"))
    from LungNoduleAILogic import LungNoduleAILogic

    logic = LungNoduleAILogic(slicer.vtkMRMLScene())
    seg = logic.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="Threshold 'half' is not a number"):
        logic.rethreshold(seg, "half")
    with pytest.raises(ValueError, match="no stored probability map"):
        logic.rethreshold(seg, "0.5")  # a number in a string is read as the number


def test_stale_temporaries_of_an_earlier_version_are_left_unless_old(tmp_path):
    from LungNoduleAILib.outputset import remove_stale

    young, old = tmp_path / ".lungnoduleai-tmp-abcdefgh", tmp_path / ".lungnoduleai-tmp-ijklmnop"
    young.mkdir()
    old.mkdir()
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    assert remove_stale(tmp_path) == [old.name]
    assert young.exists() and not old.exists()

"""The engine in a separate process, as the Slicer module runs it: progress events, result, cancel."""

from __future__ import annotations

import os
import sys
import time

import pytest

from conftest import REPO, SAMPLE_CT

sys.path.insert(0, str(REPO / "LungNoduleAI"))
from LungNoduleAILogic.process import EngineProcess, detectCommand  # noqa: E402


def _events_until(proc, kinds, timeout=300, stage=None):
    seen = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for ev in proc.poll():
            seen.append(ev)
            if ev.kind in kinds and (stage is None or ev.data.get("stage") == stage):
                return seen
        time.sleep(0.05)
    raise AssertionError(f"no {kinds} event within {timeout} s; log: {proc.log[-5:]}")


def test_progress_and_result(tmp_path):
    cmd = detectCommand(str(SAMPLE_CT), str(tmp_path), device="cpu")
    cmd[0] = sys.executable
    proc = EngineProcess(cmd)
    events = _events_until(proc, {"finished"})
    finished = events[-1]
    assert finished.data == {"returncode": 0, "cancelled": False}, proc.log[-10:]
    stages = [e.data["stage"] for e in events if e.kind == "progress"]
    assert stages[0] == "read" and "inference" in stages and stages[-1] == "write"
    assert len(proc.results) == 1 and os.path.exists(proc.results[0]["json"])
    assert [e.data["device"] for e in events if e.kind == "model"] == ["cpu"] and proc.model["device"] == "cpu"  # what the panel shows as the device used


def test_cancel_kills_the_process_and_leaves_no_files(tmp_path):
    cmd = detectCommand(str(SAMPLE_CT), str(tmp_path / "out"), device="cpu")
    cmd[0] = sys.executable
    proc = EngineProcess(cmd)
    _events_until(proc, {"progress"}, stage="inference")
    assert any(p.name.startswith(".lungnoduleai-tmp-") for p in (tmp_path / "out").iterdir())  # work in progress (beside the set's lock file)
    proc.cancel()
    assert not proc.running
    events = _events_until(proc, {"finished"}, timeout=30)
    assert events[-1].data["cancelled"] is True
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.proc.pid, 0)  # the whole process group is gone

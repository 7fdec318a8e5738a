"""Run the engine's ``detect`` command in a separate process and follow its progress.

Qt-free: a reader thread puts the process's output lines into a queue, and
the caller (the module's ``QTimer``) polls :meth:`EngineProcess.poll`. Cancel
kills the whole process tree. Used by the Slicer module so that Slicer stays
responsive while the network runs; works the same outside Slicer.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from LungNoduleAILib.protocol import parse

__all__ = ["EngineProcess", "EngineEvent", "pythonExecutable", "detectCommand", "engineEnvironment"]


@dataclass
class EngineEvent:
    """One thing the engine process reported.

    Attributes:
        kind: an event of :mod:`LungNoduleAILib.protocol` (``progress``, ``model``, ``result``, ``error``),
            ``log`` (any other line) or ``finished``.
        data: the parsed JSON for progress/result/error, ``{"line": ...}`` for log,
            ``{"returncode": n, "cancelled": bool}`` for finished.
    """

    kind: str
    data: dict = field(default_factory=dict)


def pythonExecutable() -> str:
    """Slicer's ``PythonSlicer`` when running inside Slicer, else this interpreter."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = Path(sys.executable).with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return str(candidate) if candidate.exists() else sys.executable


def engineEnvironment(base: dict | None = None) -> dict:
    """Environment for the engine process: ``base`` (default: this process's) with the module folder first on ``PYTHONPATH``.

    In Slicer pass ``slicer.util.startupEnvironment()``, the environment Slicer itself started with.
    """
    env = dict(os.environ if base is None else base)
    moduleDir = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = moduleDir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def detectCommand(
    inputPath: str, outputDir: str, device: str = "auto", threshold: float | None = None, modelPath: str | None = None, useLungMask: bool = True
) -> list[str]:
    """Command line of ``lungnoduleai detect`` with machine-readable progress."""
    cmd = [
        pythonExecutable(),
        "-m",
        "LungNoduleAILib.cli",
        "detect",
        str(inputPath),
        "--output-dir",
        str(outputDir),
        "--device",
        device,
        "--progress-lines",
        "--overwrite",
    ]
    if threshold is not None:
        cmd += ["--threshold", f"{threshold:g}"]
    if modelPath:
        cmd += ["--model", str(modelPath)]
    if not useLungMask:
        cmd.append("--no-lung-mask")
    return cmd


class EngineProcess:
    """A running engine process.

    Args:
        command: the command line (see :func:`detectCommand`).
        env: environment (default: :func:`engineEnvironment` of this process's).
    """

    def __init__(self, command: list[str], env: dict | None = None):
        env = engineEnvironment(env) if env is None else {**env, "PYTHONUNBUFFERED": "1"}
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
            startupinfo = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
            startupinfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
            startupinfo.wShowWindow = subprocess.SW_HIDE  # type: ignore[attr-defined]
            kwargs["startupinfo"] = startupinfo  # no console window (closing it would kill the run), as slicer.util.launchConsoleProcess
        else:
            kwargs["start_new_session"] = True  # own process group: cancel kills the whole tree
        self.startTime = time.monotonic()
        self.cancelled = False
        self._killAt: float | None = None
        self.lastProgress: dict = {}
        self.model: dict = {}
        """The last ``model`` event: the model and the device the engine actually used."""
        self.results: list[dict] = []
        self.errors: list[dict] = []
        self.log: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._finishedReported = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:  # undecodable bytes arrive as U+FFFD (errors="replace"), never as an exception
                self._queue.put(line.rstrip("\n"))
        except (UnicodeDecodeError, ValueError) as exc:  # a stream closed under the reader, or a decoder fault: say so, do not die silently
            self._queue.put(f"(output of the engine process could not be read further: {exc})")
        finally:
            self.proc.stdout.close()

    def poll(self) -> list[EngineEvent]:
        """Events since the last call (non-blocking); the last one is ``finished`` once the process ended.

        After :meth:`requestCancel`, also kills what is left of the process group once its grace time is over.
        """
        if self._killAt is not None and time.monotonic() >= self._killAt and self.proc.poll() is None:
            self._signal(signal.SIGKILL if os.name != "nt" else None)
            self._killAt = None
        events = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            events.append(self._parse(line))
        if not self._finishedReported and self.proc.poll() is not None and not self._thread.is_alive() and self._queue.empty():
            self._finishedReported = True
            events.append(EngineEvent("finished", {"returncode": self.proc.returncode, "cancelled": self.cancelled}))
        return events

    def _parse(self, line: str) -> EngineEvent:
        event = parse(line)
        if event is None:
            self.log.append(line)
            return EngineEvent("log", {"line": line})
        kind, data = event
        if kind == "progress":
            self.lastProgress = data
        elif kind == "model":
            self.model = data
        else:
            {"result": self.results, "error": self.errors}[kind].append(data)
        return EngineEvent(kind, data)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.startTime

    @property
    def cancelling(self) -> bool:
        """Cancel was asked and the process has not ended yet (the panel shows "Cancelling...")."""
        return self.cancelled and self.proc.poll() is None

    def requestCancel(self, graceSeconds: float = 5.0) -> None:
        """Ask the process to stop, without waiting: SIGTERM to its group now (the engine removes its temporary
        files), SIGKILL from :meth:`poll` after ``graceSeconds``. On Windows the tree is killed at once."""
        self.cancelled = True
        if self.proc.poll() is not None:
            return
        if os.name == "nt":
            self._signal(None)
            return
        self._signal(signal.SIGTERM)
        self._killAt = time.monotonic() + graceSeconds

    def _signal(self, sig) -> None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop the process and everything it started, and wait for it (scripts and tests; the panel uses :meth:`requestCancel`)."""
        self.requestCancel(timeout)
        deadline = time.monotonic() + 2 * timeout + 1.0
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends (for scripts and tests)."""
        rc = self.proc.wait(timeout)
        self._thread.join(timeout)
        return rc

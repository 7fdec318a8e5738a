"""Result sets that appear whole or not at all, never mix two runs, and never replace unasked.

:class:`OutputSet` writes one result's files (detection, export or evaluation)
into a temporary folder beside the targets and moves them into place together:

* the set's name is **reserved** first with a lock file created exclusively
  (``.<name>.lungnoduleai-lock``, holding the process, the host, the source and
  the targets), so of two runs writing the same name into one folder one is
  refused with a clear message instead of both succeeding;
* existing targets are refused unless ``overwrite``;
* **commit** removes the old marker file first (with ``overwrite``), renames every
  other file, then the marker (the ``_nodules.json`` that readers require) last,
  then drops the lock: at every moment the marker is there only beside a complete set;
* a run killed on the way (even by SIGKILL) leaves its lock and temporary folder;
  the next run in that folder finds the process dead, removes its temporary
  folder and the targets its lock lists (an incomplete set), and goes on.

:func:`choose_output_name` makes names collision-proof: a name already used in
the folder for another CT (by a committed result, a live run or earlier in the
same run) gets a short hash of the source appended.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["OutputSet", "OutputError", "choose_output_name", "source_key", "remove_stale"]

_TMP_PREFIX = ".lungnoduleai-tmp-"
_LOCK_SUFFIX = ".lungnoduleai-lock"
_OLD_TMP_AGE_S = 24 * 3600


class OutputError(ValueError):
    """The output location cannot be written (not a folder, read-only, disk full): the output failed, not the input."""


def output_error(folder: Path | str, exc: BaseException, what: str = "") -> OutputError:
    """One line that says where writing failed and why (OSError text, or the last line of an ITK dump)."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
        if exc.errno in (errno.EEXIST, errno.ENOTDIR) and Path(folder).is_file():
            reason = "it is a file, not a folder"
    else:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = (lines[-1] if lines else type(exc).__name__)[:200]
    return OutputError(f"Cannot write to {what}'{folder}': {reason}. Free space, or choose a folder you can write to.")


def source_key(identity: dict) -> str:
    """What tells two CTs apart for naming: the SeriesInstanceUID, else the voxel checksum."""
    return identity.get("series_uid") or identity.get("voxel_sha256") or ""


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's run on a shared folder: cannot tell, assume it is running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(folder: Path, name: str) -> Path:
    return folder / f".{name}{_LOCK_SUFFIX}"


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_stale(folder: Path) -> list[str]:
    """Remove what dead LungNoduleAI runs left in ``folder``: their temporary folders, and the incomplete sets their locks list.

    Returns:
        The names removed (for a note).
    """
    removed = []
    if not folder.is_dir():
        return removed
    for lock in folder.glob(f".*{_LOCK_SUFFIX}"):
        info = _read_lock(lock)
        if info is None or _alive(int(info.get("pid", 0)), str(info.get("host", ""))):
            continue
        for name in info.get("targets", []):
            (folder / name).unlink(missing_ok=True)
            removed.append(name)
        lock.unlink(missing_ok=True)
    for tmp in folder.glob(f"{_TMP_PREFIX}*"):
        rest = tmp.name[len(_TMP_PREFIX) :]
        pid, _, host = rest.partition("@")
        if pid.isdigit() and host:
            dead = not _alive(int(pid), host[:-9])  # "<host>-<8 random characters>"
        else:  # an earlier version's name without its process: only when old
            dead = time.time() - tmp.stat().st_mtime > _OLD_TMP_AGE_S
        if dead:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp.name)
    return removed


def choose_output_name(folder: str | os.PathLike, name: str, identity: dict, used_in_run: dict, marker_suffix: str = "_nodules.json") -> str:
    """``name``, or ``name_<8 hex>`` when ``name`` already belongs to another CT in ``folder``.

    Another CT holds the name when a committed result's marker (``name + marker_suffix``)
    records another source, a live run's lock on it records another source, or this
    run already wrote another CT under it (``used_in_run``: ``(folder, name) -> source key``).
    The same CT keeps its name (then existing files need ``overwrite``).
    """
    folder = Path(folder)
    key = source_key(identity)
    for candidate in (name, f"{name}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"):
        others = []
        in_run = used_in_run.get((str(folder.resolve()), candidate))
        if in_run is not None:
            others.append(in_run)
        marker = folder / f"{candidate}{marker_suffix}"
        if marker.is_file():
            try:
                recorded = json.loads(marker.read_text(encoding="utf-8")).get("input", {})
                others.append(source_key(recorded) if isinstance(recorded, dict) else "")
            except (OSError, ValueError):
                others.append("")
        lock = _read_lock(_lock_path(folder, candidate))
        if lock is not None and _alive(int(lock.get("pid", 0)), str(lock.get("host", ""))):
            others.append(str(lock.get("source", "")))
        if all(not other or other == key for other in others):  # unknown (older results) counts as the same: overwrite rules apply
            return candidate
    return candidate


class OutputSet:
    """Write one result's files into a temporary folder, then move them into place together.

    Use as a context manager: on an exception the temporary files are removed,
    the lock released and the targets untouched.

    Args:
        targets: final paths keyed by kind (all in one folder).
        overwrite: replace existing targets; otherwise refuse up front (``FileExistsError``).
        name: the set's name, reserved by the lock (default: the first target's stem).
        source: what the set was made from (:func:`source_key`), stored in the lock.
        marker: the kind moved last (readers require it; default ``"json"`` when present).
        what: how errors name the folder, e.g. ``"export folder "``.

    Raises:
        FileExistsError: existing targets without ``overwrite``, or another live run writing the same name.
        OutputError: the folder cannot be made or written.
    """

    def __init__(self, targets: dict, overwrite: bool = False, name: str | None = None, source: str = "", marker: str | None = "json", what: str = ""):
        self.targets = {k: Path(v) for k, v in targets.items()}
        self.overwrite = overwrite
        self.folder = next(iter(self.targets.values())).parent
        self.name = name or next(iter(self.targets.values())).stem
        self.source = source
        self.marker = marker if marker in self.targets else None
        self.dir = None
        self.lock = None
        self.notes: list[str] = []
        self.what = what
        self._remove_stale()  # an interrupted run's incomplete set is not an existing result
        self._check_existing()

    def _remove_stale(self) -> None:
        removed = remove_stale(self.folder)
        if removed:
            self.notes.append(f"Removed what an interrupted run left in {self.folder}: {', '.join(sorted(removed))}.")

    def _check_existing(self) -> None:
        existing = [str(p) for p in self.targets.values() if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(f"Output files already exist: {', '.join(existing)}. Use --overwrite to replace them, or another --output-dir.")

    def __enter__(self) -> "OutputSet":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._reserve()  # leftovers of dead runs were removed when the set was made
            self._check_existing()  # a run that finished meanwhile
            self.dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}@{socket.gethostname()}-", dir=self.folder))
            self._write_lock()
        except OSError as exc:
            self._release()
            if isinstance(exc, FileExistsError) and not exc.errno:
                raise
            raise output_error(self.folder, exc, self.what) from exc
        except BaseException:
            self._release()
            raise
        return self

    def _reserve(self) -> None:
        path = _lock_path(self.folder, self.name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read_lock(path) or {}
            raise FileExistsError(
                f"Another LungNoduleAI run (process {info.get('pid', '?')} on {info.get('host', '?')}) is writing '{self.name}' results into "
                f"{self.folder}. Wait for it to finish, or choose another --output-dir (if no run is going, delete {path})."
            ) from None
        os.close(fd)
        self.lock = path

    def _write_lock(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "source": self.source,
            "targets": [p.name for p in self.targets.values()],
            "tmp": self.dir.name,
        }
        self.lock.write_text(json.dumps(info), encoding="utf-8")

    def tmp(self, kind: str) -> Path:
        """Temporary path to write ``kind`` to."""
        return self.dir / self.targets[kind].name

    def commit(self) -> dict[str, Path]:
        """Move every written file into place, the marker last (same file system: atomic renames)."""
        order = [k for k in self.targets if k != self.marker] + ([self.marker] if self.marker else [])
        moved = []
        try:
            if self.marker and self.tmp(self.marker).exists():
                self.targets[self.marker].unlink(missing_ok=True)  # the old set is incomplete from here on, never mixed
            for kind in order:
                src = self.tmp(kind)
                if src.exists():
                    os.replace(src, self.targets[kind])
                    moved.append(kind)
        except OSError as exc:
            for kind, target in self.targets.items():  # an incomplete set is not left behind
                if kind in moved or self.overwrite:
                    target.unlink(missing_ok=True)
            raise output_error(self.folder, exc, self.what) from exc
        self._release()
        return {k: v for k, v in self.targets.items() if v.exists()}

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._release()

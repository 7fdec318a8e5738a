"""What the engine process says to the program that started it, and where it leaves its files.

Standard library only: the Slicer module imports this before torch, MONAI or
SimpleITK may even be installed.

With ``lungnoduleai detect --progress-lines`` the engine prints, besides its
human-readable lines, one machine-readable line per event: a prefix
(:data:`EVENT_PREFIXES`) followed by a JSON object:

* ``progress``: ``{"input": i, "inputs": n, "name": ..., "stage": ..., "done": d, "total": t, "fraction": f, "elapsed_s": s}``;
* ``model``: the model and device actually used for an input: ``{"input": path, "model": name, "version": v, "device": "cpu" | "cuda:0" ...}``;
* ``result``: one per finished input: ``{"input": path, "json": path, "candidates": n}``;
* ``error``: one per failed input: ``{"input": path, "error": message}``.

:func:`emit` writes such a line, :func:`parse` reads one back. A detection's
files are named by :data:`OUTPUT_SUFFIXES`; :func:`find_outputs` finds them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["EVENT_PREFIXES", "EVENT_KINDS", "emit", "parse", "OUTPUT_SUFFIXES", "find_outputs"]

EVENT_PREFIXES = {
    "progress": "LUNGNODULEAI_PROGRESS ",
    "model": "LUNGNODULEAI_MODEL ",
    "result": "LUNGNODULEAI_RESULT ",
    "error": "LUNGNODULEAI_ERROR ",
}
"""Line prefix of each event kind (a JSON object follows)."""
EVENT_KINDS = tuple(EVENT_PREFIXES)

OUTPUT_SUFFIXES = {
    "probability": "_probability.nrrd",
    "labelmap": "_candidates.nrrd",
    "segmentation": ".seg.nrrd",
    "csv": "_nodules.csv",
    "json": "_nodules.json",
    "png": "_overview.png",
}
"""A detection's output files: ``<name>`` + suffix, keyed by kind (the JSON is the result's index)."""


def emit(kind: str, data: dict, stream: TextIO | None = None) -> None:
    """Print one event line (flushed at once, so a reading process sees it while the engine works).

    Args:
        kind: one of :data:`EVENT_KINDS`.
        data: the event's fields (JSON-serialisable).
        stream: where to print (default: standard output).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in EVENT_PREFIXES:
        raise ValueError(f"Unknown engine event kind '{kind}': use one of {', '.join(EVENT_KINDS)}.")
    print(EVENT_PREFIXES[kind] + json.dumps(data), file=stream or sys.stdout, flush=True)


def parse(line: str) -> tuple[str, dict] | None:
    """The ``(kind, data)`` of an event line, ``None`` for any other line (human-readable output, or a damaged event)."""
    for kind, prefix in EVENT_PREFIXES.items():
        if line.startswith(prefix):
            try:
                data = json.loads(line[len(prefix) :])
            except json.JSONDecodeError:
                return None
            return (kind, data) if isinstance(data, dict) else None
    return None


def find_outputs(folder: str | os.PathLike) -> dict[str, Path]:
    """The files of the one detection result in ``folder``, keyed like :data:`OUTPUT_SUFFIXES` (not all need exist: the PNG is optional).

    Raises:
        ValueError: the folder holds no ``*_nodules.json`` or several.
    """
    reports = sorted(Path(folder).glob("*" + OUTPUT_SUFFIXES["json"]))
    if len(reports) != 1:
        raise ValueError(f"Expected one *{OUTPUT_SUFFIXES['json']} in '{folder}', found {len(reports)}: {[p.name for p in reports]}.")
    name = reports[0].name[: -len(OUTPUT_SUFFIXES["json"])]
    return {kind: reports[0].with_name(name + suffix) for kind, suffix in OUTPUT_SUFFIXES.items()}

"""The bundled sample chest CT (a real LIDC-IDRI case, see Resources/Sample/README.md)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_DIR", "sample_ct_path"]

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Sample"


def sample_ct_path() -> Path:
    """Path of the bundled sample CT (NIfTI)."""
    path = SAMPLE_DIR / "LIDC-IDRI-0001_sample.nii.gz"
    if not path.exists():
        raise ValueError(f"Bundled sample CT '{path}' is missing; reinstall LungNoduleAI or check out the full repository.")
    return path

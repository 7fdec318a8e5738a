"""LungNoduleAI engine: Slicer-free lung nodule detection.

The engine reads chest CT, runs a bundled 3-D U-Net (MONAI) and turns its
probability map into ranked nodule candidates with measurements. It imports
only numpy, SimpleITK, torch, monai, scikit-learn, pydicom/highdicom (DICOM
input and SEG/SR export, imported when used) and small helpers, never
``slicer``, ``qt`` or ``vtk``.

Submodules are imported lazily so that importing this package is cheap (the
Slicer module imports it before torch may even be installed).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

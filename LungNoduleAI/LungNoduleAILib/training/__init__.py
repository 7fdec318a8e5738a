"""Training the nodule segmentation network on real nodules in real lungs (``lungnoduleai train``).

Data (see ``shared/data/README.md``): LUNA16 nodule cubes (50 mm, 1 mm, with
masks) and full LIDC-IDRI scans. Each training patch (``patch`` voxels, cubic)
is one of:

* a nodule cube cropped at a random offset (the nodule off-centre);
* a cube whose nodule was erased ("inpainted" with lung parenchyma) with a
  nodule from another training cube pasted at a random lung position,
  next to dense tissue (pleura, vessels) in 40 % of pastes, and leaning on
  the chest wall, mediastinum or diaphragm in a ``pleural_fraction`` of them;
* an erased cube alone (a nodule-free lung patch);
* a patch from a full scan's lungs (half the centres on dense tissue inside
  the lung: vessels, pleura, fissures), with a pasted nodule in some.

Validation is split by series (never by cube). The same command runs on the
CPU, on one GPU, and under ``torchrun`` on several GPUs
(DistributedDataParallel); with ``workers`` > 0, patches are drawn and
augmented by that many processes so that a GPU is not kept waiting.

SimpleITK is needed only to read the data folder (``prepare_training_data``)
and for :func:`nodule_context`; training from a data pack needs numpy,
scipy (scikit-learn's own dependency), torch and MONAI, so a pack can train
on a machine where SimpleITK is not installed.

Modules: :mod:`.data` (cubes, scans, packs, the split), :mod:`.sampler` and
:mod:`.augment` (patches and batches), :mod:`.losses`, :mod:`.validation`
(validation and hard-negative mining), :mod:`.config` (:class:`TrainConfig`,
the settings checked once) and :mod:`.loop` (:func:`train`).
"""

from __future__ import annotations

from .config import TrainConfig, TrainConfigError
from .data import (
    FAINT_MEAN_HU,
    NODULE_CONTEXTS,
    NODULE_DENSITIES,
    TrainingData,
    lidc_marked_points_lps,
    load_pack,
    nodule_context,
    nodule_density,
    prepare_training_data,
    save_pack,
    validation_series,
)
from .loop import train
from .sampler import PatchSampler
from .validation import cube_detection_stats, mine_hard_negatives

__all__ = [
    "TrainConfig",
    "TrainConfigError",
    "TrainingData",
    "prepare_training_data",
    "load_pack",
    "save_pack",
    "validation_series",
    "lidc_marked_points_lps",
    "nodule_context",
    "nodule_density",
    "NODULE_CONTEXTS",
    "NODULE_DENSITIES",
    "FAINT_MEAN_HU",
    "PatchSampler",
    "cube_detection_stats",
    "mine_hard_negatives",
    "train",
]

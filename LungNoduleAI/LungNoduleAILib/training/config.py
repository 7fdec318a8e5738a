"""One training run's settings, checked once: :class:`TrainConfig`.

The command line builds it from its options (``lungnoduleai train``), a script
builds it directly; both get the same checks with the same messages, naming
the setting as the caller knows it (``--ema`` on the command line, ``ema``
in Python).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["TrainConfig", "TrainConfigError"]


class TrainConfigError(ValueError):
    """A setting out of range: which one (``field``), and the rule it breaks.

    ``rule`` may name another setting as ``<field>``; :meth:`message` puts in
    the names the caller uses for both.
    """

    def __init__(self, field: str, rule: str):
        self.field, self.rule = field, rule
        super().__init__(self.message())

    def message(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each setting called by ``names`` (field name -> e.g. command-line option)."""
        names = names or {}
        rule = self.rule
        for f in fields(TrainConfig):
            rule = rule.replace(f"<{f.name}>", names.get(f.name, f.name))
        return f"{names.get(self.field, self.field)} {rule}"


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the data and the network's :class:`..model.ModelSpec` come separately).

    Attributes:
        steps: optimiser steps (the cosine learning-rate decay spans them).
        max_minutes: stop after this many minutes even before ``steps`` (the decay then follows the clock).
        batch_size: patches per step (per GPU under ``torchrun``).
        patch: patch edge in voxels (cubic).
        lr: peak learning rate (AdamW, weight decay 1e-4).
        seed: seeds the network's initial weights, the patch draws and the augmentation.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        val_every: validate (and maybe save) every this many steps.
        init: a model's ``.json``/``.pt`` to start from (fine-tune).
        command: the command line, recorded with the model.
        mine_hard: before training, add the false responses of a model (``mine_with``, else ``init``) as hard negatives.
        mine_threshold: probability at which a response counts for mining.
        mine_with: the model that mines (default: the network being trained).
        mix: fractions of (nodule cube crops, pasted nodules in erased cubes, erased cubes alone, full-scan lung patches) per batch.
        attached_weight: nodules against the pleura or a vessel are drawn this many times as often.
        small_weight: nodules under 6 mm are drawn (and pasted) this many times as often.
        faint_weight: nodules whose mask averages below ``FAINT_MEAN_HU`` are drawn this many times as often.
        missed_weight: with ``mine_hard``, the training nodules the mining model misses are drawn this many times as often.
        faint_fraction: this fraction of pasted nodules is faded (ground-glass-like).
        pleural_fraction: this fraction of pasted nodules is placed against the chest wall, mediastinum or diaphragm.
        fade_fraction: this fraction of the nodule-cube crops shows its nodules faded in place to 35-70 % contrast.
        zoom: when > 0, half the batches are rescaled by a factor in ``[1 / (1 + zoom), 1 + zoom]``.
        peak_weight: weight of the loss pushing up the best 3 mm core inside each labelled patch.
        background_peak_weight: weight of the loss pushing down the best 3 mm core over 3 mm from the labels.
        size_balance_voxels: when > 0, labelled voxels of small nodules weigh more (``clip(n0 / n, 1, 10)``).
        wall_negative_weight: weight of the unlabelled voxels where lung meets the chest wall (1 = as any other).
        wall_near_nodule_voxels: with ``wall_negative_weight`` < 1, only within this many voxels of a nodule (0 = the whole wall).
        ema: when > 0, an exponential moving average of the weights with this decay per step is validated and saved.
        fp_weight: checkpoint score = sensitivity - ``fp_weight`` x other candidates per validation cube - ...
        scan_fp_weight: ... - ``scan_fp_weight`` x false responses in the training scans' lungs (0 = not counted).
        save_last: also save the last step's weights as ``<output stem>_last.json/.pt``.
        workers: processes that draw patches (0 = this one: reproducible from ``seed``).
    """

    steps: int = 4000
    max_minutes: float | None = None
    batch_size: int = 16
    patch: int = 48
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    val_every: int = 250
    init: str | os.PathLike | None = None
    command: str = ""
    mine_hard: bool = False
    mine_threshold: float = 0.3
    mine_with: str | os.PathLike | None = None
    mix: Sequence[float] = (0.3, 0.25, 0.15, 0.3)
    attached_weight: float = 1.0
    small_weight: float = 2.0
    faint_weight: float = 1.0
    missed_weight: float = 1.0
    faint_fraction: float = 0.0
    pleural_fraction: float = 0.0
    fade_fraction: float = 0.0
    zoom: float = 0.0
    peak_weight: float = 0.0
    background_peak_weight: float = 0.0
    size_balance_voxels: float = 0.0
    wall_negative_weight: float = 1.0
    wall_near_nodule_voxels: int = 0
    ema: float = 0.0
    fp_weight: float = 0.05
    scan_fp_weight: float = 0.0
    save_last: bool = False
    workers: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mix", tuple(float(v) for v in self.mix))
        problem = self.problem()
        if problem is not None:
            raise problem

    def problem(self) -> TrainConfigError | None:
        """The first setting out of range, or ``None``."""
        if not 0.0 <= self.ema < 1.0:
            return TrainConfigError("ema", f"is a decay per step in [0, 1), e.g. 0.998 (0 = off), got {self.ema}")
        for name in ("small_weight", "attached_weight", "faint_weight", "missed_weight"):
            value = getattr(self, name)
            if not value > 0:
                return TrainConfigError(name, f"is how many times as often such nodules are drawn and must be > 0 (1 = as often as others), got {value}")
        for name, what in (("faint_fraction", "pasted nodules"), ("pleural_fraction", "pasted nodules"), ("fade_fraction", "nodule-cube crops")):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                return TrainConfigError(name, f"is a fraction of the {what} and must be in [0, 1], got {value}")
        for name in ("peak_weight", "background_peak_weight"):
            value = getattr(self, name)
            if value < 0:
                return TrainConfigError(name, f"must be >= 0 (0 = off), got {value}")
        if not 0.0 <= self.zoom <= 1.0:
            return TrainConfigError("zoom", f"must lie between 0 (off) and 1 (factors 0.5-2), e.g. 0.25 for factors 0.8-1.25, got {self.zoom}")
        if self.missed_weight != 1.0 and not self.mine_hard:
            return TrainConfigError("missed_weight", f"{self.missed_weight} needs <mine_hard>: the mining run finds the missed training nodules")
        if not 0.0 <= self.wall_negative_weight <= 1.0:
            return TrainConfigError("wall_negative_weight", f"must lie between 0 and 1, got {self.wall_negative_weight}")
        if self.wall_near_nodule_voxels < 0:
            return TrainConfigError(
                "wall_near_nodule_voxels", f"is a distance in voxels and must be >= 0 (0 = the whole wall), got {self.wall_near_nodule_voxels}"
            )
        if len(self.mix) != 4 or min(self.mix) < 0 or sum(self.mix) <= 0:
            got = ",".join(f"{v:g}" for v in self.mix)
            return TrainConfigError(
                "mix", f"needs 4 non-negative fractions separated by commas (cube crops, pasted nodules, nodule-free cubes, scan patches), got '{got}'"
            )
        for name in ("init", "mine_with"):
            model = getattr(self, name)
            if model and not Path(model).with_suffix(".pt").is_file():
                return TrainConfigError(
                    name,
                    f"'{model}': no weights '{Path(model).with_suffix('.pt')}'. Give a model's .json (or .pt) with its weights beside it, "
                    "e.g. LungNoduleAI/Resources/Models/lung_nodule_unet.json",
                )
        return None

    def record(self) -> dict:
        """The settings as plain JSON values."""
        out = asdict(self)
        out["mix"] = list(self.mix)
        for name in ("init", "mine_with"):
            out[name] = str(out[name]) if out[name] else None
        return out

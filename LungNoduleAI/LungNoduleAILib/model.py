"""Model description (metadata JSON), network construction and weight loading.

A bundled model is two files side by side: ``<name>.json`` (the metadata:
architecture, preprocessing, default threshold, training record) and the
weights file it names (a torch ``state_dict``, stored as float16 to keep it
small). Preprocessing is read from the metadata, never hard-coded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["ModelSpec", "LoadedModel", "build_network", "read_weights", "load_model", "save_model", "average_models", "default_model_path", "file_sha256"]

MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
DEFAULT_MODEL_NAME = "lung_nodule_unet.json"


def default_model_path() -> Path:
    """The bundled model's metadata file (``$LUNGNODULEAI_MODEL`` overrides it)."""
    env = os.environ.get("LUNGNODULEAI_MODEL")
    return Path(env) if env else MODELS_DIR / DEFAULT_MODEL_NAME


@dataclass
class ModelSpec:
    """Everything needed to preprocess, run and post-process a model.

    Attributes:
        name: model name.
        version: model version string.
        weights: weights file name, relative to the metadata file.
        architecture: keyword arguments of MONAI ``UNet`` (``channels``, ``strides``,
            ``num_res_units``, ``norm``); spatial_dims/in/out channels are fixed (3, 1, 1).
        spacing_mm: model input spacing ``(x, y, z)`` mm.
        hu_window: HU range ``(low, high)`` clipped and scaled to [0, 1].
        roi_size: sliding-window size ``(z, y, x)`` voxels (divisible by 2**len(strides)).
        overlap: sliding-window overlap fraction.
        tta_flips: test-time flips, each a list of spatial axes (0 = z, 1 = y, 2 = x);
            the probability is averaged over the plain and each flipped pass (see
            :class:`.inference.SlidingWindowPredictor`). Each one adds a full
            network pass. Empty: none.
        tta_min_probability: run the flips only around regions whose plain-pass
            probability reaches this (see ``flip_min_probability`` of
            :class:`.inference.SlidingWindowPredictor`); ``None``: over the whole volume.
        threshold: default probability threshold for candidates.
        min_volume_mm3: candidates smaller than this (above ``threshold``) are dropped.
        segment_threshold: a candidate's voxels are its region of ``p >=
            segment_threshold`` when that is below the threshold in use (see
            :func:`.candidates.extract_candidates`); ``None``: the voxels above the threshold.
        split_depth_mm: split candidates made of blobs joined by a neck this much
            (mm) thinner (see :func:`.candidates.split_at_necks`); ``None``: never.
        lung_margin_mm: margin around the lung bounding box.
        restrict_to_lung: zero the probability outside the (closed, dilated) lung
            mask when a lung was found.
        rescoring: second-stage logistic regression (see :mod:`.rescore`), or ``None``.
        training: free-form training record (data, command, seed, metrics).
    """

    name: str = "lung_nodule_unet"
    version: str = "0.0.0"
    weights: str = "lung_nodule_unet.pt"
    architecture: dict[str, Any] = field(
        default_factory=lambda: {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 0, "norm": "batch"}
    )
    spacing_mm: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 400.0])
    roi_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    overlap: float = 0.25
    tta_flips: list[list[int]] = field(default_factory=list)
    tta_min_probability: float | None = None
    threshold: float = 0.5
    min_volume_mm3: float = 5.0
    segment_threshold: float | None = None
    split_depth_mm: float | None = None
    lung_margin_mm: float = 10.0
    restrict_to_lung: bool = True
    rescoring: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelSpec":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def candidate_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`.candidates.extract_candidates` that this model sets."""
        return {"min_volume_mm3": self.min_volume_mm3, "segment_threshold": self.segment_threshold, "split_depth_mm": self.split_depth_mm}

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def build_network(spec: ModelSpec):
    """A MONAI 3-D ``UNet`` from ``spec.architecture``.

    With ``num_res_units=0`` the top of MONAI's UNet is a plain transposed
    convolution (no normalisation or activation after it), so the logits are
    not squeezed and probabilities/thresholds mean something.
    """
    from monai.networks.nets import UNet

    arch = dict(spec.architecture)
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, **arch)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A network ready for inference plus its description.

    Attributes:
        network: ``torch.nn.Module`` in eval mode on ``device``.
        spec: the model's :class:`ModelSpec`.
        path: metadata file path.
        sha256: SHA-256 of the weights file.
        device: torch device string the network sits on.
    """

    network: Any
    spec: ModelSpec
    path: str
    sha256: str
    device: str


def resolve_device(device: str = "auto") -> str:
    """Map ``auto|cpu|cuda`` to a torch device string; refuse CUDA when unavailable."""
    import torch

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"Unknown device '{device}': use auto, cpu or cuda.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"Device '{device}' requested but this torch ({torch.__version__}) has no usable CUDA GPU. "
            "Use --device cpu, or install a CUDA build of torch (see README)."
        )
    return device


def read_weights(path: str | os.PathLike) -> dict:
    """A saved state_dict with its floating-point tensors as float32 (weights are stored as float16)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _model_files(path: str | os.PathLike) -> tuple[Path, ModelSpec, Path]:
    """A model's metadata path, its :class:`ModelSpec` and its weights path (a weights path finds the JSON beside it).

    Raises:
        ValueError: either file is missing.
    """
    p = Path(path)
    if p.suffix not in ("", ".json", ".pt"):
        raise ValueError(f"'{p}' is not a model: give a model's .json metadata (or its .pt weights with the .json beside it).")
    p = p.with_suffix(".json")
    if not p.exists():
        raise ValueError(f"Model metadata '{p}' not found. Give --model PATH of a model's .json file.")
    spec = ModelSpec.from_json(p)
    weights = p.parent / spec.weights
    if not weights.exists():
        raise ValueError(f"Model weights '{weights}' (named in '{p}') not found.")
    return p, spec, weights


def read_model_spec(path: str | os.PathLike | None = None) -> ModelSpec:
    """A model's settings from its metadata JSON (``None`` = the bundled model), without torch.

    Raises:
        ValueError: the metadata or the weights it names are missing.
    """
    return _model_files(path if path else default_model_path())[1]


def load_model(path: str | os.PathLike | None = None, device: str = "auto") -> LoadedModel:
    """Load a model from its metadata JSON (or a weights file with a JSON beside it).

    Raises:
        ValueError: the files are missing or do not match the architecture.
    """
    p, spec, weights = _model_files(path if path else default_model_path())
    dev = resolve_device(device)
    net = build_network(spec)
    state = read_weights(weights)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"Weights '{weights}' do not fit the architecture in '{p}': {str(exc).splitlines()[0]}") from exc
    net.eval().to(dev)
    return LoadedModel(net, spec, str(p), file_sha256(weights), dev)


def save_model(network, spec: ModelSpec, json_path: str | os.PathLike) -> Path:
    """Write weights (float16 state_dict) and metadata JSON; returns the JSON path."""
    import torch

    jp = Path(json_path)
    jp.parent.mkdir(parents=True, exist_ok=True)
    module = getattr(network, "module", network)  # unwrap DistributedDataParallel
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu() for k, v in module.state_dict().items()}
    spec.weights = jp.with_suffix(".pt").name
    torch.save(state, jp.with_suffix(".pt"))
    spec.to_json(jp)
    return jp


def compact_training_record(record: dict | None) -> dict | None:
    """A training record small enough to carry inside another model's: without its validation history,
    and naming the models it was built from by file, version and weights' SHA-256 only (their own records
    are in their JSON files and in the model history, ``MODEL_HISTORY.md``)."""
    if not record:
        return record
    out = {k: v for k, v in record.items() if k not in ("history", "ingredients", "init_training")}
    if record.get("ingredients"):
        out["ingredients"] = [{k: i.get(k) for k in ("model", "version", "sha256")} for i in record["ingredients"]]
    if record.get("init_training"):
        init = record["init_training"]
        out["init_training"] = {k: init[k] for k in ("name", "version", "file", "weights_sha256", "command") if k in init}
    return out


def average_models(paths: list[str | os.PathLike], output: str | os.PathLike, version: str | None = None, command: str | None = None) -> Path:
    """Write the uniform average of several models' weights (a "model soup").

    Meant for fine-tunes of one model (same start, other seeds or sampling
    settings): their weights lie in one basin, and the average usually ranks
    better than each of them, at no cost at run time. Floating-point tensors
    (weights, biases, batch-norm running statistics) are averaged in float32;
    integer ones (batch-norm step counters) are taken from the first model.
    Everything else (architecture, preprocessing, threshold, candidate
    settings) is the first model's.

    Args:
        paths: two or more model metadata ``.json`` files with the same architecture.
        output: metadata ``.json`` path of the averaged model (its ``.pt`` goes beside it).
        version: version of the new model (default: the first model's).
        command: command line recorded in the training record.

    Returns:
        The written metadata path.

    Raises:
        ValueError: fewer than two models, a missing file, models whose
            architectures or tensors differ, or an output that would overwrite one of them.
    """
    if len(paths) < 2:
        raise ValueError(f"Averaging needs at least two models, got {len(paths)}: {[str(p) for p in paths]}.")
    specs, states, shas = [], [], []
    out_files = {Path(output).with_suffix(".json").resolve(), Path(output).with_suffix(".pt").resolve()}
    for path in paths:
        meta, spec, weights = _model_files(path)
        if out_files & {meta.resolve(), weights.resolve()}:
            raise ValueError(f"The output '{output}' would overwrite the files of '{path}', one of the models being averaged; write the average elsewhere.")
        specs.append(spec)
        states.append(read_weights(weights))
        shas.append(file_sha256(weights))
    first = states[0]
    for path, spec, state in zip(paths[1:], specs[1:], states[1:]):
        if spec.architecture != specs[0].architecture:
            raise ValueError(
                f"'{path}' has architecture {spec.architecture}, '{paths[0]}' has {specs[0].architecture}: only models of one architecture can be averaged."
            )
        if state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first):
            raise ValueError(f"The weights of '{path}' do not match those of '{paths[0]}' tensor for tensor: only models of one architecture can be averaged.")
    averaged = {k: (sum(s[k] for s in states) / len(states)) if v.is_floating_point() else v for k, v in first.items()}
    net = build_network(specs[0])
    net.load_state_dict(averaged)
    record = {
        "method": "uniform average of the weights (and batch-norm statistics) of the models below",
        "command": command,
        "ingredients": [
            {"model": str(Path(p)), "version": s.version, "sha256": sha, "training": compact_training_record(s.training)}
            for p, s, sha in zip(paths, specs, shas)
        ],
    }
    return save_model(net, replace(specs[0], version=version or specs[0].version, training=record), output)

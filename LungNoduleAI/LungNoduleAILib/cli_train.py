"""The training commands of ``lungnoduleai``: ``train``, ``pack`` and ``average`` (parsers and handlers; :mod:`.cli` dispatches).

Imported by every ``lungnoduleai`` command to build the parser, so it imports the training package only when a training command runs.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the nodule network on nodule cubes and full scans",
        description="Train the 3-D U-Net. Reads the layout of shared/data (cubes/cubes.csv, scans/*.nii.gz) "
        "or a data pack made by 'lungnoduleai pack'. Runs on CPU, one GPU, or several GPUs under torchrun.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="folder with cubes/ and scans/ (e.g. ../shared/data)")
    src.add_argument("--pack", help="data pack (.npz) written by 'lungnoduleai pack'")
    p.add_argument("--output", required=True, help="model metadata JSON to write (weights go beside it as .pt)")
    p.add_argument("--scans", default="LIDC-IDRI-0002", help="comma-separated full scans used for negatives/pasting (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4000, help="training steps (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes (cosine schedule follows the budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--patch", type=int, default=48, help="cubic patch size in voxels (multiple of 16)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (under torchrun each rank takes its local GPU)")
    p.add_argument("--val-every", type=int, default=250, help="validate every N steps")
    p.add_argument("--init", default=None, help="start from this model's weights (JSON or .pt path)")
    p.add_argument(
        "--mine-hard-negatives",
        action="store_true",
        help="before training, record where the (--init) model fires wrongly in the training cubes and scans and sample patches there",
    )
    p.add_argument(
        "--mine-with",
        default=None,
        help="with --mine-hard-negatives: mine with this model (JSON) instead of --init, e.g. to train afresh on the bundled model's mistakes",
    )
    p.add_argument(
        "--mine-threshold", type=float, default=0.3, help="probability above which a response off any nodule counts as a hard negative (default: %(default)s)"
    )
    p.add_argument(
        "--attached-weight", type=float, default=1.0, help="draw real nodules that touch the pleura or a vessel this many times as often (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    _add_train_recipe(p)


def _add_train_recipe(p) -> None:
    """The ``train`` options of the recipe: what the batches hold, the loss terms, how the checkpoint is chosen (:class:`.training.TrainConfig`)."""
    p.add_argument(
        "--mix",
        default="0.3,0.25,0.15,0.3",
        help="fractions of nodule-cube crops, pasted nodules, nodule-free cubes and full-scan lung patches (default: %(default)s)",
    )
    p.add_argument(
        "--faint-fraction",
        type=float,
        default=0.0,
        help="fraction of pasted nodules made faint (35-70 %% of their contrast, like ground-glass nodules; default: %(default)s)",
    )
    p.add_argument(
        "--pleural-fraction",
        type=float,
        default=0.0,
        help="fraction of pasted nodules placed against the chest wall, mediastinum or diaphragm, their masks cut at the wall (juxtapleural; default: "
        "%(default)s)",
    )
    p.add_argument(
        "--fade-fraction",
        type=float,
        default=0.0,
        help="fraction of real nodule-cube crops whose nodules are faded in place to 35-70 %% of their contrast: faint nodules against their own pleura and "
        "vessels (default: %(default)s)",
    )
    p.add_argument(
        "--zoom",
        type=float,
        default=0.0,
        help="rescale half of the batches about their centre by a random factor in [1/(1+Z), 1+Z], e.g. 0.25 for 0.8-1.25 (default: %(default)s = off)",
    )
    p.add_argument(
        "--peak-weight",
        type=float,
        default=0.0,
        help="add this times -log sigmoid(best 3 mm core inside the labels) per labelled patch to the loss, so that every nodule gets a core above "
        "threshold (default: %(default)s = off)",
    )
    p.add_argument(
        "--background-peak-weight",
        type=float,
        default=0.0,
        help="add this times -log(1 - sigmoid(best 3 mm core over 3 mm from the labels)) per patch to the loss, so that each patch's most confident false "
        "candidate is pushed down (default: %(default)s = off)",
    )
    p.add_argument("--small-weight", type=float, default=2.0, help="draw nodules under 6 mm this many times as often (default: %(default)s)")
    p.add_argument(
        "--missed-weight",
        type=float,
        default=1.0,
        help="with --mine-hard-negatives: draw the training nodules that the mining model does not find at the model's threshold this many times as often "
        "(hard positives; default: %(default)s)",
    )
    p.add_argument(
        "--wall-negative-weight",
        type=float,
        default=1.0,
        help="weight (0-1) of the unlabelled voxels where lung meets chest wall, mediastinum or diaphragm, so that negatives press less on juxtapleural "
        "nodules (default: %(default)s = as any voxel)",
    )
    p.add_argument(
        "--wall-near-nodule",
        type=int,
        default=0,
        metavar="VOXELS",
        help="with --wall-negative-weight: lighten only the wall within this many voxels (1 mm) of a labelled nodule; the rest of the pleura keeps full "
        "weight (default: %(default)s = the whole wall)",
    )
    p.add_argument(
        "--faint-weight",
        type=float,
        default=1.0,
        help="draw faint nodules (mean below -450 HU in their mask: ground-glass, part-solid, small and blurred) this many times as often (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--save-last",
        action="store_true",
        help="also save the last step's weights as <output>_last.json/.pt (e.g. to average several runs with 'lungnoduleai average')",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="validate and save an exponential moving average of the weights with this decay per step, e.g. 0.998 (default: %(default)s = off)",
    )
    p.add_argument(
        "--size-balance",
        type=float,
        default=0.0,
        metavar="VOXELS",
        help="weigh the labelled voxels of a patch with n of them VOXELS/n times (1-10x) in the cross-entropy, so small nodules count more; e.g. 500, a 10 "
        "mm nodule (default: %(default)s = off)",
    )
    p.add_argument("--fp-weight", type=float, default=0.05, help="checkpoint choice: weight of other candidates per validation cube (default: %(default)s)")
    p.add_argument(
        "--scan-fp-weight",
        type=float,
        default=0.0,
        help="checkpoint choice: weight of each false response in the training scans' lungs (counted at each validation when > 0; default: %(default)s)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="processes drawing training patches (Linux; e.g. 8 to keep a GPU busy; default: %(default)s = in this process)"
    )


def add_pack(sub) -> None:
    p = sub.add_parser(
        "pack",
        help="write a compact training data pack (.npz)",
        description="Prepare cubes and scans at the model's spacing as uint8 and save them compressed, e.g. to train on a GPU machine.",
    )
    p.add_argument("--data-dir", required=True)
    p.add_argument("--output", required=True, help=".npz path")
    p.add_argument("--scans", default="LIDC-IDRI-0002")
    p.add_argument("--seed", type=int, default=0, help="validation split seed")
    p.add_argument(
        "--bits",
        type=int,
        default=8,
        help="intensity bits kept, 1-8 (8 = lossless; CT noise fills the low bits, so 6 or 7 make a pack much smaller; default: %(default)s)",
    )
    p.add_argument("--cube-size", type=int, default=None, help="crop the 50-voxel nodule cubes centrally to this size (>= the training patch)")
    p.add_argument("--scan-margin", type=int, default=None, help="crop scans to the lungs' bounding box plus this many voxels (>= half the training patch)")


def add_average(sub) -> None:
    p = sub.add_parser(
        "average",
        help="average the weights of fine-tunes of one model (a model soup)",
        description="Write a model whose weights are the mean of the given models' weights (same architecture; meant for fine-tunes "
        "from one start). Settings (threshold, preprocessing, candidates) come from the first model.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL.json", help="two or more model metadata files")
    p.add_argument("--output", required=True, help="metadata .json of the averaged model (the .pt is written beside it)")
    p.add_argument("--version", default=None, help="version of the averaged model (default: the first model's)")


def run_average(args) -> int:
    from .model import average_models

    command = "lungnoduleai " + " ".join(shlex.quote(a) for a in args.argv)
    try:
        path = average_models(args.models, args.output, version=args.version, command=command)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (average of {len(args.models)} models)")
    return 0


_TRAIN_OPTION_DEST = {"mine_hard": "mine_hard_negatives", "size_balance_voxels": "size_balance", "wall_near_nodule_voxels": "wall_near_nodule"}
"""TrainConfig fields whose command-line option has another name (the others: --field-name)."""


def _train_config_names() -> dict[str, str]:
    """The command-line option of each :class:`.training.TrainConfig` field, for messages."""
    from dataclasses import fields

    from .training import TrainConfig

    return {f.name: "--" + _TRAIN_OPTION_DEST.get(f.name, f.name).replace("_", "-") for f in fields(TrainConfig)}


def _train_config(args):
    """The :class:`.training.TrainConfig` of the parsed ``train`` options (checked: raises ``TrainConfigError``)."""
    from dataclasses import fields

    from .training import TrainConfig

    values = {}
    for f in fields(TrainConfig):
        dest = _TRAIN_OPTION_DEST.get(f.name, f.name)
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    try:
        values["mix"] = [float(v) for v in args.mix.split(",")]
    except ValueError:
        values["mix"] = []
    values["command"] = "lungnoduleai " + " ".join(shlex.quote(a) for a in args.argv)
    return TrainConfig(**values)


def run_train(args) -> int:
    import torch

    from .model import ModelSpec
    from .training import TrainConfigError, load_pack, prepare_training_data, train

    try:
        config = _train_config(args)
    except TrainConfigError as exc:
        print(f"error: {exc.message(_train_config_names())}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec()
    init_json = Path(args.init).with_suffix(".json") if args.init else None
    if init_json and init_json.exists():
        init_spec = ModelSpec.from_json(init_json)  # a fine-tune validates at its model's threshold and keeps how it draws candidates
        spec.threshold, spec.segment_threshold, spec.split_depth_mm = init_spec.threshold, init_spec.segment_threshold, init_spec.split_depth_mm
    scans = [s for s in args.scans.split(",") if s]
    try:
        data = load_pack(args.pack) if args.pack else prepare_training_data(args.data_dir, spec, scans, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = train(data, args.output, spec, config)
    print(f"best validation: {record.get('best_validation')}")
    return 0


def run_pack(args) -> int:
    from .model import ModelSpec
    from .training import prepare_training_data, save_pack

    if not 1 <= args.bits <= 8:
        print(f"error: --bits must be 1..8 (8 = lossless), got {args.bits}", file=sys.stderr)
        return 2
    try:
        data = prepare_training_data(args.data_dir, ModelSpec(), [s for s in args.scans.split(",") if s], seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_pack(data, args.output, bits=args.bits, cube_size=args.cube_size, scan_margin=args.scan_margin)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.1f} MB): {data.meta}")
    return 0

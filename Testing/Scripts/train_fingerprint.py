"""Fingerprint of a short, fixed training run (weights SHA-256), to show that a refactoring of the training code reproduces earlier runs bit for bit.

Usage: python Testing/Scripts/train_fingerprint.py OUT_DIR
Run it once with PYTHONPATH=<old checkout>/LungNoduleAI, once without, and compare the printed .pt hashes;
the JSON records differ only in paths and in how compactly they name the run they started from.
Needs the shared data (../shared/data): 24 cubes and LIDC-IDRI-0002. Takes about two minutes on two CPU cores.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

try:
    from LungNoduleAILib.training import load_pack, prepare_training_data, save_pack, train
except ImportError:  # a checkout from before the training package
    from LungNoduleAILib.train import load_pack, prepare_training_data, save_pack, train
import LungNoduleAILib
from LungNoduleAILib.model import ModelSpec

torch.set_num_threads(1)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
print("engine", LungNoduleAILib.__file__)
TINY = {"channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2], "num_res_units": 0, "norm": "batch"}
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pack = out / "pack.npz"
if not pack.exists():
    data = prepare_training_data(DATA, ModelSpec(), scan_names=("LIDC-IDRI-0002",), max_cubes=24, seed=1)
    save_pack(data, pack)


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in ("minutes", "total_minutes")}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


runs = {
    "plain": dict(steps=4, batch_size=2, patch=32, val_every=2),
    "rich": dict(
        steps=4,
        batch_size=2,
        patch=32,
        val_every=2,
        mine_hard=True,
        missed_weight=2.0,
        ema=0.9,
        zoom=0.25,
        peak_weight=0.5,
        background_peak_weight=0.5,
        wall_negative_weight=0.3,
        wall_near_nodule_voxels=3,
        size_balance_voxels=100.0,
        fade_fraction=0.3,
        pleural_fraction=0.3,
        faint_fraction=0.2,
        mix=(0.3, 0.3, 0.1, 0.3),
        save_last=True,
        scan_fp_weight=0.01,
    ),
}
for name, kw in runs.items():
    spec = ModelSpec(architecture=TINY)
    init = None
    if name == "rich":
        init = str(out / "plain.json")
    rec = train(load_pack(pack), out / f"{name}.json", spec, device="cpu", seed=3, command="repro", init=init, **kw)
    for f in sorted(out.glob(f"{name}*")):
        if f.suffix == ".pt":
            print(name, f.name, hashlib.sha256(f.read_bytes()).hexdigest()[:16])
        elif f.suffix == ".json":
            j = strip(json.loads(f.read_text()))
            j.get("training", {}).pop("init", None)
            print(name, f.name, hashlib.sha256(json.dumps(j, sort_keys=True).encode()).hexdigest()[:16])

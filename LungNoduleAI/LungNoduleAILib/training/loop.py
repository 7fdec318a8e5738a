"""The training loop: one process, one GPU, or several under ``torchrun`` (DistributedDataParallel)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..intensity import scale_intensity_uint8
from ..model import ModelSpec, build_network, read_weights, save_model
from .config import TrainConfig
from .data import TrainingData
from .losses import background_peak_loss, peak_loss, size_balanced_weights, wall_negative_weights
from .sampler import PatchSampler, _batch_stream
from .validation import _validate, mine_hard_negatives

__all__ = ["train"]

log = logging.getLogger(__name__)


def _init_record(init) -> dict | None:
    """What a run started from, compactly: the model's name, version and weights' SHA-256 (its own record is in its JSON and the history)."""
    if not init:
        return None
    meta = Path(init).with_suffix(".json")
    if not meta.exists():
        return None
    model = json.loads(meta.read_text())
    weights = meta.with_suffix(".pt")
    record = {"name": model.get("name"), "version": model.get("version"), "file": meta.name}
    if weights.is_file():
        record["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    record["command"] = model.get("training", {}).get("command")
    return record


def _loss_description(config: TrainConfig) -> str:
    terms = ["BCEWithLogits + soft Dice (batch)"]
    if config.size_balance_voxels > 0:
        terms.append(f"nodule voxels weighted by clip({config.size_balance_voxels:g}/n, 1, 10)")
    if config.wall_negative_weight != 1.0:
        near = f" within {config.wall_near_nodule_voxels} voxels of a nodule" if config.wall_near_nodule_voxels > 0 else ""
        terms.append(f"unlabelled voxels at the lung's wall weighted {config.wall_negative_weight:g}{near}")
    if config.peak_weight > 0:
        terms.append(f"+ {config.peak_weight:g} x -log sigmoid(best 3 mm core inside the labels) per labelled patch")
    if config.background_peak_weight > 0:
        terms.append(f"+ {config.background_peak_weight:g} x -log(1 - sigmoid(best 3 mm core over 3 mm from the labels)) per patch")
    return ", ".join(terms)


@dataclass
class _Run:
    """The state one training run carries between its stages."""

    config: TrainConfig
    spec: ModelSpec
    data: TrainingData
    dev: str
    rank: int
    distributed: bool
    min_voxels: int
    lung_max: int


def _start(config: TrainConfig, spec: ModelSpec, data: TrainingData) -> _Run:
    """Pick the device (join the process group under ``torchrun``) and seed torch."""
    import torch

    from ..model import resolve_device

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        dev = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
    else:
        dev = resolve_device(config.device)
    torch.manual_seed(config.seed + rank)
    min_voxels = max(1, int(round(spec.min_volume_mm3 / float(np.prod(spec.spacing_mm)))))
    lung_max = int(scale_intensity_uint8(np.array([-500.0]), spec.hu_window)[0])
    return _Run(config, spec, data, dev, rank, distributed, min_voxels, lung_max)


def _network(run: _Run):
    """The network to train (from ``init`` when given), after mining hard negatives when asked; wrapped for DDP under ``torchrun``."""
    import torch

    config, dev = run.config, run.dev
    net = build_network(run.spec).to(dev)
    if config.init:
        net.load_state_dict(read_weights(Path(config.init).with_suffix(".pt")))
    if config.mine_hard:
        miner = net
        if config.mine_with:  # another model's false responses (e.g. the bundled model's, for a network trained afresh)
            miner = build_network(run.spec).to(dev)
            miner.load_state_dict(read_weights(Path(config.mine_with).with_suffix(".pt")))
        found = run.spec.threshold if config.missed_weight != 1.0 else None
        mine_hard_negatives(miner, run.data, dev, config.mine_threshold, run.min_voxels, found_threshold=found)
        run.data.meta["hard_negatives"]["model"] = str(config.mine_with or config.init)
        del miner
    if run.distributed:
        if dev.startswith("cuda"):  # SyncBatchNorm works on GPUs only
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev] if dev.startswith("cuda") else None)
    return net


def _sampler(run: _Run) -> PatchSampler:
    c = run.config
    return PatchSampler(
        run.data, c.patch, c.seed * 7919 + run.rank, run.lung_max, mix=c.mix, attached_weight=c.attached_weight, hu_window=run.spec.hu_window,
        faint_fraction=c.faint_fraction, small_weight=c.small_weight, faint_weight=c.faint_weight, pleural_fraction=c.pleural_fraction,
        missed_weight=c.missed_weight, fade_fraction=c.fade_fraction,
    )  # fmt: skip


def _loss(run: _Run, logits, x, y, dice):
    """BCE (with the voxel weights asked for) + soft Dice + the peak terms asked for."""
    import torch.nn.functional as F

    c = run.config
    weight = size_balanced_weights(y, c.size_balance_voxels) if c.size_balance_voxels > 0 else None
    if c.wall_negative_weight != 1.0:
        wall = wall_negative_weights(x, y, c.wall_negative_weight, run.lung_max / 255.0, near_nodule_voxels=c.wall_near_nodule_voxels)
        weight = wall if weight is None else weight * wall
    loss = F.binary_cross_entropy_with_logits(logits, y, weight=weight) + dice(logits, y)
    if c.peak_weight > 0:
        loss = loss + c.peak_weight * peak_loss(logits, y)
    if c.background_peak_weight > 0:
        loss = loss + c.background_peak_weight * background_peak_loss(logits, y)
    return loss


def _record(run: _Run, best: dict, loss_description: str) -> dict:
    """The training record saved with the model (how to reproduce it, and its best validation)."""
    c = run.config
    return {
        "command": c.command,
        "seed": c.seed,
        "data": run.data.meta,
        "patch": c.patch,
        "batch_size": c.batch_size,
        "lr": c.lr,
        "loss": loss_description,
        "optimizer": "AdamW, weight decay 1e-4, cosine decay",
        "device": run.dev,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "workers": c.workers,
        "mix": [float(v) for v in c.mix],
        "attached_weight": c.attached_weight,
        "faint_fraction": c.faint_fraction,
        "small_weight": c.small_weight,
        "faint_weight": c.faint_weight,
        "pleural_fraction": c.pleural_fraction,
        "fade_fraction": c.fade_fraction,
        "zoom": c.zoom,
        "peak_weight": c.peak_weight,
        "background_peak_weight": c.background_peak_weight,
        "missed_weight": c.missed_weight,
        "wall_negative_weight": c.wall_negative_weight,
        "wall_near_nodule_voxels": c.wall_near_nodule_voxels,
        "ema": c.ema,
        "size_balance_voxels": c.size_balance_voxels,
        "selection": {"fp_weight": c.fp_weight, "scan_fp_weight": c.scan_fp_weight, "threshold": run.spec.threshold},
        "init": str(c.init) if c.init else None,
        "init_training": _init_record(c.init),
        "best_validation": best,
    }


def _score(stats: dict, config: TrainConfig) -> float:
    """Checkpoint score: validation sensitivity minus weighted false candidates and stray voxels."""
    fp_scans = sum(stats.get("scan_false_responses", []))
    return stats["sensitivity"] - config.fp_weight * stats["fp_per_cube"] - 5.0 * stats["fp_voxel_fraction"] - config.scan_fp_weight * fp_scans


def train(data: TrainingData, output: str | os.PathLike, spec: ModelSpec | None = None, config: TrainConfig | None = None, **options) -> dict:
    """Train and save the best model (by validation sensitivity minus false candidates).

    Loss: binary cross-entropy with logits + soft Dice (batch-wise), plus the
    terms ``config`` asks for. AdamW with a cosine learning-rate decay over
    ``steps`` or ``max_minutes``, whichever ends first. Under ``torchrun`` each
    process trains on its own GPU with DistributedDataParallel; rank 0
    validates and saves. With ``workers`` > 0 that many processes draw the
    patches (Linux, fork).

    Args:
        data: cubes, masks and scans (:func:`.data.prepare_training_data` or :func:`.data.load_pack`).
        output: the model's ``.json`` (weights beside it as ``.pt``; a ``_training_log.jsonl`` too).
        spec: architecture, preprocessing and detection settings (default :class:`ModelSpec`).
        config: how to train; or give its fields as keyword ``options`` (``steps=...``).

    Returns:
        The final training record (also stored in the model's JSON).

    Raises:
        TrainConfigError: a setting out of range (a ``ValueError``).
    """
    import torch
    from monai.losses import DiceLoss

    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = replace(config, **options)
    spec = spec or ModelSpec()
    run = _start(config, spec, data)
    net = _network(run)
    model = getattr(net, "module", net)  # the network itself, also under DistributedDataParallel
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    dice = DiceLoss(sigmoid=True, batch=True)
    sampler = _sampler(run)
    averaged = None
    if config.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
        averaged.update_parameters(model)  # the average starts at the initial (e.g. --init) weights
    use_amp = run.dev.startswith("cuda")
    if use_amp:
        torch.backends.cudnn.benchmark = True
    stream = _batch_stream(sampler, config.batch_size, config.seed * 1000 + run.rank, config.workers, pin_memory=use_amp, zoom=config.zoom)
    loss_description = _loss_description(config)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.stem + "_training_log.jsonl")
    t0 = time.time()
    best, best_score, history, kept = None, -1e9, [], model
    for step in range(1, config.steps + 1):
        frac = step / config.steps
        if config.max_minutes:
            frac = min(1.0, max(frac, (time.time() - t0) / 60.0 / config.max_minutes))
        for g in opt.param_groups:
            g["lr"] = config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        x, y = next(stream)
        x, y = x.to(run.dev, non_blocking=True), y.to(run.dev, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = net(x)
        loss = _loss(run, logits.float(), x, y, dice)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if averaged is not None:
            averaged.update_parameters(model)
        last = step == config.steps or (config.max_minutes is not None and (time.time() - t0) / 60.0 >= config.max_minutes)
        if run.distributed:  # every rank stops at the same step (rank 0's clock decides)
            flag = torch.tensor([1.0 if last else 0.0], device=run.dev)
            torch.distributed.broadcast(flag, src=0)
            last = bool(flag.item())
        if run.rank == 0 and (step % config.val_every == 0 or last):
            kept = averaged.module if averaged is not None else model
            stats = _validate(kept, data, run.dev, spec.threshold, run.min_voxels, scans=config.scan_fp_weight > 0)
            stats.update(step=step, minutes=round((time.time() - t0) / 60.0, 2), loss=round(float(loss.item()), 4), lr=opt.param_groups[0]["lr"])
            history.append(stats)
            with open(log_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
            log.info("step %d: %s", step, stats)
            score = _score(stats, config)
            if score > best_score:
                best_score, best = score, dict(stats)
                spec.training = _record(run, best, loss_description)
                save_model(kept, spec, out)
        if last:
            break
    stream.close()  # stops the patch workers
    if run.rank == 0 and best is not None:
        _finish(spec, out, kept, history, t0, config.save_last)
    if run.distributed:  # tear down together: the other ranks wait here until rank 0 has validated and saved
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return spec.training


def _finish(spec: ModelSpec, out: Path, kept, history: list, t0: float, save_last: bool) -> None:
    """Store the validation history with the best model, and save the last step's weights when asked."""
    spec.training["history"] = history
    spec.training["total_minutes"] = round((time.time() - t0) / 60.0, 2)
    spec.to_json(out)
    if save_last:
        last_record = {k: v for k, v in spec.training.items() if k != "best_validation"}
        last_record.update(checkpoint="last", last_validation=history[-1])
        save_model(kept, replace(spec, training=last_record), out.with_name(out.stem + "_last.json"))

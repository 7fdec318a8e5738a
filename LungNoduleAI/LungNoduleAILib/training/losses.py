"""Loss terms beside BCE + Dice: peak terms for detection, voxel weights for small nodules and the lung wall."""

from __future__ import annotations


def peak_loss(logits, y, core: int = 3):
    """Detection term: ``-log sigmoid(peak)`` averaged over the patches that hold a labelled nodule.

    ``peak`` is the highest logit, averaged over a cube of ``core`` voxels a
    side, inside the patch's labels. Voxel-wise losses are content when most
    of a nodule's voxels are right; a candidate needs only a core above the
    threshold, and a faint nodule against the pleura can end with no such core
    at all. This term pushes up the best core of every labelled patch, however
    few voxels it has.

    Args:
        logits: network outputs ``(B, 1, P, P, P)``.
        y: labels ``(B, 1, P, P, P)`` (0/1).
        core: side of the averaging cube (voxels, 1 mm).

    Returns:
        A scalar (0, with a gradient, when no patch has a label).
    """
    import torch.nn.functional as F

    labelled = y > 0.5
    has = labelled.flatten(1).any(dim=1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    peak = _core_logits(logits, core).masked_fill(~labelled, float("-inf")).flatten(1).max(dim=1).values[has]
    return F.softplus(-peak).mean()


def background_peak_loss(logits, y, core: int = 3, margin: int = 3):
    """False-candidate term: ``-log(1 - sigmoid(peak))`` averaged over the patches.

    ``peak`` is the highest logit, averaged over a cube of ``core`` voxels a
    side, among the voxels more than ``margin`` voxels from any label: the
    core of the patch's most confident false candidate. The counterpart of
    :func:`peak_loss`. Voxel-wise cross-entropy spreads its push over every
    background voxel; a false candidate needs only one core above the
    threshold, and this term pushes down that core in each patch, whatever
    surrounds it.

    Args:
        logits: network outputs ``(B, 1, P, P, P)``.
        y: labels ``(B, 1, P, P, P)`` (0/1).
        core: side of the averaging cube (voxels, 1 mm).
        margin: voxels (1 mm) around the labels left out, so that a nodule's
            rim is not pushed down.

    Returns:
        A scalar (0, with a gradient, when no patch has a voxel that far from its labels).
    """
    import torch.nn.functional as F

    free = _dilate((y > 0.5).float(), margin) < 0.5
    has = free.flatten(1).any(dim=1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    peak = _core_logits(logits, core).masked_fill(~free, float("-inf")).flatten(1).max(dim=1).values[has]
    return F.softplus(peak).mean()


def _core_logits(logits, core: int):
    """Logits ``(B, 1, P, P, P)`` averaged over a cube of ``core`` voxels a side (padding left out at the faces)."""
    import torch.nn.functional as F

    return F.avg_pool3d(logits, core, stride=1, padding=core // 2, count_include_pad=False) if core > 1 else logits


def _dilate(v, r: int):
    """Max of ``v`` ``(B, 1, P, P, P)`` over a ``(2r + 1)^3`` cube, one axis at a time (3 (2r + 1) reads a voxel, not (2r + 1)^3)."""
    import torch.nn.functional as F

    for k in ((2 * r + 1, 1, 1), (1, 2 * r + 1, 1), (1, 1, 2 * r + 1)):
        v = F.max_pool3d(v, k, 1, tuple(n // 2 for n in k))
    return v


def size_balanced_weights(y, reference_voxels: float, max_weight: float = 10.0):
    """Cross-entropy weights ``(B, 1, P, P, P)`` that make small nodules count more.

    The labelled voxels of a patch with ``n`` of them weigh
    ``clip(reference_voxels / n, 1, max_weight)``; every other voxel weighs 1.

    Args:
        y: labels ``(B, 1, P, P, P)`` (0/1).
        reference_voxels: labelled voxels at which the weight reaches 1 (e.g. 500, a 10 mm nodule at 1 mm).
    """
    n = y.sum(dim=(2, 3, 4), keepdim=True).clamp(min=1.0)
    return 1.0 + (y > 0) * ((reference_voxels / n).clamp(1.0, max_weight) - 1.0)


def wall_negative_weights(x, y, wall_weight: float, lung_max: float, wall_voxels: int = 4, band_voxels: int = 2, near_nodule_voxels: int = 0):
    """Cross-entropy weights ``(B, 1, P, P, P)`` that let negatives press less on the lung's wall.

    Voxels without a nodule label that lie within ``band_voxels`` of both the
    lung (intensity <= ``lung_max``) and thick tissue weigh ``wall_weight``;
    every other voxel weighs 1. Thick tissue is tissue (> ``lung_max``) that
    survives an opening with a ``2 wall_voxels + 1`` cube: chest wall,
    mediastinum, diaphragm, not vessels (as :func:`nodule_context`, with a
    cube for the ball). Negatives (lung patches, erased cubes, mined false
    responses) are full of pleura; at full weight they teach the network that
    the lung's edge is never a nodule, which is what juxtapleural nodules pay for.

    Args:
        x: intensities ``(B, 1, P, P, P)`` scaled to [0, 1] (1 mm voxels).
        y: labels ``(B, 1, P, P, P)`` (0/1).
        wall_weight: weight of the negative voxels at the wall (0-1).
        lung_max: the scaled intensity of -500 HU: at or below it is lung.
        wall_voxels: half-width of the opening cube (voxels, 4 = 4 mm).
        band_voxels: how far from the interface a voxel still counts as at the wall (voxels).
        near_nodule_voxels: when > 0, only the wall within this many voxels
            of a labelled nodule is lightened (the rest of the pleura keeps
            teaching the network at full weight); 0 = the whole wall.
    """
    tissue = (x > lung_max).float()
    thick = _dilate(-_dilate(-tissue, wall_voxels), wall_voxels)  # opening: erode, then dilate
    at_wall = _dilate(thick, band_voxels) * _dilate(1.0 - tissue, band_voxels) * (y <= 0)
    if near_nodule_voxels > 0:
        at_wall = at_wall * _dilate((y > 0).float(), near_nodule_voxels)
    return 1.0 - (1.0 - wall_weight) * at_wall

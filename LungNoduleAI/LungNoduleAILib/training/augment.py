"""Batch augmentation on torch tensors: flips, axial rotations, intensity, noise, thick slices, zoom."""

from __future__ import annotations


def augment_batch(x, y, gen, zoom: float = 0.0):
    """Batch augmentation on torch tensors ``(B, 1, P, P, P)``: flips, axial rot90,
    intensity scale/shift, noise, simulated thick slices and, with ``zoom`` > 0,
    half of the batches rescaled by :func:`zoom_batch`."""
    import torch
    import torch.nn.functional as F

    if zoom > 0 and torch.rand(1, generator=gen).item() < 0.5:
        u = torch.rand(1, generator=gen).item() * 2 - 1
        x, y = zoom_batch(x, y, float((1.0 + zoom) ** u))
    for ax in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            x, y = x.flip(ax), y.flip(ax)
    k = int(torch.randint(0, 4, (1,), generator=gen).item())
    if k:
        x, y = torch.rot90(x, k, (3, 4)), torch.rot90(y, k, (3, 4))
    b = x.shape[0]
    scale = 1.0 + 0.1 * (torch.rand(b, 1, 1, 1, 1, generator=gen) * 2 - 1)
    shift = 0.04 * (torch.rand(b, 1, 1, 1, 1, generator=gen) * 2 - 1)
    sigma = 0.03 * torch.rand(b, 1, 1, 1, 1, generator=gen)
    x = x * scale.to(x.device) + shift.to(x.device) + torch.randn(x.shape, generator=gen).to(x.device) * sigma.to(x.device)
    if torch.rand(1, generator=gen).item() < 0.25:  # thick slices: down/up-sample along z
        f = float(1.5 + 1.5 * torch.rand(1, generator=gen).item())
        p = x.shape[2]
        x = F.interpolate(
            F.interpolate(x, size=(max(8, int(p / f)), p, p), mode="trilinear", align_corners=False), size=(p, p, p), mode="trilinear", align_corners=False
        )
    return x, y


def zoom_batch(x, y, factor: float):
    """Rescale patches ``(B, 1, P, P, P)`` about their centre by ``factor`` (> 1: nodules and
    vessels look larger, as at finer voxels), keeping the patch size: an enlarged patch is
    cropped centrally, a shrunk one padded by mirroring. Labels follow (trilinear, >= 0.5)."""
    import torch.nn.functional as F

    p = x.shape[2]
    n = max(8, int(round(p * factor)))
    if n == p:
        return x, y
    x = F.interpolate(x, size=(n, n, n), mode="trilinear", align_corners=False)
    y = (F.interpolate(y, size=(n, n, n), mode="trilinear", align_corners=False) >= 0.5).to(y.dtype)
    if n > p:
        a = (n - p) // 2
        return x[:, :, a : a + p, a : a + p, a : a + p].contiguous(), y[:, :, a : a + p, a : a + p, a : a + p].contiguous()
    a, b = (p - n) // 2, p - n - (p - n) // 2
    pads = (a, b, a, b, a, b)
    mode = "reflect" if max(a, b) < n else "replicate"
    return F.pad(x, pads, mode=mode), F.pad(y, pads, mode=mode)

"""Light training-time augmentation of network input batches (fine-tuning).

:class:`AugmentCollate` augments 2-D ``(N, C, H, W)`` batches and, for the 3-D networks of
volumetric fine-tuning, ``(N, C, D, H, W)`` batches the same way: a left-right mirror, an
in-plane rotation (about the depth axis), a shift along every axis and an intensity jitter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AugmentCollate", "augment_batch", "augment_volume_batch"]


class AugmentCollate:
    """Collate function that augments a training batch (a skorch ``iterator_train`` option).

    Random horizontal flip, rotation by up to ``max_rotation`` degrees, a shift of up to
    ``max_shift`` of the image size and an intensity jitter (contrast / brightness in
    normalised units). It draws from the global torch generator, which the fine-tuning
    estimator forks and seeds for every ensemble member.
    """

    def __init__(self, max_rotation=10.0, max_shift=0.05, contrast=0.1, brightness=0.1):
        self.max_rotation = max_rotation
        self.max_shift = max_shift
        self.contrast = contrast
        self.brightness = brightness

    def __call__(self, items):
        x, y = torch.utils.data.default_collate(items)
        if x.dim() == 5:
            return augment_volume_batch(x, self), y
        return augment_batch(x, self), y


def augment_batch(x: torch.Tensor, cfg: AugmentCollate) -> torch.Tensor:
    """Augmented copy of the NCHW batch ``x`` with the settings of ``cfg``."""
    n = x.shape[0]
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    angle = (torch.rand(n) * 2 - 1) * math.radians(cfg.max_rotation)
    shift = (torch.rand(n, 2) * 2 - 1) * 2 * cfg.max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with the per-image minimum (background) rather than zero (= mid-grey after norm)
    lo = x.amin(dim=(2, 3), keepdim=True)
    x = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + lo
    c = 1 + (torch.rand(n, 1, 1, 1) * 2 - 1) * cfg.contrast
    b = (torch.rand(n, 1, 1, 1) * 2 - 1) * cfg.brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean + b


def augment_volume_batch(x: torch.Tensor, cfg: AugmentCollate) -> torch.Tensor:
    """Augmented copy of the NCDHW batch ``x``: the 3-D counterpart of :func:`augment_batch`.

    Left-right mirror (the width axis), rotation about the depth axis (in the axial plane),
    a shift along each axis and the same intensity jitter.
    """
    n = x.shape[0]
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
    angle = (torch.rand(n) * 2 - 1) * math.radians(cfg.max_rotation)
    shift = (torch.rand(n, 3) * 2 - 1) * 2 * cfg.max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros(n), torch.ones(n)
    # affine_grid's coordinates are (x = width, y = height, z = depth)
    theta = torch.stack(
        [
            torch.stack([cos, -sin, zero, shift[:, 0]], 1),
            torch.stack([sin, cos, zero, shift[:, 1]], 1),
            torch.stack([zero, zero, one, shift[:, 2]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    lo = x.amin(dim=(2, 3, 4), keepdim=True)
    x = F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + lo
    c = 1 + (torch.rand(n, 1, 1, 1, 1) * 2 - 1) * cfg.contrast
    b = (torch.rand(n, 1, 1, 1, 1) * 2 - 1) * cfg.brightness
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    return (x - mean) * c + mean + b

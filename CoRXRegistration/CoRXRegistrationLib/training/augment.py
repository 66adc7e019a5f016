"""On-the-fly augmentation as the paper: left-right flip and a rotation of +-5 degrees about z.

The same transform is applied to all four images of a pair (fixed and moving CT and SPECT), so
the pair's correspondence is kept. Volumes are (B, 1, Z, Y, X) on an isotropic grid, x = left-right.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def sample_augmentation(rng: np.random.Generator, max_rotation_deg: float = 5.0, flip: bool = True) -> dict:
    return {"flip_lr": bool(flip and rng.random() < 0.5),
            "rotation_deg": float(rng.uniform(-max_rotation_deg, max_rotation_deg))}


def apply_augmentation(images: list, aug: dict) -> list:
    """Flip x and/or rotate every image about the z axis through the grid centre (trilinear, zero fill)."""
    out = [torch.flip(im, dims=(4,)) if aug["flip_lr"] else im for im in images]
    angle = math.radians(aug["rotation_deg"])
    if abs(angle) < 1e-9:
        return out
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=out[0].dtype)
    grid = F.affine_grid(theta[None].expand(out[0].shape[0], 3, 4), list(out[0].shape), align_corners=True)
    return [F.grid_sample(im, grid.to(im.device), mode="bilinear", padding_mode="zeros", align_corners=True)
            for im in out]

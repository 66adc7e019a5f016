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


def _rotation_grid(shape, angle: float, dtype) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=dtype)
    return F.affine_grid(theta[None].expand(shape[0], 3, 4), list(shape), align_corners=True)


def apply_augmentation(images: list, aug: dict) -> list:
    """Flip x and/or rotate every image about the z axis through the grid centre (trilinear, zero fill):
    the augmented image at p is the image at A p."""
    out = [torch.flip(im, dims=(4,)) if aug["flip_lr"] else im for im in images]
    angle = math.radians(aug["rotation_deg"])
    if abs(angle) < 1e-9:
        return out
    grid = _rotation_grid(out[0].shape, angle, out[0].dtype)
    return [F.grid_sample(im, grid.to(im.device), mode="bilinear", padding_mode="zeros", align_corners=True)
            for im in out]


def augment_displacement(displacement: torch.Tensor, aug: dict) -> torch.Tensor:
    """The displacement (B, 3, Z, Y, X) voxels, channels (z, y, x), of a pair augmented by
    :func:`apply_augmentation`: u'(p) = A^-1 u(A p). Needs equal Y and X sizes (a rotation in grid_sample
    units is one in voxels only then)."""
    if displacement.shape[3] != displacement.shape[4]:
        raise ValueError(f"rotating a displacement needs equal Y and X sizes, got {tuple(displacement.shape[2:])}")
    u = displacement
    if aug["flip_lr"]:
        u = torch.flip(u, dims=(4,)) * torch.tensor([1.0, 1.0, -1.0], dtype=u.dtype, device=u.device).view(1, 3, 1, 1, 1)
    angle = math.radians(aug["rotation_deg"])
    if abs(angle) < 1e-9:
        return u
    grid = _rotation_grid(u.shape, angle, u.dtype).to(u.device)
    u = F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=True)
    c, s = math.cos(angle), math.sin(angle)
    uz, uy, ux = u[:, 0], u[:, 1], u[:, 2]
    return torch.stack([uz, -s * ux + c * uy, c * ux + s * uy], dim=1)

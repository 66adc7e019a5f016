"""Resampling volumes between grids, optionally through a displacement field.

All warping in CoRX goes through :func:`resample`: for every voxel centre p of the
target grid (LPS mm), the source image is sampled at ``p + u(p)`` where ``u`` is an
optional displacement field on the target grid (resampling convention, LPS mm).
Grid-to-grid resampling (no field, fill outside) uses SimpleITK and needs no torch, so the TIA
path and the Slicer modules load and run without it; sampling through a field uses torch's
``grid_sample`` (multi-threaded, CPU or GPU), imported on first use.
"""
from __future__ import annotations

import numpy as np

from .geometry import Geometry
from .progress import check_cancel

_MODES = {"linear": "bilinear", "nearest": "nearest"}


def lps_to_normalised_grid(points_lps, source: Geometry):
    """LPS mm points (..., 3) tensor -> grid_sample coordinates in [-1, 1] for ``source`` (align_corners)."""
    import torch
    a = source.direction_matrix @ np.diag(source.spacing)
    a_inv = torch.as_tensor(np.linalg.inv(a), dtype=points_lps.dtype, device=points_lps.device)
    origin = torch.as_tensor(source.origin, dtype=points_lps.dtype, device=points_lps.device)
    ijk = (points_lps - origin) @ a_inv.T
    size = torch.as_tensor([max(n - 1, 1) for n in source.size_xyz], dtype=points_lps.dtype,
                           device=points_lps.device)
    return 2.0 * ijk / size - 1.0


def sample_at(volume, source: Geometry, points_lps, mode: str = "linear", fill: float = 0.0,
              padding: str = "zeros"):
    """Sample ``volume`` (z, y, x) or (C, z, y, x) array/tensor on ``source`` at LPS points (..., 3).

    Returns a tensor of shape points.shape[:-1] (or (C,) + that). Points outside the
    source grid take ``fill`` (padding="zeros") or the nearest edge value (padding="border").
    """
    import torch
    import torch.nn.functional as F
    vol = torch.as_tensor(volume)
    squeeze = vol.dim() == 3
    if squeeze:
        vol = vol[None]
    if tuple(vol.shape[1:]) != source.shape:
        raise ValueError(f"volume shape {tuple(vol.shape[1:])} does not match its geometry {source.shape}")
    pts = torch.as_tensor(points_lps, dtype=torch.float32)
    out_shape = pts.shape[:-1]
    grid = lps_to_normalised_grid(pts.reshape(1, -1, 1, 1, 3).to(vol.device), source)
    dtype = vol.dtype
    vol_f = vol.float()
    if fill != 0.0:
        vol_f = vol_f - fill
    out = F.grid_sample(vol_f[None], grid, mode=_MODES[mode], padding_mode=padding, align_corners=True)
    out = out.reshape((vol.shape[0],) + tuple(out_shape))
    if fill != 0.0:
        out = out + fill
    if not torch.is_floating_point(torch.empty((), dtype=dtype)):
        out = out.round().to(dtype)
    return out[0] if squeeze else out


def resample(volume: np.ndarray, source: Geometry, target: Geometry, displacement=None,
             mode: str = "linear", fill: float = 0.0, chunk_slices: int = 32,
             displacement_spacing_mm: float | None = None, padding: str = "zeros", cancel=None) -> np.ndarray:
    """Resample ``volume`` from ``source`` onto ``target``, through ``displacement`` if given.

    displacement: None, a (z, y, x, 3) LPS-mm array on ``target`` (resampling convention),
    or a callable mapping LPS points (..., 3) to displacements (..., 3).
    With a callable and ``displacement_spacing_mm``, the callable is evaluated on a coarser
    version of ``target`` (at most that spacing) and interpolated trilinearly: for smooth fields
    this saves most of the time on large grids.
    Returns a numpy array on ``target`` (float32 for float input, else the input dtype).
    Outside ``source``: ``fill`` (padding="zeros") or the nearest edge value (padding="border").
    Work is chunked along z so a large CT grid never needs the whole coordinate grid at once;
    ``cancel() -> bool`` is asked before every chunk (:class:`.progress.Cancelled`).
    Without a displacement and with padding="zeros" this is SimpleITK's resampler (no torch), on
    ``source`` padded by one voxel of ``fill`` so that it gives the same values as the torch path
    everywhere, the band just outside the edge voxels included (blending towards ``fill``).
    """
    volume = np.asarray(volume)
    if displacement is None and padding == "zeros":
        return _resample_grid(volume, source, target, mode, fill)
    import torch
    if callable(displacement) and displacement_spacing_mm:
        displacement = displacement_on_grid(displacement, target, displacement_spacing_mm)
    if isinstance(displacement, np.ndarray) and displacement.shape != target.shape + (3,):
        raise ValueError(f"displacement shape {displacement.shape} does not match target {target.shape + (3,)}")
    if volume.dtype == np.float64:
        volume = volume.astype(np.float32)
    vol_t = torch.from_numpy(np.ascontiguousarray(volume))
    out = np.empty(target.shape, dtype=np.float32 if np.issubdtype(volume.dtype, np.floating) else volume.dtype)
    a = (target.direction_matrix @ np.diag(target.spacing)).astype(np.float32)
    nz, ny, nx = target.shape
    jj, ii = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
    for z0 in range(0, nz, chunk_slices):
        check_cancel(cancel, "while resampling")
        z1 = min(nz, z0 + chunk_slices)
        kk = np.arange(z0, z1, dtype=np.float32)[:, None, None]
        ijk = np.stack(np.broadcast_arrays(ii[None], jj[None], kk), axis=-1)
        pts = ijk @ a.T + np.asarray(target.origin, np.float32)
        if callable(displacement):
            pts = pts + np.asarray(displacement(pts.reshape(-1, 3)), np.float32).reshape(pts.shape)
        elif displacement is not None:
            pts = pts + displacement[z0:z1]
        out[z0:z1] = sample_at(vol_t, source, torch.from_numpy(pts), mode=mode, fill=fill, padding=padding).numpy()
    return out


def _resample_grid(volume: np.ndarray, source: Geometry, target: Geometry, mode: str, fill: float) -> np.ndarray:
    """Grid to grid with SimpleITK (identity transform); dtype as :func:`resample`. The source is padded
    by one voxel of ``fill``: within one voxel outside it the value then blends towards ``fill`` as
    grid_sample's zero padding does (ITK alone would keep the edge value over half a voxel), which is
    what the network was trained with."""
    import SimpleITK as sitk

    from .imageio import to_sitk
    if volume.shape != source.shape:
        raise ValueError(f"volume shape {volume.shape} does not match its geometry {source.shape}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    floating = np.issubdtype(volume.dtype, np.floating)
    as_bool = volume.dtype == np.bool_
    data = volume.astype(np.float32) if floating else volume.astype(np.uint8) if as_bool else volume
    padded = np.pad(data, 1, constant_values=np.asarray(fill).astype(data.dtype))
    padded_grid = Geometry(tuple(n + 2 for n in source.shape), source.spacing,
                           tuple(source.index_to_lps([-1.0, -1.0, -1.0])), source.direction)
    image = to_sitk(padded, padded_grid)
    out = sitk.Resample(image, list(target.size_xyz), sitk.Transform(),
                        sitk.sitkLinear if mode == "linear" else sitk.sitkNearestNeighbor,
                        list(target.origin), list(target.spacing), list(target.direction), float(fill),
                        image.GetPixelID())
    array = sitk.GetArrayFromImage(out)
    if as_bool:
        return array.astype(np.bool_)
    return array.astype(np.float32, copy=False) if floating else array


def displacement_on_grid(displacement_fn, target: Geometry, max_spacing_mm: float) -> np.ndarray:
    """Evaluate a smooth displacement callable on a coarse copy of ``target`` and upsample it.

    The coarse grid keeps the first and last voxel of every axis (align_corners), so values at
    its nodes are exact. Returns (z, y, x, 3) float32 on ``target``.
    """
    coarse_shape = tuple(max(2, int(np.ceil((n - 1) * sp / max_spacing_mm)) + 1) if n > 1 else 1
                         for n, sp in zip(target.shape, reversed(target.spacing)))
    coarse_spacing = tuple(sp * (n - 1) / max(c - 1, 1)
                           for n, sp, c in zip(reversed(target.shape), target.spacing, reversed(coarse_shape)))
    coarse = Geometry(coarse_shape, coarse_spacing, target.origin, target.direction)
    pts = coarse.lps_grid().reshape(-1, 3)
    d = np.asarray(displacement_fn(pts), np.float32).reshape(coarse_shape + (3,))
    import torch
    import torch.nn.functional as F
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(d, -1, 0)))[None]
    up = F.interpolate(t, size=target.shape, mode="trilinear", align_corners=True)[0]
    return np.ascontiguousarray(up.permute(1, 2, 3, 0).numpy())


def sample_vectors(field_zyx3: np.ndarray, geometry: Geometry, points_lps) -> np.ndarray:
    """Trilinear samples (..., 3) of a (z, y, x, 3) vector field at LPS points; edge values outside."""
    import torch
    pts = torch.as_tensor(np.asarray(points_lps, np.float32))
    vol = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(field_zyx3, np.float32), -1, 0)))
    return np.moveaxis(sample_at(vol, geometry, pts, padding="border").numpy(), 0, -1)


def resample_field(field_zyx3: np.ndarray, source: Geometry, target: Geometry, cancel=None) -> np.ndarray:
    """A (z, y, x, 3) displacement field on ``source`` evaluated on ``target`` (trilinear; edge
    vectors continue outside ``source``). The vectors themselves are physical (LPS mm): unchanged."""
    field = np.asarray(field_zyx3, np.float32)
    if field.shape != source.shape + (3,):
        raise ValueError(f"field shape {field.shape} does not match its geometry {source.shape + (3,)}")
    return np.stack([resample(field[..., c], source, target, padding="border", cancel=cancel) for c in range(3)],
                    axis=-1)

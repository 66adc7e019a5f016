"""Resampling volumes between grids, optionally through a displacement field.

All warping in CoRX goes through :func:`resample` and :func:`warp_with_field`: for every voxel
centre p of the target grid (LPS mm), the source image is sampled at ``p + u(p)`` where ``u`` is an
optional displacement field (resampling convention, LPS mm), on the target grid or on a grid of its
own (linear interpolation, edge vectors continuing outside it).
Grid-to-grid resampling and sampling through a dense field use SimpleITK (multi-threaded, no torch),
so the TIA path and the Slicer modules load and run without torch and no full-resolution field is
ever built where the field lives on a coarser grid; a displacement given as a callable, and edge
padding of the source, use torch's ``grid_sample``, imported on first use. The network's own
warping, which needs gradients, is :mod:`network.transform`.
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
    With padding="zeros" and no displacement or an array, this is :func:`warp_with_field` (SimpleITK,
    no torch): ``source`` padded by one voxel of ``fill`` so that it gives the same values as the torch
    path everywhere, the band just outside the edge voxels included (blending towards ``fill``).
    Otherwise (a callable, or padding="border") torch samples in chunks along z, so a large CT grid
    never needs the whole coordinate grid at once; ``cancel() -> bool`` is asked before the work and
    every chunk (:class:`.progress.Cancelled`).
    """
    volume = np.asarray(volume)
    check_cancel(cancel, "while resampling")
    if padding == "zeros" and (displacement is None or isinstance(displacement, np.ndarray)):
        return warp_with_field(volume, source, target, displacement, target, mode=mode, fill=fill)
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


def _sitk_source(volume: np.ndarray, source: Geometry, mode: str, fill: float):
    """(SimpleITK image of ``volume`` padded by one voxel of ``fill``, output kind): within one voxel
    outside the source the value then blends towards ``fill`` as grid_sample's zero padding does (ITK
    alone would keep the edge value over half a voxel), which is what the network was trained with."""
    from .imageio import to_sitk
    if volume.shape != source.shape:
        raise ValueError(f"volume shape {volume.shape} does not match its geometry {source.shape}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    kind = "float" if np.issubdtype(volume.dtype, np.floating) else "bool" if volume.dtype == np.bool_ else "int"
    data = volume.astype(np.float32) if kind == "float" else volume.astype(np.uint8) if kind == "bool" else volume
    padded = np.pad(data, 1, constant_values=np.asarray(fill).astype(data.dtype))
    padded_grid = Geometry(tuple(n + 2 for n in source.shape), source.spacing,
                           tuple(source.index_to_lps([-1.0, -1.0, -1.0])), source.direction)
    return to_sitk(padded, padded_grid), kind


def _covering(field_zyx3: np.ndarray, geometry: Geometry, target: Geometry) -> tuple:
    """(field, its geometry) grown by edge vectors until it covers every voxel centre of ``target``
    with a margin of one voxel, so that interpolating it there is the edge-continued field."""
    if geometry.same_grid(target):
        return field_zyx3, geometry
    corners = np.array([[i, j, k] for i in (0, target.size_xyz[0] - 1) for j in (0, target.size_xyz[1] - 1)
                        for k in (0, target.size_xyz[2] - 1)], float)
    ijk = geometry.lps_to_index(target.index_to_lps(corners))
    last = np.asarray(geometry.size_xyz, float) - 1.0
    below = np.maximum(0, np.ceil(-ijk.min(axis=0)) + 1).astype(int)            # (i, j, k)
    above = np.maximum(0, np.ceil(ijk.max(axis=0) - last) + 1).astype(int)
    if not below.any() and not above.any():
        return field_zyx3, geometry
    pad = [(int(below[a]), int(above[a])) for a in (2, 1, 0)] + [(0, 0)]
    grown = Geometry(tuple(n + lo + hi for n, (lo, hi) in zip(geometry.shape, pad[:3])), geometry.spacing,
                     tuple(geometry.index_to_lps(-below.astype(float))), geometry.direction)
    return np.pad(field_zyx3, pad, mode="edge"), grown


def _sitk_field_transform(field_zyx3: np.ndarray, geometry: Geometry, target: Geometry):
    """A SimpleITK DisplacementFieldTransform (p -> p + u(p), u linear between the nodes, edge vectors
    outside ``geometry``) valid at every voxel centre of ``target``."""
    import SimpleITK as sitk

    from .imageio import to_sitk
    field = np.asarray(field_zyx3)
    if field.shape != geometry.shape + (3,):
        raise ValueError(f"displacement shape {field.shape} does not match its grid {geometry.shape + (3,)}")
    field, grid = _covering(field, geometry, target)
    # ITK's field is float64 (the transform takes the image over): a float32 field is cast inside
    # SimpleITK, so that no float64 copy of it is made in numpy first (0.13 -> 0.08 GB for a 128^3 field)
    image = to_sitk(field, grid, is_vector=True)
    del field
    if image.GetPixelID() != sitk.sitkVectorFloat64:
        image = sitk.Cast(image, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(image)


def _target_grid_args(target: Geometry) -> tuple:
    return list(target.size_xyz), list(target.origin), list(target.spacing), list(target.direction)


def warp_with_field(volume: np.ndarray, source: Geometry, target: Geometry, displacement=None,
                    field_geometry: Geometry | None = None, mode: str = "linear", fill: float = 0.0,
                    round_integers: bool = True) -> np.ndarray:
    """``volume`` on ``source`` sampled at p + u(p) for every voxel centre p of ``target`` (SimpleITK).

    ``displacement``: None (grid to grid) or a (z, y, x, 3) LPS-mm field on ``field_geometry`` (default:
    ``target``), interpolated linearly, edge vectors continuing outside it. Outside ``source`` the value
    is ``fill`` (blending towards it within one voxel of the edge). Returns float32 for float input,
    else the input dtype (integers rounded; with ``round_integers=False`` float32, as interpolated)."""
    import SimpleITK as sitk
    volume = np.asarray(volume)
    image, kind = _sitk_source(volume, source, mode, fill)
    transform = sitk.Transform() if displacement is None else \
        _sitk_field_transform(displacement, field_geometry or target, target)
    size, origin, spacing, direction = _target_grid_args(target)
    exact = mode == "nearest" and kind != "float"      # nearest labels come back in their own type, unrounded
    out = sitk.Resample(image, size, transform, sitk.sitkLinear if mode == "linear" else sitk.sitkNearestNeighbor,
                        origin, spacing, direction, float(fill), image.GetPixelID() if exact else sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(out)
    if kind == "bool":
        return array > 0 if exact else array > 0.5
    if exact:
        return array.astype(volume.dtype, copy=False)
    if kind == "int" and round_integers:
        info = np.iinfo(volume.dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(volume.dtype)
    return array


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
    vectors continue outside ``source``; SimpleITK). The vectors themselves are physical (LPS mm):
    unchanged. ``cancel() -> bool`` is asked before the work (:class:`.progress.Cancelled`)."""
    import SimpleITK as sitk

    from .imageio import to_sitk
    field = np.asarray(field_zyx3, np.float32)
    if field.shape != source.shape + (3,):
        raise ValueError(f"field shape {field.shape} does not match its geometry {source.shape + (3,)}")
    check_cancel(cancel, "while resampling")
    if source.same_grid(target):
        return field.copy()
    field, grid = _covering(field, source, target)
    size, origin, spacing, direction = _target_grid_args(target)
    out = sitk.Resample(to_sitk(field, grid, is_vector=True), size, sitk.Transform(), sitk.sitkLinear,
                        origin, spacing, direction, 0.0, sitk.sitkVectorFloat32)
    return sitk.GetArrayFromImage(out)

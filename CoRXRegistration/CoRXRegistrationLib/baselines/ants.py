"""ANTs SyN, CT-driven: the strongest classical deformable registration a physicist is likely to pick.

``antsRegistration`` through the ``antspyx`` wheel (optional dependency: the project's ``baseline``
extra), with antspyx's own "SyN" recipe: an affine stage (Mattes MI, 32 bins, 20 % regular sampling,
shrink factors 4-2-2-1) then symmetric normalisation (SyN[0.2, 3, 0], Mattes MI, 32 bins, 40-20-0
iterations at shrink factors 4-2-1), started from the identity (serial scans share the scanner's
frame; antspyx's default centre-of-intensity start is meaningless for HU, which are mostly negative).
The moving CT is registered to the
fixed CT on the network grid; the composed (affine + SyN) forward transform is returned as one dense
field, which the evaluation then applies to the SPECT as to the CT.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..geometry import Geometry

#: antspyx's recipe and the settings this adapter passes (stated in reports).
SYN_SETTINGS = {"type_of_transform": "SyN", "aff_metric": "mattes", "syn_metric": "mattes",
                "reg_iterations": (40, 20, 0), "initial_transform": "Identity", "random_seed": 1}


class AntsUnavailable(RuntimeError):
    """antspyx is not installed."""


def _ants():
    try:
        import ants
        import ants.config
        return ants
    except ImportError as exc:
        raise AntsUnavailable("the ANTs SyN baseline needs the antspyx wheel: pip install antspyx "
                              "(or install the project with the 'baseline' extra)") from exc


def ants_available() -> str:
    """'' when antspyx imports, else why not (one line)."""
    try:
        _ants()
        return ""
    except AntsUnavailable as exc:
        return str(exc)


def _to_ants(ants, array: np.ndarray, geometry: Geometry):
    """An ANTs image of a (z, y, x) array; ANTs indexes (x, y, z)."""
    return ants.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)),
                           origin=[float(v) for v in geometry.origin], spacing=[float(v) for v in geometry.spacing],
                           direction=geometry.direction_matrix.astype(np.float64))


def ants_register_ct(fixed_ct: np.ndarray, moving_ct: np.ndarray, geometry: Geometry,
                     settings: dict | None = None) -> np.ndarray:
    """Register moving CT to fixed CT (HU, both on ``geometry``) with ANTs SyN; returns the (Z, Y, X, 3)
    LPS-mm field in the resampling convention (fixed point p -> moving point p + u(p)), components
    (x, y, z), as ANTs' forward transforms map. ``settings``: :data:`SYN_SETTINGS` by default."""
    ants = _ants()
    s = dict(SYN_SETTINGS, **(settings or {}))
    fixed = _to_ants(ants, fixed_ct, geometry)
    moving = _to_ants(ants, moving_ct, geometry)
    previous = ants.config._random_seed
    ants.config.set_ants_deterministic(on=False, seed_value=int(s["random_seed"]))   # seed only; threads unchanged
    try:
        with tempfile.TemporaryDirectory(prefix="corx-ants-") as tmp:
            result = ants.registration(fixed, moving, type_of_transform=s["type_of_transform"],
                                       aff_metric=s["aff_metric"], syn_metric=s["syn_metric"],
                                       reg_iterations=tuple(s["reg_iterations"]),
                                       initial_transform=s["initial_transform"], outprefix=str(Path(tmp) / "syn_"))
            composed = ants.apply_transforms(fixed, moving, result["fwdtransforms"], compose=str(Path(tmp) / "all_"))
            if composed is None:
                raise RuntimeError("antsApplyTransforms wrote no composed displacement field")
            field = ants.image_read(composed).numpy()          # (X, Y, Z, 3), LPS mm
    finally:
        ants.config._random_seed = previous
    out = np.ascontiguousarray(np.asarray(field, np.float32).transpose(2, 1, 0, 3))
    if out.shape != geometry.shape + (3,):
        raise RuntimeError(f"ANTs returned a field of shape {out.shape}, expected {geometry.shape + (3,)}")
    return out

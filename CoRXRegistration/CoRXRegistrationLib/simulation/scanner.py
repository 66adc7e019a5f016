"""SPECT imaged the way a scanner images it: forward projection with attenuation and a depth-dependent
collimator-detector response, Poisson counts, OSEM reconstruction with attenuation and resolution
modelling, calibrated to Bq/mL. The optional extra ``scanner`` (pytomography: its rotate-and-sum
projector, SIMIND collimator database and NIST/CT attenuation tables) does the physics;
``pip install corx[scanner]``. The Gaussian image-space model of :mod:`.imaging` stays the default.

Chain, per acquisition (units in the names):

1. activity (Bq/mL) on the reconstruction grid (axis-aligned, the rotation axis = grid z), in MBq per
   voxel; the CT's HU on that grid as mu at the photopeak energy through the bilinear HU -> mu curve
   of pytomography's table for the CT's kVp (water 0.1352 /cm at 208 keV);
2. expected counts per view = S * t_view * f_decay * H(A): S the system sensitivity (cps/MBq, per
   detector, a parallel-hole collimator, so the same at every distance), t_view the time per view,
   f_decay = (1 - exp(-lambda T)) / (lambda T) over the whole acquisition T, H the projector (unit
   detection efficiency, attenuation, Gaussian collimator-detector response of FWHM(d) =
   sqrt((a d + b)^2 + c^2) for hole diameter/length of the collimator and the intrinsic resolution);
   circular orbit of radius ``orbit_radius_mm`` (at least 30 mm outside the body);
3. counts ~ Poisson(expected) per projection pixel;
4. OSEM (``osem_iterations`` x ``osem_subsets``) with the same attenuation and (``resolution_modelling``)
   response model;
5. Bq/mL = reconstruction / (S * t_view * f_decay) * 1e6 / voxel volume (mL): the activity
   concentration at acquisition start, by the calibration a phantom would give this scanner.

Importing pytomography silences every Python warning filter in the process: the filters are put back
after the import. Scatter is not simulated (no triple-energy-window estimate yet).
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..geometry import Geometry

LU177_HALF_LIFE_S = 6.647 * 24 * 3600.0


class ScannerUnavailable(RuntimeError):
    """The ``scanner`` extra (pytomography) is not installed."""


@dataclass(frozen=True)
class ScannerConfig:
    """A dual-head SPECT/CT acquiring 177Lu at 208 keV (units in the names)."""
    collimator: str = "SY-ME"                    # SIMIND code: Siemens Symbia medium-energy parallel hole
    energy_kev: float = 208.0
    intrinsic_fwhm_mm_at_140kev: float = 3.8
    views: int = 60                              # over 360 degrees
    seconds_per_view: float = 30.0               # 60 x 30 s = a 30 min acquisition
    sensitivity_cps_per_mbq: float = 9.6         # per detector, 208 keV 20 % window
    orbit_radius_mm: float | None = None         # None: 30 mm outside the body, at least 200 mm
    osem_iterations: int = 4
    osem_subsets: int = 10
    resolution_modelling: bool = True            # the reconstruction models the collimator response
    ct_kvp: float = 120.0

    def validate(self) -> None:
        if self.views < 4 or self.osem_subsets < 1 or self.views % self.osem_subsets:
            raise ValueError(f"views ({self.views}) must be >= 4 and a multiple of the subsets ({self.osem_subsets})")
        for name in ("energy_kev", "seconds_per_view", "sensitivity_cps_per_mbq", "osem_iterations"):
            if not getattr(self, name) > 0:
                raise ValueError(f"scanner {name} must be positive, found {getattr(self, name)!r}")

    @property
    def acquisition_s(self) -> float:
        return self.views * self.seconds_per_view

    def to_dict(self) -> dict:
        return asdict(self)


def load_pytomography():
    """The pytomography modules CoRX uses, imported with the process's warning filters kept."""
    filters = list(warnings.filters)
    try:
        with open(os.devnull, "w") as sink:                 # it prints a no-GPU line on import
            import contextlib
            with contextlib.redirect_stdout(sink):
                import pytomography
                from pytomography.algorithms import OSEM
                from pytomography.io.SPECT.dicom import get_psfmeta_from_scanner_params
                from pytomography.likelihoods import PoissonLogLikelihood
                from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta
                from pytomography.projectors.SPECT import SPECTSystemMatrix
                from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform
    except ImportError as exc:
        raise ScannerUnavailable("scanner-like SPECT needs the optional extra 'scanner' (pytomography): "
                                 f"pip install 'corx[scanner]' ({exc})") from None
    finally:
        warnings.filters[:] = filters
    pytomography.device = "cpu"              # CoRX hands it CPU tensors (a GPU would speed it up; not wired yet)
    return {"pytomography": pytomography, "OSEM": OSEM, "psf_meta": get_psfmeta_from_scanner_params,
            "likelihood": PoissonLogLikelihood, "object_meta": SPECTObjectMeta, "proj_meta": SPECTProjMeta,
            "system_matrix": SPECTSystemMatrix, "attenuation": SPECTAttenuationTransform, "psf": SPECTPSFTransform}


def scanner_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("pytomography") is not None


def hu_to_mu(ct_hu: np.ndarray, energy_kev: float = 208.0, ct_kvp: float = 120.0) -> np.ndarray:
    """Linear attenuation (1/cm) at the photopeak from HU: pytomography's bilinear table for the nearest
    tabulated energy and kVp (water below 0 HU, a bone-water line above)."""
    import pytomography
    table = Path(pytomography.__file__).parent / "data" / "ct_table.csv"
    with open(table) as fh:
        rows = [r for r in csv.DictReader(fh)]
    best = min(rows, key=lambda r: (abs(float(r["Energy"]) - energy_kev), abs(float(r["CT Energy"]) - ct_kvp)))
    lo, hi, water = float(best["Lower Coeff"]), float(best["Upper Coeff"]), float(best["Lower Constant"])
    hu = np.asarray(ct_hu, np.float64)
    mu = np.where(hu < 0, water + lo * hu, water + hi * hu)
    return np.clip(mu, 0.0, None).astype(np.float32)


def collimator_fwhm_mm(cfg: ScannerConfig, distance_mm) -> np.ndarray:
    """The collimator-detector FWHM (mm) at ``distance_mm`` from the collimator face, as the projector models it."""
    p = load_pytomography()["psf_meta"](cfg.collimator, cfg.energy_kev,
                                        intrinsic_resolution_140keV=cfg.intrinsic_fwhm_mm_at_140kev / 10.0)
    a, b, c = p.sigma_fit_params
    d_cm = np.asarray(distance_mm, float) / 10.0
    return 10.0 * 2.0 * math.sqrt(2.0 * math.log(2.0)) * np.sqrt((a * d_cm + b) ** 2 + c ** 2)


def _orbit_radius_mm(cfg: ScannerConfig, mu_xyz: np.ndarray, voxel_mm: float) -> float:
    if cfg.orbit_radius_mm is not None:
        return float(cfg.orbit_radius_mm)
    nx, ny = mu_xyz.shape[:2]
    body = mu_xyz.max(axis=2) > 0.05
    if not body.any():
        return 200.0
    ix, iy = np.nonzero(body)
    r = np.hypot((ix - (nx - 1) / 2.0) * voxel_mm, (iy - (ny - 1) / 2.0) * voxel_mm).max()
    return float(max(200.0, r + 30.0))


def _system(tools, cfg: ScannerConfig, mu_xyz: np.ndarray, geometry: Geometry, radius_mm: float, psf: bool = True):
    import torch
    sx, sy, sz = (s / 10.0 for s in geometry.spacing)
    shape = mu_xyz.shape
    object_meta = tools["object_meta"]((sx, sy, sz), shape)
    angles = np.linspace(0.0, 360.0, cfg.views, endpoint=False)
    proj_meta = tools["proj_meta"]((shape[0], shape[2]), (sx, sz), angles, np.full(cfg.views, radius_mm / 10.0))
    psf_meta = tools["psf_meta"](cfg.collimator, cfg.energy_kev,
                                 intrinsic_resolution_140keV=cfg.intrinsic_fwhm_mm_at_140kev / 10.0)
    transforms = [tools["attenuation"](torch.from_numpy(np.ascontiguousarray(mu_xyz)))]
    transforms += [tools["psf"](psf_meta)] if psf else []
    return tools["system_matrix"](transforms, [], object_meta, proj_meta)


def check_grid(geometry: Geometry) -> None:
    if not np.allclose(geometry.direction_matrix, np.eye(3), atol=1e-6):
        raise ValueError("the scanner model needs an axis-aligned reconstruction grid (rotation axis = z)")
    sx, sy, _ = geometry.spacing
    if abs(sx - sy) > 1e-6 or geometry.shape[1] != geometry.shape[2]:
        raise ValueError(f"the scanner model needs a square transaxial grid of square pixels, got "
                         f"{geometry.describe()}")


def image_spect(activity_bq_per_ml: np.ndarray, mu_per_cm: np.ndarray, geometry: Geometry, cfg: ScannerConfig,
                rng, noise: bool = True, mu_recon_per_cm: np.ndarray | None = None) -> tuple:
    """(reconstructed SPECT in Bq/mL at acquisition start (z, y, x) float32 on ``geometry``, info): the
    activity and the attenuation the photons cross, both on ``geometry`` (the reconstruction grid), through
    the chain of the module text. ``mu_recon_per_cm``: the attenuation map the reconstruction corrects with
    (the CT's, with its SPECT/CT offset; default: the true one). ``noise=False`` reconstructs the expected
    projections (no Poisson counts)."""
    import torch
    cfg.validate()
    check_grid(geometry)
    tools = load_pytomography()
    to_xyz = (2, 1, 0)
    voxel_ml = geometry.voxel_volume_ml
    lam = math.log(2.0) / LU177_HALF_LIFE_S
    f_decay = -math.expm1(-lam * cfg.acquisition_s) / (lam * cfg.acquisition_s)
    counts_per_mbq = cfg.sensitivity_cps_per_mbq * cfg.seconds_per_view * f_decay
    mbq = np.clip(np.asarray(activity_bq_per_ml, np.float64), 0.0, None) * voxel_ml * 1e-6
    mu_xyz = np.transpose(np.asarray(mu_per_cm, np.float32), to_xyz)
    radius = _orbit_radius_mm(cfg, mu_xyz, geometry.spacing[0])
    system = _system(tools, cfg, mu_xyz, geometry, radius)
    obj = torch.from_numpy(np.ascontiguousarray(np.transpose(mbq * counts_per_mbq, to_xyz)).astype(np.float32))
    with torch.no_grad():
        expected = system.forward(obj)
    expected_np = expected.numpy().astype(np.float64)
    counts = rng.poisson(np.clip(expected_np, 0.0, None)).astype(np.float32) if noise else expected_np.astype(
        np.float32)
    mu_recon = mu_xyz if mu_recon_per_cm is None else np.transpose(np.asarray(mu_recon_per_cm, np.float32), to_xyz)
    recon_system = system if (cfg.resolution_modelling and mu_recon_per_cm is None) else \
        _system(tools, cfg, mu_recon, geometry, radius, psf=cfg.resolution_modelling)
    likelihood = tools["likelihood"](recon_system, torch.from_numpy(counts))
    with torch.no_grad():
        recon = tools["OSEM"](likelihood)(n_iters=cfg.osem_iterations, n_subsets=cfg.osem_subsets)
    recon_np = np.transpose(recon.cpu().numpy().astype(np.float64), to_xyz)
    bq_per_ml = recon_np / counts_per_mbq * 1e6 / voxel_ml
    info = {"orbit_radius_mm": round(radius, 1), "total_counts": float(counts.sum()),
            "expected_counts": float(expected_np.sum()), "calibration_counts_per_mbq_per_view": counts_per_mbq,
            "decay_during_acquisition": f_decay, "fwhm_mm_at_100mm": float(collimator_fwhm_mm(cfg, 100.0)),
            "fwhm_mm_at_orbit": float(collimator_fwhm_mm(cfg, radius))}
    return bq_per_ml.astype(np.float32), info

"""Simulated serial SPECT/CT series with exact ground truth, and their manifest on disk.

Frames: the *reference anatomy* frame is the reference CT's frame. The reference SPECT
sees anatomy point a at ``a + s_ref`` (its SPECT/CT mismatch). Session t sees anatomy
point a at ``T_t(a)`` in CT and ``T_t(a) + s_t`` in SPECT. Ground-truth displacement
fields (resampling convention, LPS mm, fixed = reference, moving = session t):

* CT:    ``u_ct(x) = T_t(x) - x``
* SPECT: ``u_spect(x) = T_t(x - s_ref) + s_t - x``

both sampled on the reference SPECT grid. True activity, TIA and labels are given in the
reference SPECT frame (and labels also on the reference CT grid).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..geometry import Geometry
from ..imageio import IMAGE_SUFFIXES, write_displacement_field, write_image, write_seg_nrrd
from ..outputs import OutputError, OutputSet, inside, write_text
from ..resample import resample
from ..series_io import MANIFEST_FORMAT, MANIFEST_NAME
from . import anatomy as A
from .imaging import EmissionGrid, blur, render_ct, render_spect
from .kinetics import VoxelKinetics, sample_region_curves
from .motion import Landmarks, SessionMotion, sample_invertible_session, sample_spect_mismatch, session_field



@dataclass
class SimulationConfig:
    """Everything that defines a simulated series (units in the names)."""

    seed: int = 0
    anatomy: str = "procedural"           # "procedural" or "patient15"
    times_h: tuple = (4.0, 24.0, 48.0, 120.0)
    reference_index: int = 0
    injected_mbq: float = 7400.0
    phantom_spacing_mm: float = 2.0
    ct_spacing_mm: tuple = (1.5, 1.5, 3.75)
    ct_shape_zyx: tuple = (108, 300, 300)
    spect_spacing_mm: float = 4.42
    spect_shape_zyx: tuple = (96, 128, 128)
    spect_fwhm_mm: tuple = (12.0, 15.0)     # sampled per patient in this range
    counts_per_mbq_s: float = 3.0           # effective (noise-equivalent) sensitivity
    acquisition_s: float = 1800.0
    ct_noise_hu: float = 25.0
    max_shift_mm: float = 15.0
    max_rotation_deg: float = 5.0
    max_breathing_mm: float = 15.0
    spect_mismatch_scale: float = 1.0       # SPECT/CT shift within a session: SD (1, 1, 2) mm times this
    n_tumours: int | None = None            # None: 1-6 at random
    patient15_zip: str | None = None
    imaging: str = "gaussian"               # "gaussian" (image-space blur + Poisson) or "scanner" (projection + OSEM)
    scanner: dict | None = None             # ScannerConfig fields for imaging="scanner" (None: its defaults)
    scanner_truth_recon: bool = True        # scanner mode: also image the unmoved activity (truth/recon_unmoved_*)

    @staticmethod
    def preset(name: str, **overrides) -> "SimulationConfig":
        """'clinical' (default grids) or 'small' (coarse grids, for tests and quick looks)."""
        if name == "clinical":
            cfg = SimulationConfig()
        elif name == "small":
            cfg = SimulationConfig(phantom_spacing_mm=4.0, ct_spacing_mm=(3.0, 3.0, 5.0), ct_shape_zyx=(80, 140, 140),
                                   spect_spacing_mm=7.0, spect_shape_zyx=(56, 64, 64))
        else:
            raise ValueError(f"unknown preset {name!r} (use 'clinical' or 'small')")
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"unknown simulation setting {k!r}")
            setattr(cfg, k, v)
        return cfg

    def validate(self) -> None:
        t = np.asarray(self.times_h, float)
        if t.ndim != 1 or not np.all(np.isfinite(t)) or np.any(t <= 0) or np.any(np.diff(t) <= 0):
            raise ValueError(f"times_h must be positive and strictly increasing, got {self.times_h}")
        if len(t) < 2:                                # no reader accepts a one-time-point series
            raise ValueError(f"times_h: a series needs at least 2 time points, got {list(self.times_h)}")
        if not 0 <= self.reference_index < len(t):
            raise ValueError(f"reference_index {self.reference_index} is not one of the {len(t)} time points")
        if self.injected_mbq <= 0:
            raise ValueError("injected_mbq must be positive")
        if self.imaging not in ("gaussian", "scanner"):
            raise ValueError(f"imaging must be 'gaussian' or 'scanner', found {self.imaging!r}")
        if self.imaging == "scanner":
            self.scanner_config().validate()

    def scanner_config(self):
        from .scanner import ScannerConfig
        try:
            return ScannerConfig(**(self.scanner or {}))
        except TypeError as exc:
            raise ValueError(f"scanner settings: {exc}") from None


@dataclass
class SimulatedSeries:
    config: SimulationConfig
    phantom: A.Phantom
    ct: list                      # int16 HU per time point
    ct_geometry: list
    spect: list                   # float32 Bq/mL per time point
    spect_geometry: list
    motions: list                 # SessionMotion per time point
    truth_field_ct: dict          # time index -> (z, y, x, 3) on the reference SPECT grid
    truth_field_spect: dict
    truth_activity: list          # Bq/mL on the reference SPECT grid (no PSF)
    truth_tia: np.ndarray         # Bq h/mL on the reference SPECT grid (no PSF)
    truth_tia_psf: np.ndarray     # the same blurred by the SPECT resolution
    labels_spect: np.ndarray
    labels_ct: np.ndarray
    curves: dict
    voi_truth: dict               # VOI name -> {"labels", "volume_ml", "tia_mbq_h"}
    spect_fwhm_mm: float
    timing_s: dict = field(default_factory=dict)
    labels_session_spect: list = field(default_factory=list)   # tissue labels on each session's own SPECT grid
    truth_recon_unmoved: list = field(default_factory=list)    # scanner mode: the unmoved activity imaged alike
    imaging_info: list = field(default_factory=list)           # scanner mode: per time point counts, orbit, ...

    @property
    def reference_spect_geometry(self) -> Geometry:
        return self.spect_geometry[self.config.reference_index]

    @property
    def reference_ct_geometry(self) -> Geometry:
        return self.ct_geometry[self.config.reference_index]

    def voi_segmentation(self, max_outside: float = 0.05) -> tuple:
        """(VOI name -> mask, geometry): the phantom's own VOI labels (its 2 mm grid) where they lie in the
        reference SPECT's frame (the anatomy shifted by that session's SPECT/CT mismatch) — the segmentation a
        user draws on a CT that matches the SPECT, finer than the SPECT grid. VOIs more than ``max_outside``
        outside the reference SPECT's field of view are left out (their truth is the whole organ's)."""
        from TIAMappingLib.pipeline import fraction_outside
        g = self.phantom.geometry
        shift = np.asarray(self.motions[self.config.reference_index].spect_shift_mm, float)
        grid = Geometry(g.shape, g.spacing, tuple(np.asarray(g.origin) + shift), g.direction)
        masks = {n: np.isin(self.phantom.labels, v["labels"]) for n, v in self.voi_truth.items()}
        return {n: m for n, m in masks.items()
                if m.any() and fraction_outside(m, grid, self.reference_spect_geometry) <= max_outside}, grid

    def sessions(self) -> list:
        """Every time point as a SpectCt (CT as float32 HU, SPECT in Bq/mL), for registration."""
        from ..preprocess import SpectCt
        cfg = self.config
        return [SpectCt(ct.astype(np.float32), cg, sp, sg, label=f"seed {cfg.seed} {h:g} h")
                for ct, cg, sp, sg, h in zip(self.ct, self.ct_geometry, self.spect, self.spect_geometry, cfg.times_h)]


def _scanner_grids(cfg: SimulationConfig, rng, centre):
    """Per-session CT and SPECT grids: same scanner frame, table offset differs by session."""
    dz = float(rng.uniform(-8.0, 8.0))
    c = np.asarray(centre, float) + np.array([0.0, 0.0, dz])
    ct = Geometry.centred(cfg.ct_shape_zyx, cfg.ct_spacing_mm, c)
    spect = Geometry.centred(cfg.spect_shape_zyx, (cfg.spect_spacing_mm,) * 3, c + 0.5 * cfg.spect_spacing_mm)
    return ct, spect


def build_phantom(cfg: SimulationConfig, rng) -> A.Phantom:
    if cfg.anatomy == "procedural":
        return A.procedural_phantom(rng, cfg.phantom_spacing_mm, cfg.n_tumours)
    if cfg.anatomy == "patient15":
        from .patient15 import patient15_phantom
        return patient15_phantom(rng, cfg.patient15_zip, cfg.phantom_spacing_mm)
    raise ValueError(f"unknown anatomy {cfg.anatomy!r} (use 'procedural' or 'patient15')")


def simulate_series(cfg: SimulationConfig, progress=None, scanner_cache=None) -> SimulatedSeries:
    """Simulate one patient's serial SPECT/CT series with ground truth (deterministic per seed).
    ``scanner_cache``: a folder where scanner-mode reconstructions are kept and reused (they take minutes;
    each has its own random stream, so a cached one gives the series a fresh run would)."""
    cfg.validate()
    progress = progress or (lambda fraction, text: None)
    rng = np.random.default_rng(cfg.seed)
    timing = {}
    t0 = time.perf_counter()
    progress(0.0, "anatomy")
    phantom = build_phantom(cfg, rng)
    pg = phantom.geometry
    timing["anatomy"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    injected_gbq = cfg.injected_mbq / 1000.0
    curves = sample_region_curves(rng, injected_gbq, np.unique(phantom.labels), phantom.tumours)
    kinetics = VoxelKinetics(phantom.labels, phantom.uptake_scale, phantom.washout_scale, curves)
    fwhm = float(rng.uniform(*cfg.spect_fwhm_mm))
    egrid = EmissionGrid.for_phantom(pg)
    landmarks = Landmarks.from_phantom(phantom)
    n = len(cfg.times_h)
    ref = cfg.reference_index
    motions, fields = [], []
    for i in range(n):
        if i == ref:
            m = SessionMotion(**sample_spect_mismatch(rng, cfg.spect_mismatch_scale))
            f = session_field(m, landmarks)
        else:
            m, f = sample_invertible_session(rng, landmarks, max_shift_mm=cfg.max_shift_mm,
                                             max_rotation_deg=cfg.max_rotation_deg,
                                             max_breathing_mm=cfg.max_breathing_mm,
                                             spect_mismatch_scale=cfg.spect_mismatch_scale)
        motions.append(m)
        fields.append(f)
    grids = [_scanner_grids(cfg, rng, landmarks.body_centre) for _ in range(n)]
    timing["kinetics_motion"] = time.perf_counter() - t1

    s_ref = np.asarray(motions[ref].spect_shift_mm, np.float32)
    ref_spect_g = grids[ref][1]
    ref_ct_g = grids[ref][0]
    to_anatomy_ref_spect = lambda p: np.broadcast_to(-s_ref, p.shape)  # noqa: E731

    cts, spects, activities, fields_ct, fields_spect, session_labels = [], [], [], {}, {}, []
    recon_unmoved, imaging_info = [], []
    scanner = cfg.scanner_config() if cfg.imaging == "scanner" else None
    if scanner is not None:
        from .scanner import image_spect
    t_ct = t_spect = 0.0
    for i, t_h in enumerate(cfg.times_h):
        progress(0.1 + 0.8 * i / n, f"time point {t_h:g} h")
        sf, m = fields[i], motions[i]
        s_t = np.asarray(m.spect_shift_mm, np.float32)
        ct_g, sp_g = grids[i]
        ta = time.perf_counter()
        cts.append(render_ct(phantom.hu, pg, ct_g, None if sf.inverse_residual_mm == 0.0 and m.is_identity
                             else sf.inverse_at, rng, cfg.ct_noise_hu))
        tb = time.perf_counter()
        act = egrid.pool(kinetics.activity(t_h))
        to_anatomy = lambda p, sf=sf, s=s_t: sf.inverse_at(p - s) - s  # noqa: E731
        activities.append(resample(act, egrid.geometry, ref_spect_g, displacement=to_anatomy_ref_spect))
        if scanner is None:
            emission = blur(act, egrid.geometry, fwhm, m.spect_breathing_blur_mm)
            spects.append(render_spect(emission, egrid.geometry, sp_g, to_anatomy, rng,
                                       cfg.counts_per_mbq_s, cfg.acquisition_s))
        else:
            emission = blur(act, egrid.geometry, 0.0, m.spect_breathing_blur_mm)     # breathing during the scan
            body = np.clip(resample(emission, egrid.geometry, sp_g, displacement=to_anatomy), 0.0, None)
            spect, info = _cached(scanner_cache, cfg, f"session_{i}", lambda: image_spect(
                body, _mu(phantom, pg, sp_g, scanner, to_anatomy), sp_g, scanner, np.random.default_rng([cfg.seed, 26, i]),
                mu_recon_per_cm=_mu_of_ct(cts[-1], ct_g, sp_g, scanner)))
            spects.append(spect)
            imaging_info.append(info)
        session_labels.append(resample(phantom.labels, pg, sp_g, displacement=to_anatomy, mode="nearest"))
        if i != ref:
            pts = ref_spect_g.lps_grid().reshape(-1, 3)
            fields_ct[i] = sf.forward_at(pts).reshape(ref_spect_g.shape + (3,))
            fields_spect[i] = (sf.forward_at(pts - s_ref) + (s_t - s_ref)).reshape(ref_spect_g.shape + (3,))
        t_ct += tb - ta
        t_spect += time.perf_counter() - tb
    if scanner is not None and cfg.scanner_truth_recon:        # what the scanner shows of the unmoved activity
        ta = time.perf_counter()
        mu_true = _mu(phantom, pg, ref_spect_g, scanner, to_anatomy_ref_spect)
        mu_ct = _mu_of_ct(cts[ref], ref_ct_g, ref_spect_g, scanner)
        for i, t_h in enumerate(cfg.times_h):
            progress(0.85, f"unmoved activity imaged, {t_h:g} h")
            recon_unmoved.append(_cached(scanner_cache, cfg, f"unmoved_{i}", lambda i=i: image_spect(
                activities[i], mu_true, ref_spect_g, scanner, np.random.default_rng([cfg.seed, 27, i]),
                mu_recon_per_cm=mu_ct))[0])
        t_spect += time.perf_counter() - ta
    timing["ct"], timing["spect"] = t_ct, t_spect

    t2 = time.perf_counter()
    progress(0.9, "ground truth")
    tia_fine = kinetics.tia()
    tia_em = egrid.pool(tia_fine)
    truth_tia = resample(tia_em, egrid.geometry, ref_spect_g, displacement=to_anatomy_ref_spect)
    truth_tia_psf = resample(blur(tia_em, egrid.geometry, fwhm), egrid.geometry, ref_spect_g,
                             displacement=to_anatomy_ref_spect)
    if recon_unmoved:             # scanner mode: what ideal registration gives with this imaging, fitted alike
        from TIAMappingLib.voxel_tia import compute_voxel_tia
        truth_tia_psf = compute_voxel_tia(recon_unmoved, list(cfg.times_h)).tia.astype(np.float32)
    labels_spect = resample(phantom.labels, pg, ref_spect_g, displacement=to_anatomy_ref_spect, mode="nearest")
    labels_ct = resample(phantom.labels, pg, ref_ct_g, mode="nearest")
    voi_truth = {}
    for name, codes in phantom.voi_labels().items():
        mask = np.isin(phantom.labels, codes)
        voi_truth[name] = {"labels": list(codes), "volume_ml": float(mask.sum() * pg.voxel_volume_ml),
                           "tia_mbq_h": float(tia_fine[mask].sum(dtype=np.float64) * pg.voxel_volume_ml / 1e6)}
    timing["truth"] = time.perf_counter() - t2
    timing["total"] = time.perf_counter() - t0
    progress(1.0, "done")
    return SimulatedSeries(cfg, phantom, cts, [g[0] for g in grids], spects, [g[1] for g in grids], motions,
                           fields_ct, fields_spect, activities, truth_tia, truth_tia_psf, labels_spect, labels_ct,
                           curves, voi_truth, fwhm, timing, session_labels, recon_unmoved, imaging_info)


#: Settings added after scanner caches existed, left out of the cache key at these (default) values, so the
#: reconstructions cached before them are found again.
KEY_NEUTRAL_DEFAULTS = {"spect_mismatch_scale": 1.0}


def scanner_cache_key(cfg: SimulationConfig) -> str:
    """The cache folder name of a configuration's scanner reconstructions (every setting that shapes them)."""
    import hashlib
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("patient15_zip", "scanner_truth_recon")}
    for name, default in KEY_NEUTRAL_DEFAULTS.items():      # settings added later: at their default, old keys hold
        if settings.get(name) == default:
            del settings[name]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]
    return f"{cfg.anatomy}-{cfg.seed}-{digest}"


def _cached(cache, cfg: SimulationConfig, name: str, compute) -> tuple:
    """(image, info) of ``compute()``, kept in ``cache/<key>/<name>.npz`` (written atomically) when a cache is given."""
    if cache is None:
        return compute()
    folder = Path(cache) / scanner_cache_key(cfg)
    path = folder / f"{name}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["image"], json.loads(str(data["info"]))
    image, info = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.partial.npz"
    np.savez(tmp, image=image, info=json.dumps(info))
    tmp.replace(path)
    return image, info


def _mu(phantom, phantom_geometry: Geometry, grid: Geometry, scanner, to_anatomy) -> np.ndarray:
    """The patient's attenuation (1/cm at the photopeak) on ``grid`` of the SPECT frame: what the photons cross."""
    from .scanner import hu_to_mu
    hu = resample(phantom.hu.astype(np.float32), phantom_geometry, grid, displacement=to_anatomy, fill=-1000.0)
    return hu_to_mu(hu, scanner.energy_kev, scanner.ct_kvp)


def _mu_of_ct(ct, ct_geometry: Geometry, grid: Geometry, scanner) -> np.ndarray:
    """The attenuation map a scanner reconstructs with: its CT on the SPECT grid (with any SPECT/CT offset)."""
    from .scanner import hu_to_mu
    hu = resample(np.asarray(ct, np.float32), ct_geometry, grid, fill=-1000.0)
    return hu_to_mu(hu, scanner.energy_kev, scanner.ct_kvp)


def time_tag(hours: float) -> str:
    """File-name tag of a time point: 4 -> '004h', 0.5 -> '000.5h'."""
    return f"{hours:03.0f}h" if float(hours).is_integer() else f"{hours:05.1f}h"


def write_series(series: SimulatedSeries, out_dir, overwrite: bool = False) -> Path:
    """Write volumes, ground truth and ``series.json`` into ``out_dir``; returns the manifest path."""
    from .. import __version__

    out = Path(out_dir)
    manifest_path = out / MANIFEST_NAME
    plan = series_outputs(series.config, out).prepare(overwrite)
    cfg = series.config
    ref_g = series.reference_spect_geometry
    points = []
    for i, t_h in enumerate(cfg.times_h):
        tag = time_tag(t_h)
        entry = {"hours": float(t_h), "ct": f"ct_{tag}.nii.gz", "spect": f"spect_{tag}.nii.gz",
                 "motion": series.motions[i].to_dict(),
                 "truth": {"activity": f"truth/activity_{tag}.nii.gz"}}
        write_image(plan.path(entry["ct"]), series.ct[i], series.ct_geometry[i])
        write_image(plan.path(entry["spect"]), series.spect[i], series.spect_geometry[i])
        write_image(plan.path(entry["truth"]["activity"]), series.truth_activity[i], ref_g)
        if series.truth_recon_unmoved:
            entry["truth"]["recon_unmoved"] = f"truth/recon_unmoved_{tag}.nii.gz"
            write_image(plan.path(entry["truth"]["recon_unmoved"]), series.truth_recon_unmoved[i], ref_g)
        if series.imaging_info:
            entry["imaging"] = series.imaging_info[i]
        if i in series.truth_field_ct:
            entry["truth"]["field_ct"] = f"truth/field_ct_{tag}.nrrd"
            entry["truth"]["field_spect"] = f"truth/field_spect_{tag}.nrrd"
            write_displacement_field(plan.path(entry["truth"]["field_ct"]), series.truth_field_ct[i], ref_g)
            write_displacement_field(plan.path(entry["truth"]["field_spect"]), series.truth_field_spect[i], ref_g)
        points.append(entry)
    write_image(plan.path("truth/tia.nii.gz"), series.truth_tia, ref_g)
    write_image(plan.path("truth/tia_psf.nii.gz"), series.truth_tia_psf, ref_g)
    write_image(plan.path("truth/labels_spect.nii.gz"), series.labels_spect, ref_g)
    write_image(plan.path("truth/labels_ct.nii.gz"), series.labels_ct, series.reference_ct_geometry)
    voi_map, voi_names = voi_labelmap(series.labels_spect, series.phantom.voi_labels())
    write_seg_nrrd(plan.path("truth/segmentation.seg.nrrd"), voi_map, voi_names, ref_g)
    names = series.phantom.label_names()
    present = sorted(set(np.unique(series.labels_spect).tolist()) | set(np.unique(series.labels_ct).tolist()))
    manifest = {
        "format": MANIFEST_FORMAT,
        "patient_id": f"sim-{cfg.anatomy}-{cfg.seed:04d}",
        "simulated": True,
        "nuclide": "Lu-177",
        "injected_activity_mbq": cfg.injected_mbq,
        "reference_index": cfg.reference_index,
        "units": {"ct": "HU", "spect": "Bq/mL", "time": "h after injection", "activity": "Bq/mL",
                  "tia": "Bq*h/mL", "voi_tia": "MBq*h", "displacement": "mm, LPS, resampling (fixed -> moving)"},
        "time_points": points,
        "truth": {
            "frame": "reference SPECT grid (fields, activity, TIA, labels_spect); reference CT grid (labels_ct)",
            "tia": "truth/tia.nii.gz", "tia_psf": "truth/tia_psf.nii.gz",
            "tia_psf_is": ("the voxel TIA of the unmoved activity's reconstructions (recon_unmoved)"
                           if series.truth_recon_unmoved else "the true TIA blurred by the Gaussian SPECT resolution"),
            "labels_spect": "truth/labels_spect.nii.gz", "labels_ct": "truth/labels_ct.nii.gz",
            "segmentation": "truth/segmentation.seg.nrrd",
            "label_names": {str(k): names.get(k, f"label_{k}") for k in present},
            "vois": series.voi_truth,
            "tumours": [t.to_dict() for t in series.phantom.tumours],
            "region_curves": {names.get(k, str(k)): c.to_dict() for k, c in series.curves.items()
                              if c.amplitude_bq_per_ml > 0},
        },
        "imaging": _imaging_record(series),
        "grids": {"ct": [g.to_dict() for g in series.ct_geometry],
                  "spect": [g.to_dict() for g in series.spect_geometry]},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "seed": cfg.seed,
        "versions": _versions(__version__),
        "timing_s": {k: round(v, 3) for k, v in series.timing_s.items()},
    }
    write_text(plan.path(MANIFEST_NAME), json.dumps(manifest, indent=2))
    return manifest_path


def _listed_files(manifest: dict) -> list:
    """Relative file names a series manifest lists (volumes, truth)."""
    names = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES) and not Path(value).is_absolute():
            names.append(value)
    walk(manifest.get("time_points", []))
    walk(manifest.get("truth", {}))
    return names


def _imaging_record(series: SimulatedSeries) -> dict:
    """How the SPECT was imaged, for the manifest: the Gaussian model's FWHM and counts, or the scanner's
    settings and calibration (Bq/mL = reconstruction / calibration * 1e6 / voxel volume)."""
    cfg = series.config
    if cfg.imaging != "scanner":
        return {"mode": "gaussian", "spect_fwhm_mm": round(series.spect_fwhm_mm, 3),
                "counts_per_mbq_s": cfg.counts_per_mbq_s, "acquisition_s": cfg.acquisition_s,
                "ct_noise_hu": cfg.ct_noise_hu}
    scanner = cfg.scanner_config()
    first = series.imaging_info[0] if series.imaging_info else {}
    return {"mode": "scanner", "scanner": scanner.to_dict(), "acquisition_s": scanner.acquisition_s,
            "reconstruction": f"OSEM {scanner.osem_iterations} iterations x {scanner.osem_subsets} subsets, "
                              "attenuation correction from the session CT"
                              + (", resolution modelling" if scanner.resolution_modelling else ""),
            "calibration_counts_per_mbq_per_view": first.get("calibration_counts_per_mbq_per_view"),
            "fwhm_mm_at_100mm": first.get("fwhm_mm_at_100mm"), "scatter": "not simulated",
            "ct_noise_hu": cfg.ct_noise_hu, "truth_recon_unmoved": bool(series.truth_recon_unmoved)}


def series_outputs(cfg: SimulationConfig, out_dir) -> OutputSet:
    """Every file :func:`write_series` writes for ``cfg`` (and a preview), plus those an earlier series in
    the folder listed, so that ``overwrite`` replaces the whole earlier series. A folder holding files
    but no series.json (or another kind of series.json) is refused at once, whatever ``overwrite`` says."""
    out = Path(out_dir)
    names = [MANIFEST_NAME, "preview.png", "truth/tia.nii.gz", "truth/tia_psf.nii.gz", "truth/labels_spect.nii.gz",
             "truth/labels_ct.nii.gz", "truth/segmentation.seg.nrrd"]
    for i, t_h in enumerate(cfg.times_h):
        tag = time_tag(t_h)
        names += [f"ct_{tag}.nii.gz", f"spect_{tag}.nii.gz", f"truth/activity_{tag}.nii.gz"]
        if cfg.imaging == "scanner" and cfg.scanner_truth_recon:
            names.append(f"truth/recon_unmoved_{tag}.nii.gz")
        if i != cfg.reference_index:
            names += [f"truth/field_ct_{tag}.nrrd", f"truth/field_spect_{tag}.nrrd"]
    old = out / MANIFEST_NAME
    if old.is_file():
        try:
            earlier = json.loads(old.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            earlier = None
        if not isinstance(earlier, dict) or not earlier.get("simulated"):
            raise OutputError(f"{old} is not a simulated CoRX series; simulate into an empty folder")
        names += [n for n in _listed_files(earlier) if inside(out / n, out)]
    elif out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out} holds files but no {MANIFEST_NAME}: it is not a simulated series; simulate into "
                          "an empty or new folder")
    return OutputSet(out, names)


def voi_labelmap(labels: np.ndarray, vois: dict):
    """Merge tissue labels into one value per VOI (1, 2, ...); returns (uint8 map, value -> name)."""
    out = np.zeros(labels.shape, np.uint8)
    names = {}
    for value, (name, codes) in enumerate(vois.items(), start=1):
        out[np.isin(labels, codes)] = value
        names[value] = name
    return out, names


def _versions(corx_version: str) -> dict:
    import SimpleITK
    import torch
    return {"corx": corx_version, "numpy": np.__version__, "torch": torch.__version__,
            "SimpleITK": SimpleITK.Version_VersionString()}

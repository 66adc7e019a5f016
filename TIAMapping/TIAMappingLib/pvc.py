"""Partial-volume correction (PVC) of quantitative SPECT against a segmentation.

Model: the reconstructed image is the true activity concentration (Bq/mL) convolved with a
stationary Gaussian point-spread function of the *calibrated* resolution (FWHM in mm along the SPECT
grid's x, y, z axes; :class:`Resolution`), never the simulator's. Three corrections:

- ``rc``: recovery coefficients. A VOI's mean concentration is divided by the recovery the
  phantom calibration measured for a sphere of the VOI's volume (:class:`RecoveryCurve`).
- ``gtm``: the geometric transfer matrix (Rousset et al., J Nucl Med 1998). The segments are cut into
  exclusive regions (a voxel belongs to the smallest segment holding it) plus background: the body
  outside every segment and, with a CT, the rest (air, lung). W[i, j] is the fraction of region j's
  signal seen in region i; the observed regional means t = W c give the corrected concentrations c.
- ``rbv``: region-based voxel-wise correction (Thomas et al., EJNMMI 2011): image x (piecewise-constant
  GTM model) / (its blurred version), then each region rescaled so that its total equals the GTM total.

Regions are voxel fractions on the SPECT grid (the segmentation super-sampled 3 x 3 x 3 per SPECT
voxel), so a VOI's volume is that of the segmentation, not of a coarse mask. Needs no torch.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from CoRXRegistrationLib.geometry import Geometry, mask_index_bounds

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
METHODS = ("none", "rc", "gtm", "rbv")
#: Warnings: a VOI whose equivalent sphere is smaller than this many FWHM, whose recovery is below
#: MIN_RECOVERY (correction factor above 1 / MIN_RECOVERY) or whose GTM noise gain exceeds MAX_NOISE_GAIN.
MIN_DIAMETER_FWHM = 1.0
MIN_RECOVERY = 0.3
MAX_NOISE_GAIN = 3.0
BODY_HU = -500.0            # CT above this on the SPECT grid is body (soft tissue, bone); below: air, lung
CALIBRATION_FORMAT = "corx-pvc-calibration/1"


class PVCError(ValueError):
    """A partial-volume correction that cannot be done as asked (names the input)."""


@dataclass(frozen=True)
class Resolution:
    """Reconstructed SPECT resolution: Gaussian FWHM (mm) along the SPECT grid's x, y, z axes."""

    fwhm_mm: tuple
    source: str = ""

    @staticmethod
    def of(value, source: str = "") -> "Resolution":
        """From one FWHM (isotropic) or three (x, y, z), in mm; refuses values outside 1-60 mm."""
        v = np.atleast_1d(np.asarray(value, float))
        if v.size == 1:
            v = np.repeat(v, 3)
        if v.size != 3 or not np.all(np.isfinite(v)) or v.min() < 1.0 or v.max() > 60.0:
            raise PVCError(f"SPECT resolution {value!r} ({source or 'given'}): give one FWHM or three (x, y, z), "
                           "each 1-60 mm")
        return Resolution(tuple(float(x) for x in v), source)

    @property
    def mean_mm(self) -> float:
        return float(np.mean(self.fwhm_mm))

    def sigma_voxels(self, geometry: Geometry) -> tuple:
        """Gaussian sigma in voxels in array order (z, y, x)."""
        return tuple(f * FWHM_TO_SIGMA / s for f, s in zip(reversed(self.fwhm_mm), reversed(geometry.spacing)))

    def describe(self) -> str:
        f = self.fwhm_mm
        text = f"{f[0]:.3g} mm" if max(f) - min(f) < 1e-6 else "x".join(f"{v:.3g}" for v in f) + " mm (x, y, z)"
        return f"FWHM {text}" + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict:
        return {"fwhm_mm": list(self.fwhm_mm), "source": self.source}


def blur(volume: np.ndarray, geometry: Geometry, resolution: Resolution) -> np.ndarray:
    """``volume`` convolved with the Gaussian PSF (zero outside the grid), float32."""
    from scipy import ndimage                   # here, not at import: every command's parser reads METHODS
    return ndimage.gaussian_filter(np.asarray(volume, np.float32), resolution.sigma_voxels(geometry),
                                   mode="constant", truncate=4.0)


# ---------------------------------------------------------------------------- recovery coefficients
@dataclass(frozen=True)
class RecoveryCurve:
    """Recovery of a sphere's mean concentration vs its volume: RC(V) = r_max / (1 + (v50 / V) ** slope)."""

    r_max: float
    v50_ml: float
    slope: float
    min_volume_ml: float = 0.0        # smallest calibrated sphere: below it the curve is extrapolated

    def __call__(self, volume_ml):
        v = np.maximum(np.asarray(volume_ml, float), 1e-9)
        return self.r_max / (1.0 + (self.v50_ml / v) ** self.slope)

    @staticmethod
    def fit(volumes_ml, recoveries) -> "RecoveryCurve":
        import warnings

        from scipy.optimize import OptimizeWarning, curve_fit
        v, r = np.asarray(volumes_ml, float), np.asarray(recoveries, float)
        if v.size < 3 or np.any(v <= 0) or not np.all(np.isfinite(r)):
            raise PVCError(f"a recovery curve needs at least 3 spheres with finite recovery, got {list(zip(v, r))}")
        model = lambda x, a, b, c: a / (1.0 + (b / x) ** c)            # noqa: E731
        with warnings.catch_warnings():           # 3 spheres: an exact fit, no covariance to estimate
            warnings.simplefilter("ignore", OptimizeWarning)
            p, _ = curve_fit(model, v, r, p0=(max(r.max(), 0.5), float(np.median(v)), 1.0),
                             bounds=([0.05, 1e-4, 0.1], [3.0, 1e4, 5.0]), maxfev=20000)
        return RecoveryCurve(float(p[0]), float(p[1]), float(p[2]), float(v.min()))

    def to_dict(self) -> dict:
        return {"model": "RC(V) = r_max / (1 + (v50_ml / V) ** slope)", "r_max": self.r_max, "v50_ml": self.v50_ml,
                "slope": self.slope, "min_volume_ml": self.min_volume_ml}

    @staticmethod
    def from_dict(d: dict) -> "RecoveryCurve":
        return RecoveryCurve(float(d["r_max"]), float(d["v50_ml"]), float(d["slope"]), float(d.get("min_volume_ml", 0)))


@dataclass(frozen=True)
class Calibration:
    """What a phantom calibration gives the correction: the resolution and the recovery curve."""

    resolution: Resolution
    recovery: RecoveryCurve | None = None
    record: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "fwhm_mm": list(self.resolution.fwhm_mm),
                "recovery_curve": self.recovery.to_dict() if self.recovery else None, **self.record}


def read_calibration(path) -> Calibration:
    """A calibration file written by ``corx calibrate-pvc`` (format ``corx-pvc-calibration/1``)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PVCError(f"{path}: cannot read the PVC calibration ({e})") from None
    if not isinstance(d, dict) or d.get("format") != CALIBRATION_FORMAT:
        raise PVCError(f"{path}: not a PVC calibration (format {CALIBRATION_FORMAT!r} expected; make one with "
                       "corx calibrate-pvc)")
    curve = d.get("recovery_curve")
    return Calibration(Resolution.of(d["fwhm_mm"], f"calibration {path.name}"),
                       RecoveryCurve.from_dict(curve) if curve else None,
                       {k: v for k, v in d.items() if k not in ("format", "fwhm_mm", "recovery_curve")})


@dataclass(frozen=True)
class PVCSettings:
    """Which correction, with which resolution (one for every time point, or one per time point) and curve."""

    method: str = "none"
    resolution: object = None             # Resolution, or a tuple of them (one per time point)
    recovery: RecoveryCurve | None = None
    calibration: str = ""                 # the calibration file the values came from, if any

    def __post_init__(self):
        if self.method not in METHODS:
            raise PVCError(f"partial-volume correction {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method != "none" and self.resolution is None:
            raise PVCError(f"partial-volume correction ({self.method}) needs the SPECT resolution: a phantom "
                           "calibration (corx calibrate-pvc), the FWHM in mm, or psf_fwhm_mm in series.json")
        if self.method == "rc" and self.recovery is None:
            raise PVCError("the recovery-coefficient correction (rc) needs a recovery curve: give a phantom "
                           "calibration from corx calibrate-pvc")

    def resolutions(self, n_times: int) -> list:
        r = self.resolution
        if isinstance(r, Resolution):
            return [r] * n_times
        r = list(r)
        if len(r) != n_times:
            raise PVCError(f"{len(r)} SPECT resolutions for {n_times} time points: give one, or one per time point")
        return r

    @staticmethod
    def choose(method: str = "none", fwhm_mm=None, calibration=None, per_time_fwhm=None, n_times: int = 0,
               source: str = "command line") -> "PVCSettings":
        """The settings from what a user gave, most specific first: ``fwhm_mm`` (one or three values),
        ``per_time_fwhm`` (one entry per time point, e.g. from series.json), then ``calibration`` (a file
        from corx calibrate-pvc, which also gives the recovery curve)."""
        if method == "none":
            return PVCSettings()
        cal = read_calibration(calibration) if calibration else None
        if fwhm_mm is not None:
            resolution = Resolution.of(fwhm_mm, source)
        elif per_time_fwhm is not None and all(f is not None for f in per_time_fwhm):
            resolution = tuple(Resolution.of(f, f"series.json, {i + 1}. time point") for i, f in enumerate(per_time_fwhm))
            if n_times and len(resolution) != n_times:
                raise PVCError(f"{len(resolution)} SPECT resolutions for {n_times} time points")
        else:
            resolution = cal.resolution if cal else None
        return PVCSettings(method, resolution, cal.recovery if cal else None, str(calibration or ""))

    @staticmethod
    def for_series(method: str, fwhm_mm=None, calibration=None, manifest=None, n_times: int = 0) -> "PVCSettings":
        """:meth:`choose` with what a series manifest (``series_io.SeriesManifest``) states filling the gaps:
        its per-time-point ``psf_fwhm_mm`` and its ``pvc_calibration``."""
        per_time = manifest.psf_fwhm_mm() if manifest is not None else None
        calibration = calibration or (manifest.pvc_calibration() if manifest is not None else None)
        return PVCSettings.choose(method, fwhm_mm, calibration, per_time, n_times)

    def to_dict(self) -> dict:
        if self.method == "none":
            return {"method": "none"}
        res = [self.resolution] if isinstance(self.resolution, Resolution) else list(self.resolution)
        return {"method": self.method, "resolution": [r.to_dict() for r in res],
                "recovery_curve": self.recovery.to_dict() if self.recovery else None,
                "calibration": self.calibration}


# ---------------------------------------------------------------------------- regions
@dataclass
class Regions:
    """Exclusive regions on the SPECT grid as voxel fractions (they sum to 1 in every voxel).

    names: region names (segment parts, then the background regions); fractions (n, z, y, x) float32;
    overlap_ml (segments x regions): volume of region j inside segment s (mL); segments: segment names."""

    names: list
    fractions: np.ndarray
    segments: list
    overlap_ml: np.ndarray
    voxel_volume_ml: float

    @property
    def volume_ml(self) -> np.ndarray:
        return self.fractions.reshape(len(self.names), -1).sum(axis=1, dtype=np.float64) * self.voxel_volume_ml

    def segment_volume_ml(self) -> np.ndarray:
        return self.overlap_ml.sum(axis=1)

    def segment_fraction(self, s: int) -> np.ndarray:
        """Fraction of each SPECT voxel inside segment ``s``."""
        share = self.overlap_ml[s] / np.maximum(self.volume_ml, 1e-12)
        out = np.zeros(self.fractions.shape[1:], np.float32)
        for j in np.flatnonzero(share > 0):
            out += np.float32(share[j]) * self.fractions[j]
        return out


def _supersampled(target: Geometry, sub: int) -> Geometry:
    """The grid with ``sub`` x ``sub`` x ``sub`` points in every voxel of ``target`` (blocks align)."""
    spacing = np.asarray(target.spacing) / sub
    origin = np.asarray(target.origin) - target.direction_matrix @ (spacing * (sub - 1) / 2.0)
    return Geometry(tuple(n * sub for n in target.shape), tuple(spacing), tuple(origin), target.direction)


def _target_box(mask: np.ndarray, mask_geometry: Geometry, target: Geometry) -> tuple:
    """((z0, z1), (y0, y1), (x0, x1)): the voxels of ``target`` that can hold any of ``mask`` (its bounding
    box's corners, half a voxel out, mapped onto ``target`` and grown by one voxel)."""
    first, last = mask_index_bounds(mask)
    lo, hi = first - 0.5, last + 0.5                                                             # i, j, k
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    ijk = target.lps_to_index(mask_geometry.index_to_lps(corners))
    first = np.clip(np.floor(ijk.min(axis=0)) - 1, 0, None).astype(int)
    last = np.minimum(np.ceil(ijk.max(axis=0)) + 2, np.asarray(target.size_xyz)).astype(int)
    return tuple((int(first[a]), int(last[a])) for a in (2, 1, 0))


def make_regions(segments: dict, seg_geometry: Geometry, target: Geometry, body_hu=None, sub: int = 3) -> Regions:
    """Regions for the correction from segments (name -> bool mask on ``seg_geometry``).

    Overlaps are resolved in favour of the smaller segment (a tumour inside the liver is its own region;
    the liver segment still owns it: :attr:`Regions.overlap_ml`). Background: the rest of the body where
    ``body_hu`` (CT on ``target``, HU) is above -500 HU and the rest (air, lung); without a CT, one region."""
    from CoRXRegistrationLib.resample import resample

    names = [n for n, m in segments.items() if m.any()]
    if not names:
        raise PVCError("partial-volume correction needs at least one non-empty segment")
    if len(names) > 250:
        raise PVCError(f"{len(names)} segments: at most 250 for a partial-volume correction")
    order = sorted(names, key=lambda n: -int(segments[n].sum()))          # large first, smaller paint over
    labels = np.zeros(seg_geometry.shape, np.uint8)
    for code, name in enumerate(order, start=1):
        labels[segments[name]] = code
    seg_vox_ml = seg_geometry.voxel_volume_ml
    overlap = np.zeros((len(names), len(order)))
    for s, name in enumerate(names):
        counts = np.bincount(labels[segments[name]], minlength=len(order) + 1)
        overlap[s] = counts[1:] * seg_vox_ml
    if seg_geometry.same_grid(target):
        fine, sub = labels, 1
    else:
        fine = resample(labels, seg_geometry, _supersampled(target, sub), mode="nearest")
    parts = []
    for code, name in enumerate(order, start=1):
        # counted inside the segment's box on the SPECT grid only, never a full-size float copy
        (z0, z1), (y0, y1), (x0, x1) = _target_box(segments[name], seg_geometry, target)
        hit = (fine[z0 * sub:z1 * sub, y0 * sub:y1 * sub, x0 * sub:x1 * sub] == code).reshape(
            z1 - z0, sub, y1 - y0, sub, x1 - x0, sub)
        part = np.zeros(target.shape, np.float32)
        part[z0:z1, y0:y1, x0:x1] = hit.sum(axis=(1, 3, 5), dtype=np.uint16).astype(np.float32) / np.float32(sub ** 3)
        parts.append(part)
    rest = np.clip(1.0 - np.sum(parts, axis=0), 0.0, 1.0).astype(np.float32)
    region_names = list(order)
    if body_hu is not None:
        body = (np.asarray(body_hu) > BODY_HU).astype(np.float32)
        parts += [rest * body, rest * (1.0 - body)]
        region_names += ["background (body)", "background (air, lung)"]
    else:
        parts.append(rest)
        region_names.append("background")
    fractions = np.stack(parts)
    # overlap in mL on the SPECT grid: scale each part's segmentation volume to its volume on the grid
    grid_ml = fractions[:len(order)].reshape(len(order), -1).sum(axis=1, dtype=np.float64) * target.voxel_volume_ml
    seg_ml = np.bincount(labels.ravel(), minlength=len(order) + 1)[1:] * seg_vox_ml
    scale = np.where(seg_ml > 0, grid_ml / np.maximum(seg_ml, 1e-12), 0.0)
    overlap_ml = np.zeros((len(names), len(region_names)))
    overlap_ml[:, :len(order)] = overlap * scale
    return Regions(region_names, fractions, names, overlap_ml, target.voxel_volume_ml)


# ---------------------------------------------------------------------------- geometric transfer matrix
@dataclass
class TransferMatrix:
    """W (n x n): W[i, j] = mean over region i of region j's blurred indicator; with its blurred indicators."""

    matrix: np.ndarray
    blurred: list              # per region: (slices, blurred fraction in that box)
    resolution: Resolution

    @property
    def condition(self) -> float:
        return float(np.linalg.cond(self.matrix))

    def noise_gain(self, regions: Regions) -> np.ndarray:
        """Standard error of each corrected concentration over that of the uncorrected regional mean, for
        independent voxel noise of one variance: sqrt(sum_j Winv[i, j]^2 n_i / n_j)."""
        inv = np.linalg.inv(self.matrix)
        n = np.maximum(regions.volume_ml, 1e-12)
        return np.sqrt((inv ** 2 * n[:, None] / n[None, :]).sum(axis=1))


def transfer_matrix(regions: Regions, geometry: Geometry, resolution: Resolution) -> TransferMatrix:
    from scipy import ndimage
    sigma = resolution.sigma_voxels(geometry)
    pad = [int(np.ceil(4.0 * s)) + 1 for s in sigma]
    n = len(regions.names)
    weight = regions.fractions.reshape(n, -1).sum(axis=1, dtype=np.float64)
    w = np.zeros((n, n))
    blurred = []
    for j in range(n):
        frac = regions.fractions[j]
        nonzero = np.argwhere(frac > 0)
        if not len(nonzero):
            blurred.append(((slice(0, 0),) * 3, np.zeros((0, 0, 0), np.float32)))
            continue
        lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
        box = tuple(slice(max(0, a - p), min(s, b + p)) for a, b, p, s in zip(lo, hi, pad, frac.shape))
        b = ndimage.gaussian_filter(frac[box], sigma, mode="constant", truncate=4.0)
        blurred.append((box, b))
        sub = regions.fractions[(slice(None),) + box].reshape(n, -1)
        w[:, j] = sub @ b.ravel().astype(np.float64) / np.maximum(weight, 1e-12)
    return TransferMatrix(w, blurred, resolution)


def regional_means(image: np.ndarray, regions: Regions) -> np.ndarray:
    """Fraction-weighted mean of ``image`` in every region (Bq/mL)."""
    n = len(regions.names)
    f = regions.fractions.reshape(n, -1)
    return (f @ np.asarray(image, np.float64).ravel()) / np.maximum(f.sum(axis=1, dtype=np.float64), 1e-12)


def gtm_concentrations(image: np.ndarray, regions: Regions, tm: TransferMatrix) -> np.ndarray:
    """Corrected concentration of every region (Bq/mL): the solution of W c = t."""
    return np.linalg.solve(tm.matrix, regional_means(image, regions))


def segment_totals_mbq(concentrations: np.ndarray, regions: Regions) -> np.ndarray:
    """Total activity (MBq) of every segment from region concentrations (Bq/mL)."""
    return regions.overlap_ml @ concentrations / 1e6


def rbv(image: np.ndarray, regions: Regions, tm: TransferMatrix, concentrations: np.ndarray,
        iterations: int = 3) -> np.ndarray:
    """Region-based voxel-wise corrected image (Bq/mL, float32); each region's total is the GTM total."""
    c = np.maximum(concentrations, 0.0)
    model = np.tensordot(c.astype(np.float32), regions.fractions, axes=1)
    blurred = np.zeros_like(model)
    for cj, (box, b) in zip(c, tm.blurred):
        if cj > 0 and b.size:
            blurred[box] += np.float32(cj) * b
    floor = 1e-6 * max(float(blurred.max()), 1e-30)
    ratio = np.where(blurred > floor, model / np.maximum(blurred, floor), 0.0).astype(np.float32)
    out = np.clip(np.asarray(image, np.float32), 0.0, None) * ratio
    target = c * regions.fractions.reshape(len(c), -1).sum(axis=1, dtype=np.float64)
    for _ in range(iterations):          # fractional voxels are shared: a few fixed-point steps
        current = regions.fractions.reshape(len(c), -1) @ out.ravel().astype(np.float64)
        scale = np.where(current > 0, target / np.maximum(current, 1e-30), 0.0)
        out *= np.tensordot(scale.astype(np.float32), regions.fractions, axes=1)
    return out


# ---------------------------------------------------------------------------- the correction of a series
@dataclass
class PVCResult:
    method: str
    resolutions: list                    # one per time point
    segment_totals_mbq: np.ndarray       # (time points, segments)
    segment_recovery: np.ndarray         # (time points, segments): uncorrected mean / corrected mean
    corrected_images: list | None        # rbv: corrected SPECT per time point
    condition: float | None              # gtm/rbv: the transfer matrix's condition number (largest over times)
    noise_gain: np.ndarray | None        # per segment (gtm/rbv)
    warnings: dict                       # segment -> list of warnings
    regions: Regions


def correct_series(activities, geometry: Geometry, regions: Regions, method: str, resolutions,
                   recovery: RecoveryCurve | None = None, progress=None) -> PVCResult:
    """Correct every time point (Bq/mL on ``geometry``); ``resolutions``: one :class:`Resolution` per time point."""
    if method not in METHODS[1:]:
        raise PVCError(f"partial-volume correction {method!r}: use one of {', '.join(METHODS)}")
    if method == "rc" and recovery is None:
        raise PVCError("the recovery-coefficient correction (rc) needs a recovery curve: give a calibration "
                       "from corx calibrate-pvc")
    n_seg = len(regions.segments)
    seg_ml = regions.segment_volume_ml()
    seg_fractions = [regions.segment_fraction(s) for s in range(n_seg)]
    totals = np.zeros((len(activities), n_seg))
    recovery_t = np.zeros_like(totals)
    corrected, cache, condition, gain = [], {}, None, None
    share = regions.overlap_ml / np.maximum(seg_ml[:, None], 1e-12)       # each segment's part of each region
    for t, (image, res) in enumerate(zip(activities, resolutions)):
        if progress is not None:
            progress(t / len(activities), f"partial-volume correction ({method}), time point {t + 1}")
        observed = np.array([float((f * image).sum(dtype=np.float64)) / max(float(f.sum(dtype=np.float64)), 1e-12)
                             for f in seg_fractions])
        if method == "rc":
            rc = recovery(seg_ml)
            totals[t] = observed / rc * seg_ml / 1e6
            recovery_t[t] = rc
            continue
        if res not in cache:              # one matrix, condition and noise gain per distinct resolution
            tm = transfer_matrix(regions, geometry, res)
            cache[res] = tm
            condition = max(condition or 0.0, tm.condition)
            gain = np.maximum(gain if gain is not None else 0.0, share @ tm.noise_gain(regions))
        tm = cache[res]
        c = gtm_concentrations(image, regions, tm)
        totals[t] = segment_totals_mbq(c, regions)
        with np.errstate(divide="ignore", invalid="ignore"):
            recovery_t[t] = observed * seg_ml / 1e6 / totals[t]
        if method == "rbv":
            corrected.append(rbv(image, regions, tm, c))
    warnings = {}
    fwhm = np.mean([r.mean_mm for r in resolutions])
    for s, name in enumerate(regions.segments):
        w = []
        diameter = (6.0 * seg_ml[s] * 1000.0 / np.pi) ** (1.0 / 3.0)
        if diameter < MIN_DIAMETER_FWHM * fwhm:
            w.append(f"smaller than the resolution (equivalent sphere {diameter:.0f} mm < FWHM {fwhm:.1f} mm): "
                     "correction unstable")
        rec = np.nanmin(recovery_t[:, s]) if np.isfinite(recovery_t[:, s]).any() else np.nan
        if np.isfinite(rec) and 0 < rec < MIN_RECOVERY:
            w.append(f"recovery {rec:.2f} < {MIN_RECOVERY}: correction factor above {1 / MIN_RECOVERY:.1f}")
        if method == "rc" and recovery.min_volume_ml and seg_ml[s] < recovery.min_volume_ml:
            w.append(f"volume {seg_ml[s]:.2f} mL below the smallest calibrated sphere ({recovery.min_volume_ml:.2f} mL): "
                     "recovery extrapolated")
        if gain is not None and gain[s] > MAX_NOISE_GAIN:
            w.append(f"correction amplifies noise x{gain[s]:.1f} (> {MAX_NOISE_GAIN:g})")
        if np.any(totals[:, s] < 0):
            w.append("negative corrected activity at a time point: correction failed for this VOI")
        if w:
            warnings[name] = w
    if progress is not None:
        progress(1.0, f"partial-volume correction ({method}) done")
    return PVCResult(method, list(resolutions), totals, recovery_t, corrected if method == "rbv" else None,
                     condition, gain, warnings, regions)

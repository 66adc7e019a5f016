"""The one validation layer for what a user gives: do the values look like what they claim to be?

Every reader, command, Logic and the batch pass CT, SPECT, grids and times through these checks
before any work. A failed check raises :class:`InputError` naming the input, the value and the check;
a physicist who knows better can allow a named check (``--allow NAME`` on the command line,
``allow=`` in the Logic), which turns the refusal into a warning that is printed and stored with the
results — never silent. Files themselves (cut short, NaN/Inf) are checked by ``imageio``.

Checks (name: what is refused):

* ``ct-units``: a CT without air (< -400 HU) or without soft tissue (-200..300 HU), or with values
  below -3100 HU: not HU (a SPECT, raw stored values without the rescale, or a density/mu map).
* ``spect-units``: a SPECT with substantial negative values (> 1 % of the activity, or a minimum
  below -5 % of the maximum: a CT?) or not sparse (over half the voxels above half the 99.9th
  percentile: a CT or a flood image).
* ``spect-empty``: a SPECT time point with no activity (it would lower every TIA).
* ``spect-activity``: a total activity in the field of view outside 1 MBq..100 GBq (counts, kBq/mL
  or MBq/mL instead of Bq/mL).
* ``times``: a time later than 10 physical half-lives (minutes or seconds given as hours).
* ``geometry``: voxel spacing outside 0.1..30 mm (metres or microns, a broken header).
* ``segment-outside``: more than 5 % of a segment outside the SPECT field of view.
"""
from __future__ import annotations

import numpy as np

CHECKS = {
    "ct-units": "the CT holds HU (air near -1000, soft tissue near 0)",
    "spect-units": "the SPECT holds activity concentration (non-negative, sparse uptake)",
    "spect-empty": "every SPECT time point holds activity",
    "spect-activity": "the SPECT's total activity is plausible for Bq/mL after a 177Lu therapy (1 MBq..100 GBq)",
    "times": "hours after injection are within 10 physical half-lives",
    "geometry": "voxel spacing is 0.1..30 mm",
    "segment-outside": "at most 5 % of a segment lies outside the SPECT field of view",
}
SEGMENT_OUTSIDE_LIMIT = 0.05


class InputError(ValueError):
    """An input does not hold what it claims (units, activity, times, grid)."""

    def __init__(self, message: str, check: str):
        super().__init__(f"{message} [check '{check}'; if you are sure, allow it: --allow {check} on the command "
                         f"line, allow=['{check}'] in the Logic]")
        self.check = check


def allowed_checks(allow) -> frozenset:
    """The set of checks to turn into warnings; refuses names that are not checks."""
    names = frozenset(allow or ())
    unknown = sorted(names - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    return names


def _fail(message: str, check: str, allow, warnings: list) -> None:
    if check in allowed_checks(allow):
        warnings.append(f"{message} (allowed by --allow {check})")
    else:
        raise InputError(message, check)


def check_geometry(geometry, source: str, allow=(), warnings=None) -> list:
    """Voxel spacing plausible for a clinical scanner (mm)."""
    warnings = [] if warnings is None else warnings
    spacing = np.asarray(geometry.spacing, float)
    if spacing.min() < 0.1 or spacing.max() > 30.0:
        _fail(f"{source}: voxel spacing {tuple(round(float(s), 4) for s in spacing)} mm is not a scanner's "
              "(expected 0.1..30 mm; metres or microns in the header?)", "geometry", allow, warnings)
    return warnings


def check_ct(ct_hu, geometry, source: str, allow=(), warnings=None) -> list:
    """A CT in Hounsfield units: air and soft tissue present, nothing far below air. Returns warnings."""
    warnings = check_geometry(geometry, source, allow, warnings)
    a = np.asarray(ct_hu)
    sample = a.ravel()[:: max(1, a.size // 2_000_000)]            # every voxel for small images
    lo = float(sample.min())
    air = float(np.mean(sample < -400.0))
    tissue = float(np.mean((sample > -200.0) & (sample < 300.0)))
    if lo < -3100.0:
        _fail(f"{source}: minimum {lo:.0f} is below any HU value (air is -1000 HU); is this a CT in HU?",
              "ct-units", allow, warnings)
    elif air < 0.005 or tissue < 0.02:
        _fail(f"{source}: does not look like a CT in HU: {100 * air:.1f} % of voxels are air (< -400 HU) and "
              f"{100 * tissue:.1f} % soft tissue (-200..300 HU), values {lo:.4g}..{float(sample.max()):.4g} "
              "(a SPECT given as CT, or stored values without the HU rescale?)", "ct-units", allow, warnings)
    return warnings


def check_spect(spect_bq_ml, geometry, source: str, allow=(), warnings=None) -> list:
    """A SPECT in Bq/mL: non-negative (small interpolation undershoot tolerated), sparse, holding a
    plausible activity. Returns warnings."""
    warnings = check_geometry(geometry, source, allow, warnings)
    a = np.asarray(spect_bq_ml, np.float32)
    hi, lo = float(a.max()), float(a.min())
    if hi <= 0.0 and lo < 0.0:
        _fail(f"{source}: every value is zero or negative (down to {lo:.4g}): a SPECT in Bq/mL is non-negative",
              "spect-units", allow, warnings)
        return warnings
    if hi <= 0.0:
        _fail(f"{source}: holds no activity (maximum {hi:.4g} Bq/mL)", "spect-empty", allow, warnings)
        return warnings
    positive = float(a[a > 0].sum(dtype=np.float64))
    negative = float(-a[a < 0].sum(dtype=np.float64))
    if negative > 0.01 * positive or lo < -0.05 * hi:
        _fail(f"{source}: negative values down to {lo:.4g} ({100 * negative / positive:.1f} % of the activity): "
              "a SPECT in Bq/mL is non-negative (a CT given as SPECT?)", "spect-units", allow, warnings)
    sample = a.ravel()[:: max(1, a.size // 2_000_000)]
    p999 = float(np.percentile(sample, 99.9))
    filled = float(np.mean(sample > 0.5 * p999)) if p999 > 0 else 0.0
    if filled > 0.5:
        _fail(f"{source}: {100 * filled:.0f} % of voxels are above half the 99.9th percentile: uptake is not "
              "sparse as in a SPECT (a CT or a flood image?)", "spect-units", allow, warnings)
    total_mbq = positive * geometry.voxel_volume_ml / 1e6
    if not 1.0 <= total_mbq <= 1e5:
        _fail(f"{source}: total activity in the field of view {total_mbq:.4g} MBq is not plausible for Bq/mL "
              "after a 177Lu therapy (1 MBq..100 GBq): counts, kBq/mL or MBq/mL?", "spect-activity", allow,
              warnings)
    return warnings


def check_hours(hours, source: str, half_life_h: float | None = None, allow=(), warnings=None) -> list:
    """Hours after injection: finite, >= 0, strictly increasing (always refused otherwise) and within
    10 physical half-lives (check ``times``). Returns warnings."""
    if half_life_h is None:
        from TIAMappingLib.nuclides import LU177
        half_life_h = LU177.half_life_h
    warnings = [] if warnings is None else warnings
    h = np.asarray(hours, float)
    if h.ndim != 1 or h.size == 0 or not np.all(np.isfinite(h)) or np.any(h < 0) or np.any(np.diff(h) <= 0):
        raise ValueError(f"{source}: hours after injection must be finite, >= 0 and strictly increasing, got "
                         f"{list(hours)}")
    if h.max() > 10 * half_life_h:
        _fail(f"{source}: {h.max():g} h is {h.max() / half_life_h:.0f} physical half-lives after injection "
              "(times in minutes or seconds instead of hours?)", "times", allow, warnings)
    return warnings


def check_session(session, allow=(), warnings=None) -> list:
    """CT and SPECT of one :class:`~CoRXRegistrationLib.preprocess.SpectCt` session."""
    warnings = [] if warnings is None else warnings
    check_ct(session.ct, session.ct_geometry, f"{session.label} CT", allow, warnings)
    check_spect(session.spect, session.spect_geometry, f"{session.label} SPECT", allow, warnings)
    return warnings


def check_segment_coverage(rows_outside: dict, source: str, allow=(), warnings=None) -> list:
    """``rows_outside``: drawn (non-empty) segment -> fraction of its volume outside the SPECT field of
    view. Every segment wholly outside is refused whatever is allowed."""
    warnings = [] if warnings is None else warnings
    if rows_outside and min(rows_outside.values()) >= 1.0:
        raise ValueError(f"{source}: every segment lies outside the SPECT field of view (wrong segmentation, or "
                         "one drawn on another patient's or time point's frame?)")
    for name, fraction in rows_outside.items():
        if fraction > SEGMENT_OUTSIDE_LIMIT:
            _fail(f"{source}: {100 * fraction:.1f} % of segment '{name}' lies outside the SPECT field of view; its "
                  "VOI values would cover only the part inside", "segment-outside", allow, warnings)
    return warnings

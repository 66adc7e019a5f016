"""A DICOM SPECT's values as activity concentration (Bq/mL) at the start of its acquisition.

Units (0054,1001) (or the real-world value mapping's unit) says what the values are:

* ``BQML``: Bq/mL, used as they are (after the decay convention below).
* ``CNTS``: reconstructed counts per voxel over the acquisition. Converted with the user's
  calibration factor S (cps/MBq, per scanner and collimator, measured with the same protocol):
  ``Bq/mL = counts / T / S * 1e6 / V`` with T the acquisition duration (s) and V the voxel
  volume (mL). T is Actual Frame Duration (0018,1242) x Number of Frames in Rotation (0054,0053),
  summed over the Rotation Information Sequence (the time the gantry acquires; a calibration
  factor must be derived by the same convention), else the top-level Actual Frame Duration.
  A CNTS series without a calibration factor is refused.
* ``CPS``: counts per second per voxel: as CNTS without dividing by T.
* anything else (``PROPCNTS``, ``NONE``, no unit) is refused: the values are not quantitative.

Decay correction (0054,1102), reference time = acquisition start: ``START`` values are already
there (no correction, never a second one); ``ADMIN`` values are decay-corrected to the
administration and are multiplied by exp(-lambda * hours after injection); ``NONE`` (or no
attribute) values are an average over the acquisition and are multiplied by
lambda*T / (1 - exp(-lambda*T)) (+0.13 % for 30 min of 177Lu; not applied when T is unknown,
which is stated). The half-life is 177Lu's; a header stating another radionuclide half-life is refused.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TIAMappingLib.nuclides import LU177

from .dicom_read import DicomError, DicomVolume

LU177_HALF_LIFE_H = LU177.half_life_h
CALIBRATION_FORMAT = "corx-calibration/1"
_MATCH_KEYS = {"manufacturer": "Manufacturer", "model": "ManufacturerModelName", "collimator": "CollimatorGridName",
               "station": "StationName"}


class CalibrationError(ValueError):
    """A calibration factor is missing, malformed or does not fit the scanner."""


@dataclass(frozen=True)
class Calibration:
    """A scanner's sensitivity for 177Lu with one collimator and protocol, in cps/MBq. The match keys
    (manufacturer, model, collimator, station) that are given must equal the SPECT header's
    (case-insensitive); an entry without keys fits every scanner."""
    cps_per_mbq: float
    manufacturer: str | None = None
    model: str | None = None
    collimator: str | None = None
    station: str | None = None
    description: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


def calibration_entries(value, source: str = "calibration") -> list:
    """[:class:`Calibration`] from a manifest's or file's ``calibration``: a number (cps/MBq), an object, a
    list of objects, or ``{"format": "corx-calibration/1", "entries": [...]}``; every error names ``source``."""
    if value is None:
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"cps_per_mbq": value}
    if isinstance(value, dict) and "entries" in value:
        if value.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{source}: expected \"format\": \"{CALIBRATION_FORMAT}\"")
        value = value["entries"]
    items = value if isinstance(value, list) else [value]
    out = []
    for n, item in enumerate(items):
        where = f"{source}[{n}]" if isinstance(value, list) else source
        if not isinstance(item, dict):
            raise CalibrationError(f"{where}: a calibration entry is an object with \"cps_per_mbq\", found {item!r}")
        unknown = sorted(set(item) - {"cps_per_mbq", "description", *_MATCH_KEYS})
        if unknown:
            raise CalibrationError(f"{where}: unknown key(s) {', '.join(unknown)} (known: cps_per_mbq, description, "
                                   f"{', '.join(_MATCH_KEYS)})")
        s = item.get("cps_per_mbq")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise CalibrationError(f"{where}: cps_per_mbq must be a positive number (cps/MBq), found {s!r}")
        out.append(Calibration(float(s), *(None if item.get(k) is None else str(item[k]) for k in _MATCH_KEYS),
                               str(item.get("description", ""))))
    return out


def read_calibration_file(path) -> list:
    """Entries of a ``corx-calibration/1`` JSON file."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as exc:
        raise CalibrationError(f"calibration file {p}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"calibration file {p} is not valid JSON: {exc}") from None
    return calibration_entries(raw, str(p))


def header_value(header, keyword: str) -> str:
    """An attribute of the SPECT header, looked for also in its Detector Information Sequence."""
    value = getattr(header, keyword, None)
    if value in (None, ""):
        for item in getattr(header, "DetectorInformationSequence", None) or []:
            value = getattr(item, keyword, None)
            if value not in (None, ""):
                break
    return "" if value in (None, "") else str(value).strip()


def matching_calibration(entries: list, header, label: str) -> Calibration:
    """The one entry that fits the scanner of ``header``; refuses none or several."""
    fits = [e for e in entries if all(getattr(e, k) is None or getattr(e, k).strip().lower()
                                      == header_value(header, kw).lower() for k, kw in _MATCH_KEYS.items())]
    scanner = ", ".join(f"{k} '{header_value(header, kw)}'" for k, kw in _MATCH_KEYS.items() if header_value(header, kw))
    if not fits:
        raise CalibrationError(f"{label}: no calibration entry fits this scanner ({scanner or 'no scanner attributes'}"
                               f"); the {len(entries)} given are for " + "; ".join(
                                   ", ".join(f"{k} {v}" for k, v in e.to_dict().items() if k in _MATCH_KEYS)
                                   or "any" for e in entries))
    if len(fits) > 1:
        raise CalibrationError(f"{label}: {len(fits)} calibration entries fit this scanner ({scanner}); "
                               "give the collimator or station to tell them apart")
    return fits[0]


def acquisition_seconds(header) -> float | None:
    """Acquisition duration T (s) by the convention of the module text, or None."""
    rotations = getattr(header, "RotationInformationSequence", None) or []
    total = 0.0
    for r in rotations:
        ms, frames = getattr(r, "ActualFrameDuration", None), getattr(r, "NumberOfFramesInRotation", None)
        if ms in (None, "") or frames in (None, ""):
            return None
        total += float(ms) / 1000.0 * int(frames)
    if total > 0:
        return total
    ms = getattr(header, "ActualFrameDuration", None)
    return float(ms) / 1000.0 if ms not in (None, "") and float(ms) > 0 else None


def _half_life_check(header, label: str) -> None:
    for item in getattr(header, "RadiopharmaceuticalInformationSequence", None) or []:
        t = getattr(item, "RadionuclideHalfLife", None)
        if t not in (None, "") and abs(float(t) / 3600.0 - LU177_HALF_LIFE_H) > 0.01 * LU177_HALF_LIFE_H:
            raise DicomError(f"{label}: the header states a radionuclide half-life of {float(t) / 3600.0:.2f} h, not "
                             f"177Lu's {LU177_HALF_LIFE_H:.1f} h; CoRX maps 177Lu therapy")


def check_quantitative(header, units: str | None, calibration, label: str) -> tuple:
    """(units, calibration entry or None, acquisition seconds or None), refusing what cannot become Bq/mL:
    another radionuclide, units that are not quantitative, counts without a fitting calibration factor
    or without an acquisition duration, an unknown decay convention. Needs the header only."""
    _half_life_check(header, label)
    units = (units or "").upper()
    t_acq = acquisition_seconds(header)
    entry = None
    if units in ("CNTS", "CPS"):
        if not calibration:
            raise CalibrationError(f"{label}: values are {units} (counts), not Bq/mL, and no calibration factor "
                                   "(cps/MBq) is given; give one for this scanner and collimator (--cps-per-mbq, "
                                   "--calibration FILE, or \"calibration\" in series.json)")
        entry = matching_calibration(list(calibration), header, label)
        if units == "CNTS" and t_acq is None:
            raise DicomError(f"{label}: CNTS values but no acquisition duration (ActualFrameDuration (0018,1242) "
                             "with NumberOfFramesInRotation (0054,0053)); counts cannot become a rate")
    elif units != "BQML":
        raise DicomError(f"{label}: Units (0054,1001) is {units or 'not stated'}: not a quantitative SPECT "
                         "(CoRX reads BQML, or CNTS/CPS with a calibration factor)")
    decay = str(getattr(header, "DecayCorrection", "") or "").strip().upper() or "NONE"
    if decay not in ("START", "ADMIN", "NONE"):
        raise DicomError(f"{label}: DecayCorrection (0054,1102) {decay!r} is not START, ADMIN or NONE")
    return units, entry, t_acq


def spect_to_bq_per_ml(volume: DicomVolume, hours_after_injection: float | None, calibration=()) -> tuple:
    """(values in Bq/mL at acquisition start, float32; provenance dict). ``calibration``: entries
    (:func:`calibration_entries`), needed for CNTS/CPS."""
    header, label = volume.series.header, volume.series.label
    units, entry, t_acq = check_quantitative(header, volume.units, calibration, label)
    lam = math.log(2.0) / (LU177_HALF_LIFE_H * 3600.0)
    decay = str(getattr(header, "DecayCorrection", "") or "").strip().upper() or "NONE"
    info = {"series": label, "units": units, "value_mapping": volume.mapping, "decay_correction": decay,
            "acquisition_s": t_acq}
    if entry is None:
        factor, info["conversion"] = 1.0, "Bq/mL as stored"
    else:
        per_second = 1.0 / t_acq if units == "CNTS" else 1.0
        factor = per_second / entry.cps_per_mbq * 1e6 / volume.geometry.voxel_volume_ml
        info.update(calibration=entry.to_dict(), conversion=f"{units} / {'T / ' if units == 'CNTS' else ''}"
                    f"{entry.cps_per_mbq:g} cps/MBq * 1e6 / {volume.geometry.voxel_volume_ml:.4f} mL")
    if decay == "START":
        info["decay"] = "already at acquisition start: not corrected again"
    elif decay == "ADMIN":
        if hours_after_injection is None:
            raise DicomError(f"{label}: values are decay-corrected to the administration (DecayCorrection ADMIN) "
                             "but the injection time is unknown; give it (--injection)")
        factor *= math.exp(-lam * hours_after_injection * 3600.0)
        info["decay"] = (f"corrected to the administration by the vendor: x exp(-lambda * {hours_after_injection:g} h)"
                         " back to acquisition start")
    elif t_acq:
        factor *= lam * t_acq / -math.expm1(-lam * t_acq)
        info["decay"] = f"average over the {t_acq:g} s acquisition: x lambda*T/(1-exp(-lambda*T)) to its start"
    else:
        info["decay"] = "not corrected (acquisition duration unknown; < 0.2 % for 30 min of 177Lu)"
    info["factor"] = factor
    return (volume.values.astype(np.float64) * factor).astype(np.float32), info

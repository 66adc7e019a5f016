"""Reading a patient's serial SPECT/CT series from a ``series.json`` manifest.

Manifest format ``corx-series/1`` (the simulator writes it; users write the same for their data)::

    {"format": "corx-series/1", "patient_id": "P001", "reference_index": 0,
     "time_points": [{"hours": 4.0, "ct": "ct_4h.nii.gz", "spect": "spect_4h.nii.gz"}, ...]}

Paths are relative to the manifest's folder. CT in HU, SPECT in Bq/mL, hours after injection.
Simulated series also carry ``truth`` entries (fields, labels) used for evaluation only.

DICOM: a time point's ``ct`` / ``spect`` may name a DICOM file or a folder holding one image series;
where every SPECT is DICOM, ``hours`` may be left out (then taken from the headers, with an optional
``"injection": "YYYY-MM-DD HH:MM"``), and ``"calibration"`` gives the cps/MBq of a counts SPECT
(:mod:`CoRXRegistrationLib.quantification`). A folder of DICOM files without a manifest is a series
too (:mod:`CoRXRegistrationLib.dicom_series` sorts and pairs it).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .imageio import ImageFileError, read_image
from .preprocess import SpectCt

MANIFEST_NAME = "series.json"
MANIFEST_FORMAT = "corx-series/1"


class SeriesError(ValueError):
    """A series manifest is missing, malformed or names unreadable files."""


@dataclass
class SeriesManifest:
    path: Path
    patient_id: str
    hours: list
    ct_paths: list
    spect_paths: list
    reference_index: int = 0
    raw: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        """The series' folder: the manifest's, or the DICOM folder itself."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def from_dicom(self) -> bool:
        return any(hasattr(src, "series") for src in [*self.ct_paths, *self.spect_paths])

    def input_files(self) -> list:
        """Every file the series is read from (manifest, images, DICOM files): never an output."""
        files = [] if self.path.is_dir() else [self.path]
        for src in [*self.ct_paths, *self.spect_paths]:
            files += source_files(src)
        return files

    def provenance(self) -> list:
        """Per time point, where the CT and SPECT came from and how their values were converted
        (DICOM sources fill theirs when read)."""
        return [{"hours": h, "ct": getattr(ct, "provenance", str(ct)), "spect": getattr(sp, "provenance", str(sp))}
                for h, ct, sp in zip(self.hours, self.ct_paths, self.spect_paths)]

    def session(self, i: int) -> SpectCt:
        """Time point ``i`` read from disk (CT as float32 HU, SPECT as float32 Bq/mL)."""
        return read_session(self.ct_paths[i], self.spect_paths[i], f"{self.patient_id} {self.hours[i]:g} h")

    def sessions(self) -> list:
        """Every time point, as :meth:`session`, the files read in parallel."""
        return read_sessions([(self.ct_paths[i], self.spect_paths[i], f"{self.patient_id} {h:g} h")
                              for i, h in enumerate(self.hours)])

    def psf_fwhm_mm(self) -> list | None:
        """Per time point the SPECT resolution the manifest states (``time_points[i].psf_fwhm_mm``, else the
        series' ``psf_fwhm_mm``: one FWHM or three, mm); None where it states none."""
        points = self.raw.get("time_points") or []
        series = self.raw.get("psf_fwhm_mm")
        values = [tp.get("psf_fwhm_mm", series) if isinstance(tp, dict) else series for tp in points]
        return values if points and all(v is not None for v in values) else None

    def pvc_calibration(self) -> Path | None:
        """The phantom calibration the manifest names (``pvc_calibration``, relative to its folder)."""
        rel = self.raw.get("pvc_calibration")
        return self.folder / rel if rel else None

    def truth_path(self, i: int, key: str) -> Path | None:
        rel = self.raw["time_points"][i].get("truth", {}).get(key)
        return self.folder / rel if rel else None


def read_session(ct_path, spect_path, label: str) -> SpectCt:
    """One session from a CT file (HU) and a SPECT file (Bq/mL), each with its own geometry."""
    return read_sessions([(ct_path, spect_path, label)])[0]


def read_sessions(specs) -> list:
    """[:func:`read_session` (ct_path, spect_path, label) for each of ``specs``], the files read and
    decompressed in parallel threads (SimpleITK releases the interpreter while it reads); the first
    error is raised, as reading them one by one would."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [(p, kind) for ct, spect, _ in specs for p, kind in ((ct, "ct"), (spect, "spect"))]
    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        images = list(pool.map(lambda job: read_source(*job), jobs))
    return [SpectCt(*images[2 * n], *images[2 * n + 1], label=label) for n, (_, _, label) in enumerate(specs)]


def source_files(source) -> list:
    """The files a volume is read from: an image file, or every file of a DICOM source."""
    return source.files if hasattr(source, "files") else [source]


def read_source(source, kind: str = "spect") -> tuple:
    """(array, geometry) of an image file, or of a :class:`~CoRXRegistrationLib.dicom_series.DicomSource`.
    A CT (``kind="ct"``) stored as 16-bit integers stays int16 (HU, half the memory of float32: 0.16 GB
    less per 512 x 512 x 300 CT); every other volume is float32."""
    if hasattr(source, "read"):
        return source.read()
    if kind != "ct":
        return read_image(source)
    array, geometry = read_image(source, dtype=None)
    if array.dtype in (np.int8, np.uint8, np.int16):
        return array.astype(np.int16, copy=False), geometry
    return array.astype(np.float32, copy=False), geometry


def volume_source(path, kind: str, calibration=None, injection=None):
    """What a command reads for one volume: an image file as it is, or a DICOM file / folder of one series as a
    :class:`~CoRXRegistrationLib.dicom_series.DicomSource` (a SPECT with the hours of its own header where it
    states the injection, needed only for values decay-corrected to the administration)."""
    from .dicom_read import is_dicom_file
    p = Path(path)
    if not (p.is_dir() or is_dicom_file(p)):
        return p
    from .dicom_series import DicomSource, series_hours, single_series
    from .dicom_times import DicomTimeError
    series = single_series(p, kind)
    hours = None
    if kind == "spect":
        try:
            hours = series_hours([series], injection)[0][series.uid]
        except DicomTimeError:
            hours = None
    return DicomSource(series, kind, hours, calibration or ())


def find_manifest(path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise SeriesError(f"no series manifest at {p} (expected a {MANIFEST_NAME} or a folder holding one)")
    return p


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(raw: str) -> str:
    """A patient id usable as a file or folder name: characters other than letters, digits, '.', '_'
    and '-' become '_', and it never starts with '.' (no hidden names, no '..'). '' if nothing is left."""
    return _SAFE_ID.sub("_", str(raw)).lstrip("._")[:100]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dicom_options(raw: dict, where: str, injection, calibration) -> tuple:
    """(injection datetime or None, calibration entries): the caller's, else the manifest's."""
    from .dicom_times import DicomTimeError, parse_user_datetime
    from .quantification import CalibrationError, calibration_entries
    if injection is None and raw.get("injection") is not None:
        try:
            injection = parse_user_datetime(raw["injection"])
        except DicomTimeError as exc:
            raise SeriesError(f"{where}: \"injection\": {exc}") from None
    if calibration is None:
        try:
            calibration = calibration_entries(raw.get("calibration"), f"{where}: \"calibration\"")
        except CalibrationError as exc:
            raise SeriesError(str(exc)) from None
    return injection, list(calibration)


def manifest_from_dicom(folder, injection=None, calibration=None, images=None) -> SeriesManifest:
    """A series from a folder of one patient's DICOM files (sorted and paired by
    :func:`~CoRXRegistrationLib.dicom_series.series_from_dicom`); reference = the first time point."""
    from .dicom_series import series_from_dicom
    folder = Path(folder)
    found = series_from_dicom(folder, injection, calibration or (), images=images)
    patient = safe_id(found["patient_id"]) or safe_id(folder.name) or "patient"
    raw = {"format": MANIFEST_FORMAT, "source": "dicom", "patient_id": found["patient_id"],
           "injection": found["injection"], "notes": found["notes"],
           "time_points": [{"hours": h, "ct": str(c), "spect": str(sp)}
                           for h, c, sp in zip(found["hours"], found["ct"], found["spect"])]}
    return SeriesManifest(folder, patient, found["hours"], found["ct"], found["spect"], 0, raw)


def read_series(path, injection=None, calibration=None) -> SeriesManifest:
    """Parse and check a manifest against the ``corx-series/1`` schema: every message names the file
    and the key. Times strictly increasing; files present; ``patient_id`` made safe as a folder name.
    A folder of DICOM files without a manifest: :func:`manifest_from_dicom`. ``injection`` (datetime)
    and ``calibration`` (entries) override the manifest's, for DICOM sources."""
    from .dicom_read import DicomError, dicom_files, is_dicom_file
    from .dicom_times import DicomTimeError
    given = Path(path)
    if given.is_dir() and not (given / MANIFEST_NAME).is_file() and dicom_files(given):
        try:
            return manifest_from_dicom(given, injection, calibration)
        except (DicomError, DicomTimeError) as exc:
            raise SeriesError(f"{given}: {exc}") from None
    p = find_manifest(path)
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SeriesError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SeriesError(f"{p}: the manifest must be a JSON object with \"format\", \"time_points\", ..., "
                          f"found a {type(raw).__name__}")
    if raw.get("format") != MANIFEST_FORMAT:
        raise SeriesError(f"{p}: expected \"format\": \"{MANIFEST_FORMAT}\"")
    points = raw.get("time_points")
    if not isinstance(points, list):
        raise SeriesError(f"{p}: \"time_points\" must be a list of {{\"hours\", \"ct\", \"spect\"}} objects")
    if len(points) < 2:
        raise SeriesError(f"{p}: a series needs at least 2 time points, found {len(points)}")
    hours, cts, spects = [], [], []
    for n, tp in enumerate(points):
        if not isinstance(tp, dict):
            raise SeriesError(f"{p}: time_points[{n}] must be an object, found {tp!r}")
        missing = [k for k in ("ct", "spect") if k not in tp]
        if missing:
            raise SeriesError(f"{p}: time point {n} lacks {', '.join(missing)}")
        if "hours" in tp and not _number(tp["hours"]):
            raise SeriesError(f"{p}: time_points[{n}].hours must be a number of hours, found {tp['hours']!r}")
        hours.append(float(tp["hours"]) if "hours" in tp else None)
        for key, bucket in (("ct", cts), ("spect", spects)):
            if not isinstance(tp[key], str) or not tp[key].strip():
                raise SeriesError(f"{p}: time_points[{n}].{key} must be a file name, found {tp[key]!r}")
            f = p.parent / tp[key]
            if not f.exists():
                raise SeriesError(f"{p}: time point {n} {key} file {f} does not exist")
            if f.is_dir() or is_dicom_file(f):
                from .dicom_series import single_series
                try:
                    f = single_series(f, key)
                except DicomError as exc:
                    raise SeriesError(f"{p}: time_points[{n}].{key}: {exc}") from None
            bucket.append(f)
    _dicom_hours(p, raw, hours, cts, spects, injection, calibration)
    h = np.asarray(hours)
    if not np.all(np.isfinite(h)) or np.any(h < 0) or np.any(np.diff(h) <= 0):
        raise SeriesError(f"{p}: hours after injection must be >= 0 and strictly increasing, got {hours}")
    ref = raw.get("reference_index", 0)
    if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(points):
        raise SeriesError(f"{p}: reference_index must be a whole number 0..{len(points) - 1} (a time point), "
                          f"found {ref!r}")
    given = raw.get("patient_id", p.parent.name)
    if not isinstance(given, (str, int)) or isinstance(given, bool):
        raise SeriesError(f"{p}: patient_id must be a text, found {given!r}")
    patient = safe_id(given)
    if not patient:
        raise SeriesError(f"{p}: patient_id {given!r} has no letter or digit to name the patient's outputs by")
    seg = raw.get("segmentation")
    if seg is not None and (not isinstance(seg, str) or not (p.parent / seg).is_file()):
        raise SeriesError(f"{p}: segmentation {seg!r} is not a file beside the manifest")
    return SeriesManifest(p, patient, hours, cts, spects, ref, raw)


def _dicom_hours(p: Path, raw: dict, hours: list, cts: list, spects: list, injection, calibration) -> None:
    """Fill missing hours from the DICOM headers and turn DICOM time points into sources (in place)."""
    from .dicom_series import DicomSource, series_hours
    from .dicom_times import DicomTimeError
    dicom = [hasattr(s, "uid") for s in spects]
    if any(h is None for h in hours):
        if not all(dicom) or not all(h is None for h in hours):
            raise SeriesError(f"{p}: every time point needs \"hours\" (they may be left out only all together, "
                              "where every SPECT is DICOM)")
    if not any(dicom) and not any(hasattr(c, "uid") for c in cts):
        return
    injection, entries = _dicom_options(raw, str(p), injection, calibration)
    if hours[0] is None:
        try:
            found, _ = series_hours(spects, injection)
        except DicomTimeError as exc:
            raise SeriesError(f"{p}: {exc}") from None
        hours[:] = [round(found[s.uid], 4) for s in spects]
    from .dicom_read import DicomError
    from .quantification import CalibrationError
    for n in range(len(hours)):
        if hasattr(cts[n], "uid"):
            cts[n] = DicomSource(cts[n], "ct")
        if dicom[n]:
            try:
                spects[n] = DicomSource(spects[n], "spect", hours[n], entries)
            except (DicomError, CalibrationError) as exc:
                raise SeriesError(f"{p}: time_points[{n}].spect: {exc}") from None


def _dicom_patients(root: Path, errors, injection, calibration) -> list:
    """One series per patient of a DICOM folder (a patient that cannot be read fails alone)."""
    from .dicom_read import DicomError
    from .dicom_series import by_patient, image_series
    from .dicom_times import DicomTimeError
    from .quantification import CalibrationError
    found = []
    for patient, series in sorted(by_patient(root).items()):
        try:
            notes = []
            images = image_series(series, notes)
            if not images:
                continue
            m = manifest_from_dicom(root, injection, calibration, images=images)
            m.raw["notes"] = notes + m.raw["notes"]
            found.append(m)
        except (DicomError, DicomTimeError, CalibrationError, SeriesError) as exc:
            if errors is None:
                raise SeriesError(f"{root}: patient '{patient}': {exc}") from None
            errors.append((root / (safe_id(patient) or "patient"), f"patient '{patient}': {exc}"))
    return found


def find_series(root, errors: list | None = None, injection=None, calibration=None) -> list:
    """Every series under ``root`` (a manifest, a series folder, a folder of series folders, or a folder of
    DICOM files: one series per patient in it).

    Patient ids must be unique. With ``errors`` (a list), a bad manifest or a repeated id is appended
    there as (manifest path, message) and the others are returned; without it, the first problem raises."""
    from .dicom_read import dicom_files
    r = Path(root)
    if (r / MANIFEST_NAME).is_file() or r.is_file():
        paths = [find_manifest(r)]
    else:
        paths = sorted(r.glob(f"*/{MANIFEST_NAME}")) if r.is_dir() else []
    found, by_id = [], {}
    if not paths and r.is_dir() and dicom_files(r):
        found = _dicom_patients(r, errors, injection, calibration)
    elif not paths:
        raise SeriesError(f"no {MANIFEST_NAME} and no DICOM file found in {r} or its sub-folders")
    for f in paths:
        try:
            found.append(read_series(f, injection, calibration))
        except SeriesError as exc:
            if errors is None:
                raise
            errors.append((f, str(exc)))
    for m in found:
        by_id.setdefault(m.patient_id.lower(), []).append(m)
    repeated = {k: v for k, v in by_id.items() if len(v) > 1}
    for ms in repeated.values():
        message = (f"patient_id '{ms[0].patient_id}' is given by {len(ms)} manifests ("
                   + ", ".join(str(m.path) for m in ms) + "); give every patient its own id")
        if errors is None:
            raise SeriesError(message)
        errors.extend((m.path, message) for m in ms)
    return [m for m in found if m.patient_id.lower() not in repeated]


__all__ = ["SeriesManifest", "SeriesError", "read_series", "find_series", "ImageFileError", "hours_from_name",
           "series_from_names", "safe_id"]


_HOURS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(?:h|hr|hrs|hours?)(?![a-z])", re.IGNORECASE)


def hours_from_name(name: str) -> float | None:
    """Hours after injection written in a volume name ("SPECT 24h", "ct_004h", "CT 4.5 hours"), else None."""
    found = _HOURS.findall(name)
    return float(found[-1]) if found else None


def series_from_names(names: list) -> list:
    """Pair CT and SPECT volumes by the hours in their names: [(hours, ct name, spect name)] in time order.

    A name is a SPECT if it says SPECT/NM/Lu (case-insensitive), a CT if it says CT and not SPECT;
    time points missing either volume, or with two candidates for one slot, are left out."""
    slots = {}
    for name in names:
        h = hours_from_name(name)
        if h is None:
            continue
        low = name.lower()
        kind = "spect" if re.search(r"spect|\bnm\b|lu-?177", low) else "ct" if re.search(r"(^|[^a-z])ct([^a-z]|$)", low) \
            else None
        if kind is None:
            continue
        slot = slots.setdefault(h, {"ct": [], "spect": []})
        slot[kind].append(name)
    return [(h, s["ct"][0], s["spect"][0]) for h, s in sorted(slots.items())
            if len(s["ct"]) == 1 and len(s["spect"]) == 1]

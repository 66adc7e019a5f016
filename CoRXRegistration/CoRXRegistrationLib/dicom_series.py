"""A patient's serial SPECT/CT series from a folder of DICOM files.

Sorting: image series by Series Instance UID; one patient (Patient ID) per series; SPECT = NM (or
PT), CT = CT, other modalities and non-image objects (RT Dose, registrations, structure sets) are
listed and left out. Sessions: each SPECT is paired with the CT of its study (Study Instance UID)
acquired within ``max_ct_gap_h``; where the study holds no CT, with the nearest CT of any study
within that gap. Ambiguity is refused, naming the series: two SPECTs in one session (e.g. an
attenuation-corrected and an uncorrected reconstruction), two CTs for one SPECT (unless exactly one
shares its Frame of Reference UID), one CT claimed by two SPECTs, mixed patients, a missing
injection time (:mod:`CoRXRegistrationLib.dicom_times`). Hours after injection from the acquisition
start; values through :mod:`CoRXRegistrationLib.quantification` (SPECT in Bq/mL, CT in HU).
"""
from __future__ import annotations

from pathlib import Path

from .dicom_read import DicomError, DicomSeries, read_volume, scan_dicom
from .dicom_times import SPECT_MODALITIES, DicomTimeError, hours_after_injection, timing_from_dataset


class DicomSource:
    """One volume of a series that lives in DICOM: :meth:`read` gives (array, geometry) in CoRX's units
    (CT HU, SPECT Bq/mL at acquisition start) and records how in :attr:`provenance`."""

    def __init__(self, series: DicomSeries, kind: str, hours: float | None = None, calibration=()):
        self.series, self.kind, self.hours, self.calibration = series, kind, hours, tuple(calibration)
        self.provenance = {"series": series.label, "series_uid": series.uid}
        if kind == "spect":                            # refuse at once what could not become Bq/mL
            from .dicom_read import header_units
            from .quantification import check_quantitative
            check_quantitative(series.header, header_units(series.header), self.calibration, series.label)

    @property
    def files(self) -> list:
        return list(self.series.files)

    def __str__(self) -> str:
        return self.series.label

    def read(self) -> tuple:
        from .quantification import spect_to_bq_per_ml
        volume = read_volume(self.series)
        if self.kind == "ct":
            if self.series.modality != "CT":
                raise DicomError(f"{self.series.label} is named as a CT but its modality is {self.series.modality}")
            self.provenance.update(units="HU", conversion="rescale slope/intercept")
            return volume.values, volume.geometry
        if self.series.modality not in SPECT_MODALITIES:
            raise DicomError(f"{self.series.label} is named as a SPECT but its modality is {self.series.modality}")
        values, info = spect_to_bq_per_ml(volume, self.hours, self.calibration)
        self.provenance.update(info)
        return values, volume.geometry


def image_series(found: list, notes: list) -> list:
    """The image series of ``found`` (the others noted), checked to be of one patient."""
    images = []
    for s in found:
        if s.ignored or s.modality not in ("CT", *SPECT_MODALITIES):
            notes.append(f"left out: {s.label} (not a CT or SPECT volume)")
        else:
            images.append(s)
    patients = {}
    for s in images:
        patients.setdefault(s.patient_id, s)
    if len(patients) > 1:
        raise DicomError("the DICOM files are of more than one patient: " + "; ".join(
            f"PatientID '{p}' ({s.label})" for p, s in sorted(patients.items())) + "; give one patient's folder")
    return images


def by_patient(folder) -> dict:
    """{Patient ID: [DicomSeries]} of every series under ``folder`` (the batch runs each patient)."""
    out = {}
    for s in scan_dicom(folder):
        out.setdefault(s.patient_id, []).append(s)
    return out


def sessions_of(images: list, max_ct_gap_h: float = 2.0) -> list:
    """[(CT series, SPECT series)] pairs of one session each, refusing ambiguity (module text)."""
    timing = {s.uid: timing_from_dataset(s.header) for s in images}
    spects = [s for s in images if s.modality in SPECT_MODALITIES]
    cts = [s for s in images if s.modality == "CT"]
    if not spects:
        raise DicomError("no SPECT (modality NM) among the DICOM series: " + "; ".join(s.label for s in images))
    if not cts:
        raise DicomError("no CT among the DICOM series; every SPECT needs the CT of its session")

    def gap_h(a, b):
        return abs((timing[a.uid].acquisition - timing[b.uid].acquisition).total_seconds()) / 3600.0

    pairs, claimed = [], {}
    for spect in spects:
        same_study = [c for c in cts if c.study_uid and c.study_uid == spect.study_uid]
        candidates = [c for c in (same_study or cts) if gap_h(c, spect) <= max_ct_gap_h]
        if not candidates:
            raise DicomError(f"no CT acquired within {max_ct_gap_h:g} h of {spect.label}"
                             + (" in its study" if same_study else ""))
        if len(candidates) > 1:
            shared = [c for c in candidates if c.frame_of_reference_uid
                      and c.frame_of_reference_uid == spect.frame_of_reference_uid]
            if len(shared) != 1:
                raise DicomError(f"{spect.label} has {len(candidates)} CTs in its session: "
                                 + "; ".join(c.label for c in candidates)
                                 + "; keep one in the folder or name the series in a series.json")
            candidates = shared
        ct = candidates[0]
        if ct.uid in claimed:
            raise DicomError(f"two SPECTs in one session: {claimed[ct.uid].label} and {spect.label} (both with "
                             f"{ct.label}); keep the quantitative reconstruction only")
        claimed[ct.uid] = spect
        pairs.append((ct, spect))
    return pairs


def series_hours(series: list, injection=None) -> tuple:
    """({series UID: hours after injection} for the SPECTs among ``series`` (CTs are put on their clock),
    injection datetime), by :func:`~CoRXRegistrationLib.dicom_times.hours_after_injection`; its messages name
    each series by its label instead of its UID."""
    try:
        hours, start, _ = hours_after_injection({s.uid: timing_from_dataset(s.header) for s in series}, injection)
    except DicomTimeError as exc:
        message = str(exc)
        for s in series:
            message = message.replace(repr(s.uid), s.label)
        raise DicomTimeError(message) from None
    return hours, start


def series_from_dicom(folder, injection=None, calibration=(), max_ct_gap_h: float = 2.0, images=None) -> dict:
    """{"patient_id", "hours", "ct", "spect" (lists of :class:`DicomSource` in time order), "injection",
    "notes"} from a folder of one patient's DICOM files (or the ``images`` of one patient)."""
    notes = []
    if images is None:
        found = scan_dicom(folder)
        if not found:
            raise DicomError(f"no DICOM file found in {folder}")
        images = image_series(found, notes)
    pairs = sessions_of(images, max_ct_gap_h)
    if len(pairs) < 2:
        raise DicomError(f"a series needs at least 2 SPECT/CT sessions, found {len(pairs)}: "
                         + "; ".join(s.label for pair in pairs for s in pair))
    hours, start = series_hours([s for pair in pairs for s in pair], injection)
    pairs.sort(key=lambda p: hours[p[1].uid])
    h = [round(hours[s.uid], 4) for _, s in pairs]
    for a, b in zip(h, h[1:]):
        if b - a < 0.01:
            raise DicomError(f"two SPECT sessions at {a:g} h after injection; one acquisition was exported twice")
    return {"patient_id": images[0].patient_id or Path(folder).name, "hours": h,
            "ct": [DicomSource(c, "ct") for c, _ in pairs],
            "spect": [DicomSource(s, "spect", hours[s.uid], calibration) for _, s in pairs],
            "injection": start.strftime("%Y-%m-%d %H:%M:%S"), "notes": notes}


def single_series(path, kind: str) -> DicomSeries:
    """The one image series in ``path`` (a DICOM file or a folder), for a manifest's time point."""
    found = [s for s in scan_dicom(path) if not s.ignored]
    if len(found) != 1:
        raise DicomError(f"{path}: a time point's {kind} must name one DICOM image series, found {len(found)}"
                         + (": " + "; ".join(s.label for s in found) if found else ""))
    return found[0]

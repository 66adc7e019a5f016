"""A series (simulated or any ``series.json``) written as a scanner would export it: a CT series (one
file per slice) and an NM SPECT reconstruction (one multi-frame file) per session, with the
patient, study, session Frame of Reference, radiopharmaceutical and acquisition tags a reader
needs. Test data for the DICOM path; no torch.

Two export styles, as two vendors differ:

* ``classic``: NM image layout (first-frame position in the Detector Information Sequence, frames
  along +normal), one Rescale Slope, Units BQML (decay correction START) or CNTS (NONE), DA/TM
  times, collimator "MELP".
* ``enhanced``: per-frame functional groups (a Plane Position per frame, frames stored head to
  feet), a Real World Value Mapping per frame (unit code Bq/ml or {counts}, no Units attribute),
  BQML decay-corrected to the administration (ADMIN), DT times with a UTC offset, CT slices under
  shuffled file names and instance numbers, collimator "MEGP".

Counts (``units="CNTS"``) are what a scanner of sensitivity ``cps_per_mbq`` collects over the
acquisition: ``C = A(start) * S * (1 - exp(-lambda*T)) / lambda`` per voxel (A in MBq), i.e. the
inverse of :mod:`CoRXRegistrationLib.quantification`.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import numpy as np

from .dicom_write import ds_text, frames_of, new_dataset, new_uid, save_dataset
from .outputs import OutputSet, write_text
from .quantification import CALIBRATION_FORMAT, LU177_HALF_LIFE_H

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
STYLES = ("classic", "enhanced")
UNITS = ("BQML", "CNTS")
DEFAULT_INJECTION = datetime(2026, 3, 2, 9, 30, 0)
ACQUISITION_S = 1800.0               # 60 views per head x 30 s
VIEWS, VIEW_MS = 60, 30000
_SCANNER = {"classic": ("SimScanner A", "Hybrid SPECT/CT A", "MELP"),
            "enhanced": ("SimScanner B", "Hybrid SPECT/CT B", "MEGP")}


def _stored(values: np.ndarray) -> tuple:
    """(uint16/int16 stored values, slope) for real values, the full range used."""
    top = float(np.abs(values).max())
    signed = float(values.min()) < 0
    slope = top / (32767.0 if signed else 65535.0) if top > 0 else 1.0
    stored = np.round(values / slope).astype("<i2" if signed else "<u2")
    return stored, slope, signed


def _timestamps(ds, when: datetime, style: str, offset: str) -> None:
    for prefix in ("Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", when.strftime("%Y%m%d"))
        setattr(ds, f"{prefix}Time", when.strftime("%H%M%S.%f")[:13])
    if style == "enhanced":
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")[:21] + offset
        ds.TimezoneOffsetFromUTC = offset


def _common(ds, patient: dict, study: dict, session_for: str, when: datetime, style: str, offset: str) -> None:
    for k, v in {**patient, **study}.items():
        setattr(ds, k, v)
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = session_for, ""
    ds.Manufacturer, ds.ManufacturerModelName, _ = _SCANNER[style]
    ds.StationName = "SIMSPECT01"
    _timestamps(ds, when, style, offset)


def _ct_slices(ct, g, patient, study, session_for, when, style, offset, series_uid, seed) -> list:
    iop, _, reverse = frames_of(g)
    order = range(g.shape[0] - 1, -1, -1) if reverse else range(g.shape[0])
    intercept = -1000.0 if style == "enhanced" else -1024.0
    out = []
    for n, k in enumerate(order):
        uid = new_uid(seed, series_uid, "slice", k)
        ds = new_dataset(CT_IMAGE_STORAGE, "CT", sop_instance_uid=uid, when=when)
        _common(ds, patient, study, session_for, when, style, offset)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 2, "CT attenuation 3.75 mm"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = g.shape[0] - n if style == "enhanced" else n + 1
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [ds_text(v) for v in g.index_to_lps(np.array([[0.0, 0.0, float(k)]]))[0]]
        ds.PixelSpacing = [ds_text(g.spacing[1]), ds_text(g.spacing[0])]
        ds.SliceThickness = ds_text(g.spacing[2])
        ds.KVP, ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "120", ds_text(intercept), "1", "HU"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.Rows, ds.Columns = ct.shape[1:]
        stored = np.clip(np.round(ct[k] - intercept), -32768, 32767).astype("<i2")
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def _nm_volume(spect, g, patient, study, session_for, when, style, offset, series_uid, seed, units, injection,
               injected_bq, hours, cps_per_mbq):
    from pydicom.dataset import Dataset
    lam = math.log(2.0) / (LU177_HALF_LIFE_H * 3600.0)
    if units == "CNTS":
        mbq = np.asarray(spect, np.float64) * g.voxel_volume_ml * 1e-6
        values = mbq * cps_per_mbq * -math.expm1(-lam * ACQUISITION_S) / lam
        decay = "NONE"
    else:
        decay = "ADMIN" if style == "enhanced" else "START"
        values = np.asarray(spect, np.float64) * (math.exp(lam * hours * 3600.0) if decay == "ADMIN" else 1.0)
    iop, ipp, reverse = frames_of(g)
    frames = values[::-1] if reverse else values          # along +normal
    ds = new_dataset(NM_IMAGE_STORAGE, "NM", sop_instance_uid=new_uid(seed, series_uid, "nm"), when=when)
    _common(ds, patient, study, session_for, when, style, offset)
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 3
    ds.SeriesDescription = f"Lu177 SPECT OSEM {'quant' if units == 'BQML' else 'counts'}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    n = frames.shape[0]
    ds.NumberOfFrames, ds.Rows, ds.Columns = n, frames.shape[1], frames.shape[2]
    ds.NumberOfSlices = n
    ds.PixelSpacing = [ds_text(g.spacing[1]), ds_text(g.spacing[0])]
    ds.SliceThickness = ds.SpacingBetweenSlices = ds_text(g.spacing[2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    _, model, collimator = _SCANNER[style]
    detector = Dataset()
    detector.CollimatorGridName, detector.CollimatorType = collimator, "PARA"
    window = Dataset()
    rng = Dataset()
    rng.EnergyWindowLowerLimit, rng.EnergyWindowUpperLimit = "187.2", "228.8"
    window.EnergyWindowRangeSequence, window.EnergyWindowName = [rng], "Lu177_208keV"
    ds.EnergyWindowInformationSequence = [window]
    rot = Dataset()
    rot.ActualFrameDuration, rot.NumberOfFramesInRotation = VIEW_MS, VIEWS
    rot.StartAngle, rot.AngularStep, rot.ScanArc = "0", "3", "180"
    ds.RotationInformationSequence = [rot]
    rp = Dataset()
    rp.Radiopharmaceutical = "Lu-177 DOTATATE"
    rp.RadionuclideTotalDose = ds_text(injected_bq)
    rp.RadionuclideHalfLife = ds_text(LU177_HALF_LIFE_H * 3600.0)
    start = injection.strftime("%Y%m%d%H%M%S.%f")[:21]
    rp.RadiopharmaceuticalStartDateTime = start + (offset if style == "enhanced" else "")
    rp.RadiopharmaceuticalStartTime = injection.strftime("%H%M%S")
    ds.RadiopharmaceuticalInformationSequence = [rp]
    ds.DecayCorrection, ds.CorrectedImage = decay, ["ATTN", "SCAT", "DECY"] if decay != "NONE" else ["ATTN", "SCAT"]
    if style == "classic":
        stored, slope, signed = _stored(frames)
        detector.ImageOrientationPatient, detector.ImagePositionPatient = iop, ipp
        ds.Units, ds.RescaleSlope, ds.RescaleIntercept = units, ds_text(slope), "0"
        ds.FrameIncrementPointer = [0x00540080]
        ds.SliceVector = list(range(1, n + 1))
    else:                                                  # stored head to feet, one mapping per frame
        frames = frames[::-1]
        stored = np.empty(frames.shape, "<u2")
        per_frame = []
        normal = np.cross(np.asarray([float(v) for v in iop[:3]]), np.asarray([float(v) for v in iop[3:]]))
        first = np.asarray([float(v) for v in ipp])
        signed = False
        for f in range(n):
            s, slope, neg = _stored(frames[f])
            signed |= neg
            stored[f] = s.view("<u2") if neg else s
            item, pos, rwv, code = Dataset(), Dataset(), Dataset(), Dataset()
            pos.ImagePositionPatient = [ds_text(v) for v in first + (n - 1 - f) * g.spacing[2] * normal]
            code.CodeValue, code.CodingSchemeDesignator = ("Bq/ml" if units == "BQML" else "{counts}"), "UCUM"
            code.CodeMeaning = "Becquerels/milliliter" if units == "BQML" else "counts"
            rwv.RealWorldValueSlope, rwv.RealWorldValueIntercept = float(slope), 0.0
            rwv.LUTLabel, rwv.LUTExplanation = "ACTIVITY", "activity concentration" if units == "BQML" else "counts"
            rwv.RealWorldValueFirstValueMapped, rwv.RealWorldValueLastValueMapped = 0, 65535
            rwv.MeasurementUnitsCodeSequence = [code]
            item.PlanePositionSequence, item.RealWorldValueMappingSequence = [pos], [rwv]
            per_frame.append(item)
        if signed:
            raise ValueError("the enhanced export stores non-negative SPECT values only")
        shared, orient, measures = Dataset(), Dataset(), Dataset()
        orient.ImageOrientationPatient = iop
        measures.PixelSpacing, measures.SliceThickness = ds.PixelSpacing, ds.SliceThickness
        measures.SpacingBetweenSlices = ds.SpacingBetweenSlices
        shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orient], [measures]
        ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = [shared], per_frame
    ds.DetectorInformationSequence = [detector]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def export_dicom(manifest, out_dir, units: str = "BQML", style: str = "classic", cps_per_mbq: float = 9.6,
                 injection: datetime = DEFAULT_INJECTION, injected_mbq: float | None = None,
                 overwrite: bool = False) -> dict:
    """Write ``manifest`` (:class:`~CoRXRegistrationLib.series_io.SeriesManifest`) as DICOM into ``out_dir``:
    ``session_<hours>/CT/`` and ``session_<hours>/NM/`` (classic) or one flat folder per session
    (enhanced); with CNTS also ``calibration.json`` (corx-calibration/1, the scanner's factor).
    Returns {"files": [...], "calibration": path or None}."""
    if units not in UNITS or style not in STYLES:
        raise ValueError(f"units must be one of {UNITS} and style one of {STYLES}")
    if not (isinstance(cps_per_mbq, (int, float)) and cps_per_mbq > 0):
        raise ValueError(f"cps_per_mbq must be positive, found {cps_per_mbq!r}")
    from TIAMappingLib.voi import time_labels
    tags = time_labels(manifest.hours)
    sessions = manifest.sessions()
    seed = f"{manifest.patient_id}-{style}-{units}"
    offset = "+0100"
    written, plan_names, datasets = [], [], []
    patient = {"PatientName": f"SIM^{manifest.patient_id}", "PatientID": manifest.patient_id,
               "PatientBirthDate": "19580412", "PatientSex": "F"}
    injected = (injected_mbq or float(manifest.raw.get("injected_activity_mbq", 7400.0))) * 1e6
    for i, (h, s) in enumerate(zip(manifest.hours, sessions)):
        spect_start = injection + timedelta(hours=h)
        ct_time = spect_start + timedelta(seconds=ACQUISITION_S + 120)
        study = {"StudyInstanceUID": new_uid(seed, "study", i), "StudyDate": spect_start.strftime("%Y%m%d"),
                 "StudyTime": spect_start.strftime("%H%M%S"), "StudyID": f"S{i + 1}", "AccessionNumber": f"A{i + 1:04d}",
                 "ReferringPhysicianName": "", "StudyDescription": f"Lu-177 DOTATATE SPECT/CT {tags[i]}"}
        session_for = new_uid(seed, "frame-of-reference", i)
        folder = f"session_{tags[i]}"
        cts = _ct_slices(s.ct, s.ct_geometry, patient, study, session_for, ct_time, style, offset,
                         new_uid(seed, "ct", i), seed)
        nm = _nm_volume(s.spect, s.spect_geometry, patient, study, session_for, spect_start, style, offset,
                        new_uid(seed, "nm", i), seed, units, injection, injected, h, cps_per_mbq)
        if style == "classic":
            names = [f"{folder}/CT/CT{n + 1:04d}.dcm" for n in range(len(cts))] + [f"{folder}/NM/NM0001.dcm"]
        else:
            perm = np.random.default_rng(i).permutation(len(cts) + 1)
            names = [f"{folder}/IM{int(p):05d}" for p in perm]
        plan_names += names
        datasets += list(zip(names, [*cts, nm]))
    calibration = "calibration.json" if units == "CNTS" else None
    plan = OutputSet(out_dir, plan_names + ([calibration] if calibration else []),
                     inputs=manifest.input_files()).prepare(overwrite)
    for name, ds in datasets:
        written.append(save_dataset(ds, plan.path(name)))
    if calibration:
        manufacturer, model, collimator = _SCANNER[style]
        write_text(plan.path(calibration), json.dumps({"format": CALIBRATION_FORMAT, "entries": [
            {"manufacturer": manufacturer, "model": model, "collimator": collimator, "cps_per_mbq": cps_per_mbq,
             "description": "sensitivity of the simulated scanner (cps/MBq, 177Lu 208 keV window)"}]}, indent=2))
    return {"files": written, "calibration": plan.folder / calibration if calibration else None}

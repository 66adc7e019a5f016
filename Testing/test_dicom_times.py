"""Hours after injection from DICOM headers, on real DICOM files written and read by pydicom."""
from __future__ import annotations

from datetime import datetime

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from CoRXRegistrationLib.dicom_times import (DicomTimeError, parse_da_tm, parse_dt, parse_user_datetime,
                                             read_dicom_timing, series_from_dicom_timings)

INJECTION = "20260302091500"          # 2 March 2026, 09:15


def write_dicom(path, modality, acquired: str, injection: str | None = INJECTION, time_only: str | None = None,
                acquisition_tags=True):
    """A header-only CT or NM file; ``acquired`` is "YYYYMMDD HHMMSS"."""
    date, time = acquired.split()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.20" if modality == "NM" else "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesDate, ds.SeriesTime = date, "000000"
    if acquisition_tags:
        ds.AcquisitionDate, ds.AcquisitionTime = date, time
    if modality == "NM" and (injection or time_only):
        item = Dataset()
        item.Radiopharmaceutical = "Lu-177 DOTATATE"
        if injection:
            item.RadiopharmaceuticalStartDateTime = injection
        if time_only:
            item.RadiopharmaceuticalStartTime = time_only
        ds.RadiopharmaceuticalInformationSequence = [item]
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=True)
    else:                                  # pydicom 2 (Slicer 5.8)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
    return path


def test_dicom_date_and_time_formats():
    assert parse_da_tm("20260302", "091500.5") == datetime(2026, 3, 2, 9, 15, 0, 500000)
    assert parse_da_tm("2026.03.02", "09:15:00") == datetime(2026, 3, 2, 9, 15)
    assert parse_da_tm("20260302", "0915") == datetime(2026, 3, 2, 9, 15)
    assert parse_dt("20260302091500.25+0100") == datetime(2026, 3, 2, 9, 15, 0, 250000)
    assert parse_user_datetime("2026-03-02 09:15") == datetime(2026, 3, 2, 9, 15)
    for bad in (lambda: parse_da_tm("2026-3-2", "0915"), lambda: parse_dt("2026"),
                lambda: parse_user_datetime("yesterday morning")):
        with pytest.raises(DicomTimeError):
            bad()


def test_series_from_dicom_files(tmp_path):
    files = {
        "CT day 0": write_dicom(tmp_path / "ct0.dcm", "CT", "20260302 131000"),
        "SPECT day 0": write_dicom(tmp_path / "nm0.dcm", "NM", "20260302 131500"),     # 4.0 h
        "SPECT day 1": write_dicom(tmp_path / "nm1.dcm", "NM", "20260303 094500"),     # 24.5 h
        "CT day 1": write_dicom(tmp_path / "ct1.dcm", "CT", "20260303 101500"),
        "CT day 5": write_dicom(tmp_path / "ct5.dcm", "CT", "20260307 091000"),
        "SPECT day 5": write_dicom(tmp_path / "nm5.dcm", "NM", "20260307 091500"),     # 120.0 h
        # no acquisition date/time: the series date/time is the fall-back
        "CT scout": write_dicom(tmp_path / "scout.dcm", "CT", "20260305 120000", acquisition_tags=False),
    }
    timings = {name: read_dicom_timing(p) for name, p in files.items()}
    assert timings["CT scout"].acquisition_source == "SeriesDate/SeriesTime"
    assert timings["SPECT day 1"].injection == datetime(2026, 3, 2, 9, 15)
    assert series_from_dicom_timings(timings) == [(4.0, "CT day 0", "SPECT day 0"), (24.5, "CT day 1", "SPECT day 1"),
                                                  (120.0, "CT day 5", "SPECT day 5")]
    # a user-given injection time overrides the headers
    rows = series_from_dicom_timings(timings, injection=datetime(2026, 3, 2, 10, 15))
    assert [r[0] for r in rows] == [3.0, 23.5, 119.0]


def test_dicom_series_errors_name_the_problem(tmp_path):
    ct = read_dicom_timing(write_dicom(tmp_path / "ct.dcm", "CT", "20260302 131000"))
    nm = read_dicom_timing(write_dicom(tmp_path / "nm.dcm", "NM", "20260302 131500"))
    undated = read_dicom_timing(write_dicom(tmp_path / "nm2.dcm", "NM", "20260303 091500", injection=None,
                                            time_only="091500"))
    other = read_dicom_timing(write_dicom(tmp_path / "nm3.dcm", "NM", "20260303 091500", injection="20260301091500"))
    lonely = read_dicom_timing(write_dicom(tmp_path / "nm4.dcm", "NM", "20260304 091500"))
    with pytest.raises(DicomTimeError, match="no SPECT"):
        series_from_dicom_timings({"CT": ct})
    with pytest.raises(DicomTimeError, match="without a date"):
        series_from_dicom_timings({"CT": ct, "SPECT": nm, "SPECT 2": undated})
    with pytest.raises(DicomTimeError, match="different injection times"):
        series_from_dicom_timings({"CT": ct, "SPECT": nm, "SPECT 3": other})
    with pytest.raises(DicomTimeError, match="no CT acquired within 2 h of SPECT 'SPECT 4'"):
        series_from_dicom_timings({"CT": ct, "SPECT": nm, "SPECT 4": lonely})
    with pytest.raises(DicomTimeError, match="before the injection"):
        series_from_dicom_timings({"CT": ct, "SPECT": nm}, injection=datetime(2026, 3, 2, 14, 0))
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(DicomTimeError, match="junk.dcm: not a readable DICOM file"):
        read_dicom_timing(tmp_path / "junk.dcm")

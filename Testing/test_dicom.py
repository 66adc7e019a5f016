"""DICOM in and out without torch: a series written as a scanner exports it (two vendor styles, BQML and
counts) reads back at the right place with the right values; ambiguous folders are refused naming the
series; RT Dose and Deformable Spatial Registration read back. Runs under Slicer 5.8's Python 3.9 too
(pydicom 2.4, SimpleITK 2.3)."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from CoRXRegistrationLib.dicom_export import ACQUISITION_S, export_dicom
from CoRXRegistrationLib.dicom_read import (DicomError, read_deformable_registration, read_rt_dose, read_volume,
                                            scan_dicom)
from CoRXRegistrationLib.dicom_series import DicomSource
from CoRXRegistrationLib.dicom_write import write_deformable_registration, write_rt_dose
from CoRXRegistrationLib.geometry import Geometry
from CoRXRegistrationLib.imageio import write_image
from CoRXRegistrationLib.quantification import (LU177_HALF_LIFE_H, CalibrationError, calibration_entries,
                                                read_calibration_file)
from CoRXRegistrationLib.series_io import SeriesError, find_series, read_series

HOURS = [4.0, 24.0, 96.0]
ROTATION = (math.cos(0.3), math.sin(0.3), 0.0, -math.sin(0.3), math.cos(0.3), 0.0, 0.0, 0.0, 1.0)


def _write_series(folder: Path) -> Path:
    """A small 3-session series on NIfTI: CT on an axial grid, SPECT on a grid rotated 17 degrees about z."""
    rng = np.random.default_rng(3)
    ct_g = Geometry((12, 20, 22), (4.0, 4.0, 5.0), (-44.0, -40.0, -30.0))
    sp_g = Geometry((10, 12, 14), (6.0, 6.0, 6.0), (-30.0, -40.0, -27.0), ROTATION)
    zz, yy, xx = np.mgrid[:12, :20, :22]
    ct = np.where((yy - 10) ** 2 + (xx - 11) ** 2 < 64, 40.0, -1000.0) + rng.normal(0, 5, ct_g.shape)
    points = []
    for n, h in enumerate(HOURS):
        spect = np.zeros(sp_g.shape, np.float32)
        spect[3:7, 4:8, 5:10] = 2.0e5 * math.exp(-math.log(2) / 60.0 * h)      # a 4x4x5-voxel uptake
        spect += rng.uniform(0, 500.0, sp_g.shape).astype(np.float32)
        write_image(folder / f"ct_{n}.nii.gz", ct.astype(np.float32), ct_g)
        write_image(folder / f"spect_{n}.nii.gz", spect, sp_g)
        points.append({"hours": h, "ct": f"ct_{n}.nii.gz", "spect": f"spect_{n}.nii.gz"})
    (folder / "series.json").write_text(json.dumps({"format": "corx-series/1", "patient_id": "P7",
                                                    "injected_activity_mbq": 7400.0, "time_points": points}))
    return folder / "series.json"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return read_series(_write_series(tmp_path_factory.mktemp("nifti")))


@pytest.fixture(scope="module")
def exports(series, tmp_path_factory):
    """{(style, units): folder} of the series exported four ways."""
    out = {}
    for style in ("classic", "enhanced"):
        for units in ("BQML", "CNTS"):
            folder = tmp_path_factory.mktemp(f"{style}_{units}")
            export_dicom(series, folder, units=units, style=style, overwrite=True)
            out[style, units] = folder
    return out


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit(files, **values):
    for f in files:
        ds = pydicom.dcmread(str(f))
        for k, v in values.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(str(f))


@pytest.mark.parametrize("style", ["classic", "enhanced"])
def test_dicom_series_reads_back_at_the_right_place_with_the_right_values(series, exports, style):
    expected = series.sessions()
    d = read_series(exports[style, "BQML"])
    assert d.patient_id == "P7" and d.hours == HOURS and d.from_dicom
    for a, b in zip(expected, d.sessions()):
        assert a.ct_geometry.same_grid(b.ct_geometry) and a.spect_geometry.same_grid(b.spect_geometry)
        assert np.abs(np.round(a.ct) - b.ct).max() == 0                     # CT stored in whole HU
        assert np.abs(a.spect - b.spect).max() <= 2e-5 * a.spect.max()      # 16-bit storage of Bq/mL
    decay = [p["spect"]["decay_correction"] for p in d.provenance()]
    assert decay == (["START"] * 3 if style == "classic" else ["ADMIN"] * 3)   # ADMIN undone once, not twice


def test_geometry_and_ct_values_agree_with_simpleitk(series, exports):
    """An independent reader (GDCM through SimpleITK) on the same files."""
    d = read_series(exports["classic", "BQML"])
    s = d.session(1)
    ct_files = [str(f) for f in d.ct_paths[1].files]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(Path(ct_files[0]).parent))))
    ct = reader.Execute()
    assert np.allclose(ct.GetOrigin(), s.ct_geometry.origin, atol=1e-3)
    assert np.allclose(ct.GetSpacing(), s.ct_geometry.spacing) and np.allclose(ct.GetDirection(),
                                                                                s.ct_geometry.direction)
    assert np.abs(sitk.GetArrayFromImage(ct) - s.ct).max() == 0
    nm = sitk.ReadImage(str(d.spect_paths[1].files[0]))
    assert np.allclose(nm.GetOrigin(), s.spect_geometry.origin, atol=1e-3)
    assert np.allclose(nm.GetSpacing(), s.spect_geometry.spacing)
    assert np.allclose(nm.GetDirection(), s.spect_geometry.direction, atol=1e-6)


@pytest.mark.parametrize("style", ["classic", "enhanced"])
def test_counts_times_calibration_equal_the_bqml_series(exports, style):
    folder = exports[style, "CNTS"]
    with pytest.raises(CalibrationError, match="CNTS .*no calibration factor"):
        read_series(folder)                                             # refused before any pixel is read
    counts = read_series(folder, calibration=read_calibration_file(folder / "calibration.json"))
    bqml = read_series(exports[style, "BQML"])
    for a, b in zip(bqml.sessions(), counts.sessions()):
        assert np.abs(a.spect - b.spect).max() <= 3e-5 * a.spect.max()
    info = counts.provenance()[0]["spect"]
    lam = math.log(2) / (LU177_HALF_LIFE_H * 3600)
    voxel_ml = 6.0 ** 3 / 1000.0
    expected = 1 / ACQUISITION_S / 9.6 * 1e6 / voxel_ml * lam * ACQUISITION_S / -math.expm1(-lam * ACQUISITION_S)
    assert info["units"] == "CNTS" and info["factor"] == pytest.approx(expected, rel=1e-9)
    raw = pydicom.dcmread(str(counts.spect_paths[0].files[0]))
    stored_counts = read_volume(counts.spect_paths[0].series).values
    assert float(stored_counts.max()) == pytest.approx(float(np.max(bqml.session(0).spect)) / expected, rel=1e-4)
    assert raw.Manufacturer and raw.RotationInformationSequence[0].NumberOfFramesInRotation == 60


def test_calibration_must_fit_the_scanner(exports):
    folder = exports["classic", "CNTS"]
    other = calibration_entries([{"manufacturer": "Another", "collimator": "LEHR", "cps_per_mbq": 10.0}])
    with pytest.raises(CalibrationError, match="no calibration entry fits this scanner .*manufacturer 'SimScanner A'"):
        read_series(folder, calibration=other).sessions()
    two = calibration_entries([{"cps_per_mbq": 9.6}, {"collimator": "MELP", "cps_per_mbq": 9.0}])
    with pytest.raises(CalibrationError, match="2 calibration entries fit"):
        read_series(folder, calibration=two).sessions()
    with pytest.raises(CalibrationError, match="positive number"):
        calibration_entries({"cps_per_mbq": -1})
    one = read_series(folder, calibration=calibration_entries(9.6))              # a bare factor fits any scanner
    assert one.session(0).spect.max() > 0


def test_a_manifest_may_name_dicom_folders_and_take_hours_from_the_headers(series, exports, tmp_path):
    folder = exports["enhanced", "CNTS"]
    sessions = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: float(p.name[8:-1]))
    manifest = {"format": "corx-series/1", "patient_id": "P7-dicom", "calibration": {"cps_per_mbq": 9.6},
                "time_points": [{"ct": str(s / "ct"), "spect": str(s / "nm")} for s in sessions]}
    for s in sessions:                                  # the enhanced export is one flat folder per session
        (s / "ct").mkdir(exist_ok=True)
        (s / "nm").mkdir(exist_ok=True)
        for f in list(s.glob("IM*")):
            kind = pydicom.dcmread(str(f), stop_before_pixels=True).Modality
            f.rename(s / ("ct" if kind == "CT" else "nm") / f.name)
    (tmp_path / "series.json").write_text(json.dumps(manifest))
    m = read_series(tmp_path / "series.json")
    assert m.hours == HOURS and m.patient_id == "P7-dicom"
    for a, b in zip(series.sessions(), m.sessions()):
        assert a.spect_geometry.same_grid(b.spect_geometry)
        assert np.abs(a.spect - b.spect).max() <= 3e-5 * a.spect.max()


def test_ambiguous_folders_are_refused_naming_the_series(exports, tmp_path):
    src = exports["classic", "BQML"]
    # two CTs in one session: the one on the SPECT's frame of reference, else refused
    two_ct = _copy(src, tmp_path / "two_ct")
    extra = _copy(two_ct / "session_24h" / "CT", two_ct / "session_24h" / "CT2")
    _edit(sorted(extra.glob("*.dcm")), SeriesInstanceUID="1.2.3.4.5.6", SeriesDescription="CT diagnostic",
          FrameOfReferenceUID="1.2.3.4.5.7")
    assert "CT diagnostic" not in str(read_series(two_ct).ct_paths[1])
    _edit(sorted(extra.glob("*.dcm")), FrameOfReferenceUID=read_series(src).ct_paths[1].series.frame_of_reference_uid)
    with pytest.raises(SeriesError, match="has 2 CTs in its session: .*CT diagnostic"):
        read_series(two_ct)
    # two SPECT reconstructions of one session
    two_nm = _copy(src, tmp_path / "two_nm")
    extra = _copy(two_nm / "session_24h" / "NM", two_nm / "session_24h" / "NM2")
    _edit(sorted(extra.glob("*.dcm")), SeriesInstanceUID="1.2.3.4.5.8", SeriesDescription="SPECT NAC")
    with pytest.raises(SeriesError, match="two SPECTs in one session: .*SPECT NAC"):
        read_series(two_nm)
    # mixed patients: refused for one series, one series per patient for the batch
    mixed = _copy(src, tmp_path / "mixed")
    _edit(sorted((mixed / "session_96h").rglob("*.dcm")), PatientID="OTHER")
    with pytest.raises(SeriesError, match="more than one patient: PatientID 'OTHER'.*PatientID 'P7'"):
        read_series(mixed)
    errors = []
    found = find_series(mixed, errors)
    assert [m.patient_id for m in found] == ["P7"] and found[0].hours == HOURS[:2]
    assert len(errors) == 1 and "patient 'OTHER'" in errors[0][1] and "at least 2" in errors[0][1]
    # no injection time: refused; given by the user: the hours follow it
    no_inj = _copy(src, tmp_path / "no_injection")
    for f in sorted(no_inj.rglob("NM*.dcm")):
        ds = pydicom.dcmread(str(f))
        del ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime
        ds.save_as(str(f))
    with pytest.raises(SeriesError, match="start time without a date; enter the injection date and time"):
        read_series(no_inj)
    from CoRXRegistrationLib.dicom_times import parse_user_datetime
    given = read_series(no_inj, injection=parse_user_datetime("2026-03-02 10:30"))
    assert given.hours == [h - 1.0 for h in HOURS]
    # another radionuclide
    tc = _copy(src, tmp_path / "tc99m")
    for f in sorted(tc.rglob("NM*.dcm")):
        ds = pydicom.dcmread(str(f))
        ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife = "21624.12"
        ds.save_as(str(f))
    with pytest.raises(SeriesError, match="half-life of 6.01 h, not 177Lu"):
        read_series(tc)


def test_counts_without_duration_and_unquantitative_units_are_refused(exports, tmp_path):
    folder = _copy(exports["classic", "CNTS"], tmp_path / "no_duration")
    for f in sorted(folder.rglob("NM*.dcm")):
        ds = pydicom.dcmread(str(f))
        del ds.RotationInformationSequence
        ds.save_as(str(f))
    with pytest.raises(SeriesError, match="no acquisition duration"):
        read_series(folder, calibration=calibration_entries(9.6))
    folder = _copy(exports["classic", "BQML"], tmp_path / "propcnts")
    _edit(sorted(folder.rglob("NM*.dcm")), Units="PROPCNTS")
    with pytest.raises(SeriesError, match="PROPCNTS: not a quantitative SPECT"):
        read_series(folder)


def test_uneven_or_duplicated_ct_slices_are_refused(exports, tmp_path):
    folder = _copy(exports["classic", "BQML"], tmp_path / "gap")
    slices = sorted((folder / "session_4h" / "CT").glob("*.dcm"))
    slices[5].unlink()
    with pytest.raises(DicomError, match="not evenly spaced .*a missing slice"):
        read_series(folder).sessions()


@pytest.mark.parametrize("flip", [False, True])
def test_rt_dose_reads_back_with_its_scaling_and_frame_of_reference(exports, tmp_path, flip):
    m = read_series(exports["classic", "BQML"])
    ref = m.spect_paths[0].series
    s = m.session(0)
    g = s.spect_geometry
    rng = np.random.default_rng(0)
    dose = rng.gamma(2.0, 3.0, g.shape) * (rng.random(g.shape) > 0.3)
    if flip:                                       # a grid whose third axis runs against row x column
        d = np.asarray(g.direction).reshape(3, 3).copy()
        d[:, 2] *= -1
        g = Geometry(g.shape, g.spacing, g.origin, tuple(d.ravel()))
    path = write_rt_dose(tmp_path / "rtdose.dcm", dose, g, ref.header)
    back, bg, header = read_rt_dose(path)
    expected = dose[::-1] if flip else dose
    assert np.abs(back - expected).max() <= 1e-3 * dose.max()                   # 0.1 %, the bound
    nz = g.shape[0]
    first = g.index_to_lps(np.array([[0.0, 0.0, nz - 1.0 if flip else 0.0]]))[0]
    assert np.allclose(bg.origin, first, atol=1e-4) and np.allclose(bg.spacing, g.spacing)
    assert header.FrameOfReferenceUID == ref.frame_of_reference_uid and header.PatientID == "P7"
    assert header.StudyInstanceUID == ref.study_uid and header.DoseUnits == "GY"
    image = sitk.ReadImage(str(path))                                          # GDCM places it the same way
    assert np.allclose(image.GetOrigin(), bg.origin, atol=1e-3) and np.allclose(image.GetSpacing(), bg.spacing)
    assert np.allclose(image.GetDirection(), bg.direction, atol=1e-6)
    with pytest.raises(ValueError, match="negative"):
        write_rt_dose(tmp_path / "bad.dcm", -dose, g, ref.header)
    assert not (tmp_path / "bad.dcm").exists()


def test_deformable_registration_reads_back(exports, tmp_path):
    m = read_series(exports["classic", "BQML"])
    g = m.session(0).spect_geometry
    field = np.random.default_rng(1).normal(0, 3, g.shape + (3,)).astype(np.float32)
    path = write_deformable_registration(tmp_path / "reg.dcm", field, g, m.spect_paths[0].series,
                                         m.spect_paths[2].series)
    back, bg, registered, source = read_deformable_registration(path)
    assert np.array_equal(back, field) and bg.same_grid(g)
    assert registered == m.spect_paths[0].series.frame_of_reference_uid
    assert source == m.spect_paths[2].series.frame_of_reference_uid != registered
    ds = pydicom.dcmread(str(path))
    assert ds.Modality == "REG" and len(ds.ReferencedSeriesSequence) == 2


def test_scan_lists_non_image_objects_and_a_dicom_source_names_its_series(exports, tmp_path):
    folder = _copy(exports["classic", "BQML"], tmp_path / "with_dose")
    m = read_series(folder)
    write_rt_dose(folder / "rtdose.dcm", np.ones(m.session(0).spect_geometry.shape), m.session(0).spect_geometry,
                  m.spect_paths[0].series.header)
    kinds = sorted(s.modality for s in scan_dicom(folder))
    assert kinds == ["CT"] * 3 + ["NM"] * 3 + ["RTDOSE"]
    again = read_series(folder)
    assert any("RTDOSE" in n for n in again.raw["notes"]) and again.hours == HOURS
    assert isinstance(again.spect_paths[0], DicomSource) and "NM series" in str(again.spect_paths[0])
    with pytest.raises(DicomError, match="not an image volume"):
        read_volume([s for s in scan_dicom(folder) if s.modality == "RTDOSE"][0])

"""A simulated series exported as DICOM runs end to end through `corx dosimetry` and the batch and gives
the TIA of the NIfTI path; the RT Dose and the deformable registrations it writes read back as the
dose map and the fields."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from CoRXRegistrationLib.cli import main
from CoRXRegistrationLib.dicom_read import read_deformable_registration, read_rt_dose
from CoRXRegistrationLib.imageio import read_displacement_field, read_image

BATCH = Path(__file__).resolve().parents[1] / "CoRXRegistration" / "Resources" / "Scripts" / "CoRXBatch.py"


def _voi_tia(path: Path) -> dict:
    return {r["segment"]: float(r["voxel_tia_sum_mbq_h"]) for r in csv.DictReader(open(path)) if r["status"] == "ok"}


@pytest.fixture(scope="module")
def dicom_runs(small_series_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_pipeline")
    seg = small_series_dir / "truth" / "segmentation.seg.nrrd"
    assert main(["export-dicom", str(small_series_dir), "--out", str(root / "dicom_bqml")]) == 0
    assert main(["export-dicom", str(small_series_dir), "--out", str(root / "dicom_cnts"), "--units", "CNTS",
                 "--style", "enhanced", "--cps-per-mbq", "7.5"]) == 0
    runs = {"nifti": [str(small_series_dir)], "bqml": [str(root / "dicom_bqml")],
            "cnts": [str(root / "dicom_cnts"), "--calibration", str(root / "dicom_cnts" / "calibration.json")]}
    for name, args in runs.items():
        assert main(["dosimetry", *args, "--out", str(root / f"out_{name}"), "--segmentation", str(seg),
                     "--device", "cpu"]) == 0
    return root


@pytest.mark.slow
def test_dicom_series_gives_the_tia_of_the_nifti_path(dicom_runs):
    tia, g = read_image(dicom_runs / "out_nifti" / "tia" / "tia.nii.gz")
    reference = _voi_tia(dicom_runs / "out_nifti" / "tia" / "voi.csv")
    assert len(reference) >= 4
    for name in ("bqml", "cnts"):
        other, og = read_image(dicom_runs / f"out_{name}" / "tia" / "tia.nii.gz")
        assert og.same_grid(g)
        assert abs(other.sum() / tia.sum() - 1) < 1e-4                       # 16-bit storage, same registration
        vois = _voi_tia(dicom_runs / f"out_{name}" / "tia" / "voi.csv")
        for segment, value in reference.items():
            assert vois[segment] == pytest.approx(value, rel=1e-3), segment
    assert not (dicom_runs / "out_nifti" / "dicom").exists()                   # no DICOM frame to put a dose on


@pytest.mark.slow
def test_rt_dose_and_registrations_read_back_as_the_maps(dicom_runs):
    out = dicom_runs / "out_cnts"
    dose, g = read_image(out / "tia" / "dose.nii.gz")
    back, bg, header = read_rt_dose(out / "dicom" / "rtdose.dcm")
    assert bg.same_grid(g) and np.abs(back - dose).max() <= 1e-3 * dose.max()
    import pydicom
    nm = [p for p in sorted((dicom_runs / "dicom_cnts").rglob("IM*"))
          if pydicom.dcmread(str(p), stop_before_pixels=True).Modality == "NM"]
    reference = min((pydicom.dcmread(str(p), stop_before_pixels=True) for p in nm),
                    key=lambda d: d.AcquisitionDateTime)
    assert header.FrameOfReferenceUID == reference.FrameOfReferenceUID
    assert header.StudyInstanceUID == reference.StudyInstanceUID
    for tag in ("24h", "48h", "120h"):
        field, fg = read_displacement_field(out / "registration" / f"t{tag}" / "field_spect.nrrd")
        dsr, dg, registered, source = read_deformable_registration(out / "dicom" / f"registration_t{tag}.dcm")
        assert dg.same_grid(fg) and np.array_equal(dsr, field.astype(np.float32))
        assert registered == reference.FrameOfReferenceUID != source


@pytest.mark.slow
def test_batch_runs_a_dicom_folder(dicom_runs, tmp_path):
    out = tmp_path / "batch"
    done = subprocess.run([sys.executable, str(BATCH), "--input", str(dicom_runs / "dicom_bqml"), "--output",
                           str(out), "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    patient = next(p for p in out.iterdir() if p.is_dir())
    tia, g = read_image(patient / "tia.nrrd")
    cli, cg = read_image(dicom_runs / "out_bqml" / "tia" / "tia.nii.gz")
    assert g.same_grid(cg) and abs(tia.sum() / cli.sum() - 1) < 1e-4
    dose, _ = read_image(patient / "dose.nrrd")
    back, bg, _ = read_rt_dose(patient / "dicom" / "rtdose.dcm")
    assert bg.same_grid(g) and np.abs(back - dose).max() <= 1e-3 * dose.max()
    assert "BQML -> Bq/mL" in (out / "batch.log").read_text()


def test_counts_without_calibration_end_the_command_with_a_message(small_series_dir, tmp_path, capsys):
    assert main(["export-dicom", str(small_series_dir), "--out", str(tmp_path / "d"), "--units", "CNTS"]) == 0
    assert main(["dosimetry", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "CNTS (counts), not Bq/mL, and no calibration factor" in err and "NM series" in err
    assert not (tmp_path / "o" / "tia" / "tia.nii.gz").exists()
    assert main(["export-dicom", str(small_series_dir), "--out", str(tmp_path / "d")]) == 2   # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_register_takes_dicom_series_folders(dicom_runs, tmp_path):
    """`corx register` with each volume given as a DICOM series folder (counts converted with --calibration)
    writes the pair's files on the reference SPECT grid."""
    import shutil

    import pydicom
    src = dicom_runs / "dicom_cnts"
    folders = {}
    for f in sorted(src.rglob("IM*")):
        h = pydicom.dcmread(str(f), stop_before_pixels=True)
        key = (f.parent.name, "ct" if h.Modality == "CT" else "spect")
        dest = tmp_path / "in" / f"{key[0]}_{key[1]}"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f.name)
        folders[key] = dest
    out = tmp_path / "reg"
    assert main(["register", "--fixed-ct", str(folders["session_4h", "ct"]), "--fixed-spect",
                 str(folders["session_4h", "spect"]), "--moving-ct", str(folders["session_24h", "ct"]),
                 "--moving-spect", str(folders["session_24h", "spect"]), "--calibration",
                 str(src / "calibration.json"), "--out", str(out), "--device", "cpu"]) == 0
    field, g = read_displacement_field(out / "field_spect.nrrd")
    _, ref_g = read_image(dicom_runs / "out_cnts" / "tia" / "tia.nii.gz")
    assert g.same_grid(ref_g) and np.isfinite(field).all()

"""The batch script, run as a user runs it (a separate process) under plain Python with slicer-core."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")

SCRIPT = Path(__file__).resolve().parents[1] / "CoRXRegistration" / "Resources" / "Scripts" / "CoRXBatch.py"


def run_batch(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def two_point_series(src: Path, dest: Path, patient_id: str) -> Path:
    """A user-style manifest for the first two time points of a written simulated series."""
    raw = json.loads((src / "series.json").read_text())
    dest.mkdir(parents=True)
    manifest = {"format": "corx-series/1", "patient_id": patient_id, "reference_index": 0,
                "segmentation": str(src / raw["truth"]["segmentation"]),
                "time_points": [{"hours": tp["hours"], "ct": str(src / tp["ct"]), "spect": str(src / tp["spect"])}
                                for tp in raw["time_points"][:2]]}
    (dest / "series.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.slow
def test_batch_processes_every_patient_and_reports_failures(small_series_dir, tmp_path):
    from CoRXRegistrationLib.imageio import read_displacement_field, read_image
    cohort = tmp_path / "cohort"
    p001 = two_point_series(small_series_dir, cohort / "P001", "P001")
    manifest = json.loads((p001 / "series.json").read_text())
    (p001 / "series.json").write_text(json.dumps({**manifest, "psf_fwhm_mm": 13.0}))    # the clinic's resolution
    broken = cohort / "P002"
    broken.mkdir()
    (broken / "series.json").write_text(json.dumps({"format": "corx-series/1", "patient_id": "P002",
                                                     "time_points": [{"hours": 4, "ct": "missing.nii.gz",
                                                                      "spect": "missing.nii.gz"},
                                                                     {"hours": 24, "ct": "x.nii.gz",
                                                                      "spect": "x.nii.gz"}]}))
    out = tmp_path / "out"
    done = run_batch("--input", cohort, "--output", out, "--device", "cpu", "--pvc", "rbv", "--time-integration", "eq6")
    assert done.returncode == 1, done.stdout + done.stderr               # P002 fails, P001 is still processed
    log = (out / "batch.log").read_text()
    assert "missing.nii.gz" in log and "1 of 2 patients processed" in log
    assert "partial-volume correction rbv, FWHM 13 mm" in log
    # a run into the same output refuses P001's earlier results without --overwrite, leaving them intact
    before = (out / "P001" / "tia.nrrd").stat().st_mtime_ns
    (broken / "series.json").unlink()
    done = run_batch("--input", cohort, "--output", out, "--device", "cpu")
    assert done.returncode == 1 and "--overwrite" in (out / "batch.log").read_text()
    assert (out / "P001" / "tia.nrrd").stat().st_mtime_ns == before
    p1 = out / "P001"
    field, g = read_displacement_field(p1 / "transform_24h.nrrd")
    _, spect_g = read_image(Path(json.loads((cohort / "P001" / "series.json").read_text())["time_points"][0]["spect"]))
    assert g.same_grid(spect_g) and np.isfinite(field).all() and np.abs(field).max() > 0.1
    for name in ("spect_24h_deformed", "ct_24h_deformed", "jacobian_24h", "tia", "fit_rmse", "fit_model", "dose"):
        volume, vg = read_image(p1 / f"{name}.nrrd", require_finite=False)
        assert np.isfinite(volume).all(), name
    import SimpleITK as sitk
    rgb = sitk.ReadImage(str(p1 / "deformation_rgb_24h.nrrd"))
    assert rgb.GetNumberOfComponentsPerPixel() == 3 and rgb.GetSize() == spect_g.shape[::-1]
    tia, tg = read_image(p1 / "tia.nrrd")
    assert tg.same_grid(spect_g) and tia.max() > 0
    voi = (p1 / "voi.csv").read_text().splitlines()
    assert len(voi) > 3 and "liver" in "".join(voi)
    as_json = json.loads((p1 / "voi.json").read_text())
    liver = next(r for r in as_json["vois"] if r["segment"] == "liver")
    assert liver["pvc"] == "rbv" and liver["pvc_tia_mbq_h"] > 0 and (p1 / "tia_pvc.nrrd").is_file()
    assert liver["time_integration"] == "eq6" and liver["organ_tia_mbq_h"] == liver["eq6_tia_mbq_h"]
    assert as_json["units"]["tia"] == "MBq*h" and len(as_json["vois"]) == len(voi) - 1
    assert "spect_lncc" in (p1 / "registration_qa.csv").read_text()

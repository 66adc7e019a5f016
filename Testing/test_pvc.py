"""Partial-volume correction: GTM and recovery coefficients recover known sphere concentrations, RBV keeps
each region's total, the phantom calibration recovers a known FWHM, and the command line refuses what it
cannot correct."""
import json

import numpy as np
import pytest
from scipy import ndimage

from CoRXRegistrationLib.cli import main
from CoRXRegistrationLib.geometry import Geometry
from CoRXRegistrationLib.imageio import write_image, write_seg_nrrd
from TIAMappingLib import pvc
from TIAMappingLib.pvc_calibration import ball_fraction, calibrate_phantom

SPACING = 4.0
FINE = 4                                    # truth made on a 1 mm grid, blurred there, then averaged to 4 mm
SPHERES = {"sphere_16mm": ((-30.0, 0.0, 0.0), 16.0, 150e3), "sphere_24mm": ((30.0, 0.0, 0.0), 24.0, 90e3),
           "sphere_36mm": ((0.0, 40.0, 0.0), 36.0, 60e3)}
BACKGROUND = 10e3


def _grids():
    coarse = Geometry.centred((24, 40, 40), (SPACING,) * 3)
    return coarse, pvc._supersampled(coarse, FINE)


def _bin(fine_volume, coarse):
    nz, ny, nx = coarse.shape
    return fine_volume.reshape(nz, FINE, ny, FINE, nx, FINE).mean(axis=(1, 3, 5))


def _phantom(fwhm_mm):
    """(image blurred on the fine grid and binned, truth on the coarse grid, masks, body CT) on the coarse grid."""
    coarse, fine = _grids()
    body_fine = (np.linalg.norm(fine.lps_grid()[..., :2], axis=-1) < 70.0).astype(np.float32)
    truth = BACKGROUND * body_fine
    for centre, d, conc in SPHERES.values():
        f = ball_fraction(centre, d, fine, sub=1)
        truth = truth * (1 - f) + conc * f
    sigma = fwhm_mm * pvc.FWHM_TO_SIGMA / (SPACING / FINE)
    image = _bin(ndimage.gaussian_filter(truth, sigma, mode="constant"), coarse)
    masks = {n: ball_fraction(c, d, coarse, sub=5) >= 0.5 for n, (c, d, _) in SPHERES.items()}
    ct = np.where(_bin(body_fine, coarse) > 0.5, 0.0, -1000.0).astype(np.float32)
    return image.astype(np.float32), _bin(truth, coarse), masks, ct, coarse, fine


def test_gtm_and_rc_recover_sphere_concentrations_blurred_by_a_known_psf():
    image, truth, masks, ct, coarse, _ = _phantom(12.0)
    res = pvc.Resolution.of(12.0)
    # fine segmentation (the CT's) so that the volumes are the spheres' own
    _, fine = _grids()
    fine_masks = {n: ball_fraction(c, d, fine, sub=1) >= 0.5 for n, (c, d, _) in SPHERES.items()}
    regions = pvc.make_regions(fine_masks, fine, coarse, body_hu=ct)
    for s, (name, (_, d, _)) in enumerate(SPHERES.items()):
        assert regions.segment_volume_ml()[s] == pytest.approx(np.pi / 6 * d ** 3 / 1000, rel=0.03)
    result = pvc.correct_series([image], coarse, regions, "gtm", [res])
    uncorrected = [image[masks[n]].mean() / SPHERES[n][2] for n in SPHERES]
    assert max(uncorrected) < 0.8                                # partial volume is there to correct
    for s, name in enumerate(regions.segments):
        true_total = SPHERES[name][2] * regions.segment_volume_ml()[s] / 1e6
        assert result.segment_totals_mbq[0, s] == pytest.approx(true_total, rel=0.03), name
    assert result.condition > 1.0
    # the recovery curve of the two outer spheres corrects the middle one (same contrast band)
    vols = regions.segment_volume_ml()
    rc = [float((regions.segment_fraction(s) * image).sum() / regions.segment_fraction(s).sum()) / SPHERES[n][2]
          for s, n in enumerate(regions.segments)]
    curve = pvc.RecoveryCurve.fit(vols, rc)
    assert curve(vols) == pytest.approx(rc, rel=0.05)
    out = pvc.correct_series([image], coarse, regions, "rc", [res], recovery=curve)
    assert out.segment_totals_mbq[0, 1] == pytest.approx(SPHERES["sphere_24mm"][2] * vols[1] / 1e6, rel=0.06)


def test_rbv_keeps_every_region_total_and_restores_the_core_concentration():
    image, truth, masks, ct, coarse, _ = _phantom(12.0)
    rng = np.random.default_rng(3)
    noisy = (rng.poisson(image / 50.0) * 50.0).astype(np.float32)
    res = pvc.Resolution.of(12.0)
    regions = pvc.make_regions(masks, coarse, coarse, body_hu=ct)
    tm = pvc.transfer_matrix(regions, coarse, res)
    for img in (image, noisy):
        c = pvc.gtm_concentrations(img, regions, tm)
        corrected = pvc.rbv(img, regions, tm, c)
        totals = regions.fractions.reshape(len(c), -1) @ corrected.ravel().astype(np.float64)
        expected = np.maximum(c, 0) * regions.fractions.reshape(len(c), -1).sum(axis=1)
        np.testing.assert_allclose(totals, expected, rtol=2e-3, atol=1e-6 * expected.max())
    inside = ball_fraction(SPHERES["sphere_36mm"][0], 36.0, coarse) > 0.99
    assert corrected[inside].mean() == pytest.approx(SPHERES["sphere_36mm"][2], rel=0.05)
    assert noisy[inside].mean() < 0.9 * SPHERES["sphere_36mm"][2]


def test_overlapping_segments_go_to_the_smaller_and_the_larger_still_owns_them():
    image, truth, masks, ct, coarse, _ = _phantom(10.0)
    big = ball_fraction((0.0, 40.0, 0.0), 60.0, coarse) >= 0.5          # holds the 36 mm sphere
    regions = pvc.make_regions({"organ": big, "lesion": masks["sphere_36mm"]}, coarse, coarse, body_hu=ct)
    assert regions.names[:2] == ["organ", "lesion"]
    np.testing.assert_allclose(regions.fractions.sum(axis=0), 1.0, atol=1e-5)
    assert regions.segment_volume_ml()[0] == pytest.approx(big.sum() * coarse.voxel_volume_ml)
    assert regions.overlap_ml[0, 1] == pytest.approx(regions.segment_volume_ml()[1])


def test_regions_counted_in_each_segments_box_equal_the_whole_grid_count():
    """make_regions counts each segment's sub-voxels only near the segment; on an oblique, finer
    segmentation grid that must give the fractions of counting over the whole super-sampled grid."""
    from CoRXRegistrationLib.resample import resample
    target = Geometry((14, 16, 18), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    c, s = np.cos(0.4), np.sin(0.4)
    seg_g = Geometry((30, 34, 36), (2.0, 2.0, 2.0), (18.0, 0.0, 4.0), np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]).ravel())
    z, y, x = np.mgrid[:30, :34, :36]
    segments = {"liver": ((z - 14) ** 2 + (y - 16) ** 2 + (x - 18) ** 2) < 90,
                "tumour": ((z - 6) ** 2 + (y - 25) ** 2 + (x - 9) ** 2) < 5,
                "edge": (z < 3) & (y > 30)}
    regions = pvc.make_regions(segments, seg_g, target)
    order = sorted(segments, key=lambda n: -int(segments[n].sum()))
    labels = np.zeros(seg_g.shape, np.uint8)
    for code, name in enumerate(order, start=1):
        labels[segments[name]] = code
    fine = resample(labels, seg_g, pvc._supersampled(target, 3), mode="nearest")
    inside = 0
    for code, name in enumerate(order, start=1):
        whole = (fine == code).reshape(14, 3, 16, 3, 18, 3).sum(axis=(1, 3, 5)) / 27.0
        inside += whole.sum() > 0
        np.testing.assert_array_equal(regions.fractions[regions.names.index(name)], whole.astype(np.float32))
    assert inside == 3


def test_the_phantom_calibration_recovers_a_known_fwhm():
    pytest.importorskip("torch", reason="the simulator images the phantom with torch (absent in the Slicer 5.8 "
                                        "package set; present in make test)")
    from CoRXRegistrationLib.simulation.iec_phantom import IECPhantom, image_phantom, phantom_grid, sphere_table
    phantom, grid = IECPhantom(), phantom_grid()
    done = image_phantom(phantom, grid, "gaussian", seed=2, fwhm_mm=11.0)      # the simulator's own blur + noise
    spheres = {r["name"]: done["occupancy"][r["name"]] >= 0.5 for r in sphere_table(phantom)}
    cal = calibrate_phantom(done["spect"], grid, spheres, done["hu"], phantom.background_bq_per_ml * phantom.ratio,
                            phantom.background_bq_per_ml)
    assert cal.resolution.fwhm_mm[0] == pytest.approx(11.0, abs=0.5)
    rc = [r["recovery"] for r in cal.record["spheres"]]
    assert rc == sorted(rc) and 0.1 < rc[0] < rc[-1] < 1.0
    assert cal.recovery(1e4) > rc[-1]
    with pytest.raises(pvc.PVCError, match="hotter"):
        calibrate_phantom(done["spect"], grid, spheres, done["hu"], 1.0, 2.0)


def _series_files(tmp_path):
    image, truth, masks, ct, coarse, _ = _phantom(12.0)
    spects = []
    for n, f in enumerate((1.0, 0.6, 0.3)):
        p = tmp_path / f"spect_{n}.nii.gz"
        write_image(p, image * f, coarse)
        spects.append(str(p))
    seg = tmp_path / "vois.seg.nrrd"
    labels = np.zeros(coarse.shape, np.uint8)
    for code, name in enumerate(SPHERES, start=1):
        labels[masks[name]] = code
    write_seg_nrrd(seg, labels, {c: n for c, n in enumerate(SPHERES, start=1)}, coarse)
    ct_path = tmp_path / "ct.nii.gz"
    write_image(ct_path, ct, coarse)
    return spects, seg, ct_path


def test_corx_tia_corrects_and_refuses_what_it_cannot_correct(tmp_path, capsys):
    spects, seg, ct = _series_files(tmp_path)
    base = ["tia", "--spect", *spects, "--times", "4", "24", "48", "--segmentation", str(seg), "--ct", str(ct)]
    assert main(base + ["--out", str(tmp_path / "rbv"), "--pvc", "rbv", "--psf-fwhm-mm", "12"]) == 0
    out = tmp_path / "rbv"
    for name in ("tia_pvc.nii.gz", "dose_pvc.nii.gz", "spect_pvc_1.nii.gz", "spect_pvc_3.nii.gz", "tia.nii.gz"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "tia_summary.json").read_text())["partial_volume_correction"]
    assert summary["method"] == "rbv" and summary["resolution"][0]["fwhm_mm"] == [12.0] * 3
    import csv
    rows = {r["segment"]: r for r in csv.DictReader((out / "voi.csv").open())}
    big = rows["sphere_36mm"]
    assert float(big["pvc_factor"]) > 1.15 and float(big["pvc_tia_mbq_h"]) > float(big["voxel_tia_sum_mbq_h"])
    assert "smaller than the resolution" not in big["pvc_warning"]
    assert "mean_gy_pvc" in big and float(big["mean_gy_kernel"]) > 0
    dvh = (out / "dvh.csv").read_text().splitlines()
    assert dvh[0] == "segment,dose_gy,volume_fraction,volume_fraction_kernel,volume_fraction_pvc"
    capsys.readouterr()
    cases = [(["--pvc", "rc", "--psf-fwhm-mm", "12"], "recovery curve"),
             (["--pvc", "gtm"], "needs the SPECT resolution"),
             (["--pvc", "gtm", "--psf-fwhm-mm", "0.2"], "1-60 mm"),
             (["--pvc", "gtm", "--pvc-calibration", str(seg)], "cannot read the PVC calibration")]
    for n, (extra, message) in enumerate(cases):
        assert main(base + ["--out", str(tmp_path / f"bad{n}")] + extra) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"bad{n}" / "voi.csv").exists()
    no_seg = ["tia", "--spect", *spects, "--times", "4", "24", "48", "--pvc", "gtm", "--psf-fwhm-mm", "12"]
    assert main(no_seg + ["--out", str(tmp_path / "noseg")]) == 2
    assert "needs a segmentation" in capsys.readouterr().err


def test_settings_take_the_command_line_then_the_manifest_then_the_calibration(tmp_path):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(pvc.Calibration(pvc.Resolution.of(11.0), pvc.RecoveryCurve(1.0, 5.0, 1.0)).to_dict()))
    assert pvc.PVCSettings.choose("gtm", calibration=cal).resolutions(2)[0].fwhm_mm == (11.0,) * 3
    per_time = pvc.PVCSettings.choose("gtm", calibration=cal, per_time_fwhm=[12.0, [12, 12, 14]], n_times=2)
    assert [r.fwhm_mm for r in per_time.resolutions(2)] == [(12.0,) * 3, (12.0, 12.0, 14.0)]
    assert pvc.PVCSettings.choose("rc", fwhm_mm=[9.0], calibration=cal).resolutions(1)[0].fwhm_mm == (9.0,) * 3
    assert pvc.PVCSettings.choose("none", fwhm_mm=[9.0]).method == "none"
    with pytest.raises(pvc.PVCError, match="2 SPECT resolutions for 3"):
        per_time.resolutions(3)


def test_the_dose_kernel_is_the_stored_one_and_keeps_its_energy_on_another_grid():
    from TIAMappingLib.dose import local_deposition_dose
    from TIAMappingLib.kernel_dose import KERNEL_VOXEL_MM, kernel_dose, kernel_for_spacing, load_kernel
    k = load_kernel()
    assert k.shape == (51, 51, 51) and k[25, 25, 25] == pytest.approx(0.20662, rel=1e-4)
    np.testing.assert_allclose(k, k[::-1, ::-1, ::-1], rtol=1e-12)
    np.testing.assert_array_equal(kernel_for_spacing((KERNEL_VOXEL_MM,) * 3), k)
    assert not k.flags.writeable                    # cached: nobody changes it for the next caller
    k442 = kernel_for_spacing((4.42, 4.42, 4.42))
    assert k442.sum() * 4.42 ** 3 == pytest.approx(k.sum() * KERNEL_VOXEL_MM ** 3, rel=1e-9)
    # deep inside a large uniform water sphere the dose is the same on either grid, and above local deposition
    # by the photon energy the kernel keeps (its sum over the electrons' local value)
    doses = {}
    for spacing in (KERNEL_VOXEL_MM, 4.42):
        g = Geometry.centred((64, 64, 64), (spacing,) * 3)
        r = np.linalg.norm(g.lps_grid(), axis=-1)
        tia = np.where(r < 120.0, 1e6, 0.0).astype(np.float32)
        centre = r < 10.0
        doses[spacing] = float(kernel_dose(tia, g)[centre].mean())
        local = float(local_deposition_dose(tia)[0][centre].mean())
        assert 1.04 < doses[spacing] / local < 1.12
        rho = np.where(r < 60.0, 2.0, 1.0)
        assert float(kernel_dose(tia, g, rho)[centre].mean()) == pytest.approx(doses[spacing] / 2.0, rel=1e-6)
    assert doses[4.42] == pytest.approx(doses[KERNEL_VOXEL_MM], rel=0.01)
    g = Geometry.centred((24, 24, 24), (4.42,) * 3)
    with pytest.raises(ValueError, match="grid_method"):
        kernel_dose(np.ones(g.shape, np.float32), g, grid_method="nearest")

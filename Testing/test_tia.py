"""TIA and dosimetry library."""
import subprocess
import sys

import numpy as np
import pytest

from CoRXRegistrationLib.imageio import read_image
from TIAMappingLib.dose import hu_to_density, local_deposition_dose
from TIAMappingLib.nuclides import LU177
from TIAMappingLib.timecurves import single_time_point_tia, trapezoid_with_physical_tail
from TIAMappingLib.voi import voi_curve_fits
from TIAMappingLib.voxel_tia import TIAInputError, compute_voxel_tia

T4 = np.array([4.0, 24.0, 48.0, 120.0])
LAM_P = LU177.decay_constant_per_h


def vol(values):
    return [np.full((2, 2, 2), v, np.float32) for v in values]


def test_physical_constants():
    assert LU177.half_life_h == pytest.approx(159.528)
    assert LU177.decay_constant_per_h == pytest.approx(np.log(2) / 159.528)


def test_mono_exponential_known_integral():
    lam = np.log(2) / 40.0
    r = compute_voxel_tia(vol(2e5 * np.exp(-lam * T4)), T4)
    assert (r.model == 1).all()
    assert float(r.tia.mean()) == pytest.approx(2e5 / lam, rel=0.01)
    assert float(r.fit_rmse.max()) < 1.0 and float(r.fit_r2.min()) > 0.999


def test_rising_curve_uses_trapezoid_and_physical_tail():
    a = np.array([1e4, 2e4, 3e4, 4e4])
    r = compute_voxel_tia(vol(a), T4)
    assert (r.model == 2).all()
    expected = 0.5 * 4 * 1e4 + 0.5 * (1e4 + 2e4) * 20 + 0.5 * (2e4 + 3e4) * 24 + 0.5 * (3e4 + 4e4) * 72 + 4e4 / LAM_P
    assert float(r.tia.mean()) == pytest.approx(expected, rel=1e-6)


def test_slower_than_physical_decay_falls_back():
    lam = LAM_P * 0.5
    r = compute_voxel_tia(vol(1e5 * np.exp(-lam * T4)), T4)
    assert (r.model == 2).all()
    expected = trapezoid_with_physical_tail(T4, (1e5 * np.exp(-lam * T4))[None], LAM_P)[0]
    assert float(r.tia.mean()) == pytest.approx(expected, rel=1e-6)


def test_exploding_fit_falls_back_and_zero_voxels_are_marked():
    spike = np.array([0.0, 0.0, 1.0, 0.0])  # one positive point: no mono-exponential fit possible
    arrays = vol(spike)
    arrays = [np.stack([a[0], np.zeros_like(a[0])]) for a in arrays]
    r = compute_voxel_tia(arrays, T4)
    assert (r.model[0] == 3).all() and (r.model[1] == 0).all() and (r.tia[1] == 0).all()


def test_biexponential_with_uptake_integral_within_1pct():
    t = np.array([1.0, 4.0, 24.0, 48.0, 72.0, 120.0, 168.0])
    l1, l2, a = np.log(2) / 60.0, np.log(2) / 2.0, 500.0
    y = a * (np.exp(-l1 * t) - np.exp(-l2 * t))
    fit = voi_curve_fits(t, y[None])[0]
    true = a * (1 / l1 - 1 / l2)
    assert fit["biexp_tia_mbq_h"] == pytest.approx(true, rel=0.01)
    assert fit["best_model"] in ("biexp", "triexp")
    assert fit["best_tia_mbq_h"] == pytest.approx(true, rel=0.01)


def test_aicc_only_considers_models_it_can_score():
    fit = voi_curve_fits(T4, (100.0 * np.exp(-0.02 * T4))[None])[0]
    assert fit["best_model"] == "mono" and np.isnan(fit.get("biexp_aicc", np.nan))


def test_single_time_point():
    t, teff = 72.0, 60.0
    lam = np.log(2) / teff
    a = 1e5 * np.exp(-lam * t)
    assert single_time_point_tia(a, t, teff) == pytest.approx(1e5 / lam, rel=1e-9)
    r = compute_voxel_tia([np.full((2, 2, 2), a, np.float32)], [t], population_half_life_h=teff)
    assert (r.model == 4).all() and float(r.tia.mean()) == pytest.approx(1e5 / lam, rel=1e-5)
    with pytest.raises(TIAInputError, match="population"):
        compute_voxel_tia([np.ones((2, 2, 2), np.float32)], [t])


def test_bad_inputs_are_named():
    good = vol([4.0, 3.0, 2.0, 1.0])
    with pytest.raises(TIAInputError, match="strictly increasing"):
        compute_voxel_tia(good, [4.0, 24.0, 24.0, 120.0])
    with pytest.raises(TIAInputError, match=">= 0"):
        compute_voxel_tia(good, [-1.0, 24.0, 48.0, 120.0])
    bad = [a.copy() for a in good]
    bad[2][0, 0, 0] = np.nan
    with pytest.raises(TIAInputError, match="48 h has 1 NaN"):
        compute_voxel_tia(bad, T4)
    with pytest.raises(TIAInputError, match="different shapes"):
        compute_voxel_tia(good[:3] + [np.ones((3, 2, 2), np.float32)], T4)
    neg = [a.copy() for a in good]
    neg[1][0, 0, 0] = -5.0
    assert compute_voxel_tia(neg, T4).negative_voxels_clipped == 1


def test_uniform_tia_in_water_gives_hand_calculated_dose():
    tia = np.full((3, 3, 3), 1e6, np.float32)   # Bq h/mL
    dose, _ = local_deposition_dose(tia, hu_to_density(np.zeros((3, 3, 3))))
    # 1e6 Bq h/mL * 3600 s/h = 3.6e9 decays/mL; * 0.1479 MeV * 1.602e-13 J/MeV / 1e-3 kg/mL
    hand = 3.6e9 * 0.1479 * 1.602176634e-13 / 1e-3
    assert float(dose.mean()) == pytest.approx(hand, rel=1e-5)
    assert hand == pytest.approx(0.0853, rel=0.01)  # Gy per MBq h/mL in water


# Eq. 6 is mono-exponential from the first scan (4 h): a fast-clearing component of the true curve
# (spleen 10 % with T ~ 3 h; kidney 30 % with T ~ 2.5 h) is a model error of the method, measured
# here at ~2.5 % (spleen) and ~3.5 % (kidneys); liver stays within 2 %.
@pytest.mark.parametrize("name, tolerance", [("liver", 0.02), ("spleen", 0.03), ("kidney_left", 0.045),
                                             ("kidney_right", 0.045)])
def test_noise_free_simulated_series_gives_true_organ_tia(small_series, name, tolerance):
    s = small_series
    r = compute_voxel_tia(s.truth_activity, s.config.times_h)
    mask = np.isin(s.labels_spect, s.phantom.voi_labels()[name])
    est = float(r.tia[mask].sum())
    true = float(s.truth_tia[mask].sum())
    assert est == pytest.approx(true, rel=tolerance), name


# With a schedule that resolves the fast components (the simulator's own kinetics sampled 0.5-168 h,
# noise-free), the VOI fit chosen by AICc among mono/bi/tri-exponential recovers the true organ TIA
# within 2 %: the library is exact where the data allow; the 4-point gap above is Eq. 6's model error.
DENSE_H = (0.5, 1.0, 2.0, 4.0, 8.0, 24.0, 48.0, 72.0, 120.0, 168.0)


@pytest.mark.parametrize("name", ["liver", "spleen", "kidney_left", "kidney_right"])
def test_noise_free_densely_sampled_organ_tia_within_2pct(small_series, name):
    from CoRXRegistrationLib.simulation.kinetics import VoxelKinetics
    from TIAMappingLib.voi import voi_curve_fits
    s = small_series
    ph = s.phantom
    kinetics = VoxelKinetics(ph.labels, ph.uptake_scale, ph.washout_scale, s.curves)
    mask = np.isin(ph.labels, ph.voi_labels()[name])
    ml = ph.geometry.voxel_volume_ml
    totals = [float(kinetics.activity(t)[mask].sum(dtype=np.float64)) * ml / 1e6 for t in DENSE_H]   # MBq
    fit = voi_curve_fits(DENSE_H, np.array([totals]))[0]
    assert fit["best_model"] in ("biexp", "triexp")
    assert fit["best_tia_mbq_h"] == pytest.approx(s.voi_truth[name]["tia_mbq_h"], rel=0.02), fit


def test_cli_tia_contract(tmp_path, small_series_dir):
    import json
    m = json.loads((small_series_dir / "series.json").read_text())
    # the truth activities are registered (reference frame) SPECT volumes on one grid
    spects = [str(small_series_dir / p["truth"]["activity"]) for p in m["time_points"]]
    times = [str(p["hours"]) for p in m["time_points"]]
    out = tmp_path / "tia"
    cmd = [sys.executable, "-m", "CoRXRegistrationLib.cli", "tia", "--spect", *spects, "--times", *times,
           "--segmentation", str(small_series_dir / m["truth"]["segmentation"]),
           "--ct", str(small_series_dir / m["time_points"][0]["ct"]), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("tia.nii.gz", "fit_rmse.nii.gz", "fit_model.nii.gz", "dose.nii.gz", "voi.csv", "dvh.csv"):
        assert (out / name).is_file(), name
    tia, g = read_image(out / "tia.nii.gz")
    _, g_in = read_image(spects[0])
    assert g.same_grid(g_in) and tia.max() > 0
    assert "liver" in (out / "voi.csv").read_text()
    # bad input: a time missing -> non-zero exit with a clear message, nothing overwritten
    fresh = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "second"), "--time-integration", "eq6"],
                           capture_output=True, text=True)
    assert fresh.returncode == 0
    for folder, method in ((out, "washout"), (tmp_path / "second", "eq6")):
        summary = json.loads((folder / "tia_summary.json").read_text())
        assert summary["time_integration"]["method"] == method
        assert f",{method}," in (folder / "voi.csv").read_text()        # the time_integration column
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    short = [c for c in cmd if c != times[-1]]
    r = subprocess.run(short[:-1] + [str(tmp_path / "short")], capture_output=True, text=True)
    assert r.returncode == 2 and "4 SPECT files but 3 times" in r.stderr


# ----------------------------------------------------------------------------- time integration
T_SMC = np.array([0.5, 4.0, 24.0, 48.0])


def _uptake_then_washout(peak=1e5, early=3e4, half_life_h=80.0):
    """Linear uptake through (0.5 h, early) to (4 h, peak), then exactly mono-exponential: (values at T_SMC,
    the exact integral 0 -> inf)."""
    lam = np.log(2) / half_life_h
    y = np.array([early, peak, peak * np.exp(-lam * 20.0), peak * np.exp(-lam * 44.0)])
    return y, 0.5 * 0.5 * early + 0.5 * (early + peak) * 3.5 + peak / lam


def test_washout_integration_is_exact_for_uptake_then_mono_exponential_washout():
    y, true = _uptake_then_washout()
    r = compute_voxel_tia(vol(y), T_SMC)
    assert (r.model == 5).all()
    assert float(r.tia.mean()) == pytest.approx(true, rel=1e-4)
    assert float(r.lambda_eff.mean()) == pytest.approx(np.log(2) / 80.0, rel=1e-3)
    assert float(r.a0.mean()) == pytest.approx(1e5 * np.exp(np.log(2) / 80.0 * 4.0), rel=1e-3)   # at t = 0
    assert float(r.fit_r2.min()) > 0.999
    # the paper's Eq. 6 fits one mono-exponential through the rising 0.5 h point: slower than decay, so the
    # physical-decay tail after 48 h, far too long
    paper = compute_voxel_tia(vol(y), T_SMC, integration="eq6")
    assert (paper.model == 2).all() and float(paper.tia.mean()) / true - 1.0 > 0.3
    fit = voi_curve_fits(T_SMC, y[None] / 1e3)[0]
    assert fit["washout_tia_mbq_h"] == pytest.approx(true / 1e3, rel=1e-4)
    assert fit["organ_tia_mbq_h"] == fit["washout_tia_mbq_h"] and fit["time_integration"] == "washout"
    assert voi_curve_fits(T_SMC, y[None], integration="eq6")[0]["organ_tia_mbq_h"] == pytest.approx(
        float(paper.tia.mean()), rel=1e-4)


def test_curves_falling_from_the_first_point_integrate_as_eq6():
    rng = np.random.default_rng(3)
    rates = rng.uniform(0.005, 0.08, (2, 3, 4))
    fast = rng.uniform(0.0, 0.5, (2, 3, 4))
    stack = [(1e5 * (np.exp(-rates * t) + fast * np.exp(-0.3 * t))).astype(np.float32) for t in T4]
    a, b = compute_voxel_tia(stack, T4), compute_voxel_tia(stack, T4, integration="eq6")
    for name in ("tia", "model", "a0", "lambda_eff", "fit_rmse", "fit_r2"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_a_curve_peaking_at_its_last_point_gets_the_physical_tail_and_bad_names_are_refused():
    a = np.array([1e4, 2e4, 3e4, 4e4])
    r = compute_voxel_tia(vol(a), T4)
    assert (r.model == 2).all()
    assert float(r.tia.mean()) == pytest.approx(float(trapezoid_with_physical_tail(T4, a[None], LAM_P)[0]), rel=1e-6)
    with pytest.raises(TIAInputError, match="time integration must be one of"):
        compute_voxel_tia(vol(a), T4, integration="trapezoid")


# The simulator's own noise-free kinetics sampled at the 0.5 / 4 / 24 / 48 h protocol: the rising 0.5 h point
# bends Eq. 6's single fit (+48 to +56 % on this patient); the washout phase does not. What is left is the
# fast-clearing component still present at 4 h (liver 20 %, kidneys 30 %, T ~ 3 h), which the washout fit
# follows: liver -7 %, spleen +6 %, kidneys -9 / -10 % on this patient.
@pytest.mark.parametrize("name, tolerance", [("liver", 0.10), ("spleen", 0.10), ("kidney_left", 0.15),
                                             ("kidney_right", 0.15)])
def test_washout_integration_of_a_half_hour_protocol(small_series, name, tolerance):
    from CoRXRegistrationLib.simulation.kinetics import VoxelKinetics
    s = small_series
    ph = s.phantom
    kinetics = VoxelKinetics(ph.labels, ph.uptake_scale, ph.washout_scale, s.curves)
    mask = np.isin(ph.labels, ph.voi_labels()[name])
    totals = [float(kinetics.activity(t)[mask].sum(dtype=np.float64)) * ph.geometry.voxel_volume_ml / 1e6
              for t in T_SMC]
    fit = voi_curve_fits(T_SMC, np.array([totals]))[0]
    true = s.voi_truth[name]["tia_mbq_h"]
    washout, paper = fit["washout_tia_mbq_h"] / true - 1.0, fit["eq6_tia_mbq_h"] / true - 1.0
    assert abs(washout) < tolerance and abs(washout) < abs(paper) - 0.1, (washout, paper)

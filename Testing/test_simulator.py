"""The simulator's ground truth is true."""
import json

import numpy as np
import pytest
from scipy import ndimage

from CoRXRegistrationLib.imageio import read_displacement_field, read_image, read_segmentation
from CoRXRegistrationLib.resample import resample
from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series
from CoRXRegistrationLib.simulation.imaging import FWHM_TO_SIGMA
from CoRXRegistrationLib.simulation.kinetics import LN2, RegionCurve, Term, VoxelKinetics
from CoRXRegistrationLib.simulation.motion import jacobian_determinant


def body_mask(series, i):
    return series.labels_spect > 0


def test_warping_moving_ct_with_saved_field_reproduces_reference(small_series):
    s, ref = small_series, small_series.config.reference_index
    grid = s.reference_spect_geometry
    ref_ct = resample(s.ct[ref].astype(np.float32), s.ct_geometry[ref], grid, fill=-1000.0)
    inside = ndimage.binary_erosion(s.labels_spect > 0, iterations=2)
    for i, field in s.truth_field_ct.items():
        warped = resample(s.ct[i].astype(np.float32), s.ct_geometry[i], grid, displacement=field, fill=-1000.0)
        unwarped = resample(s.ct[i].astype(np.float32), s.ct_geometry[i], grid, fill=-1000.0)
        err = np.abs(warped - ref_ct)[inside].mean()
        err0 = np.abs(unwarped - ref_ct)[inside].mean()
        assert err < 0.25 * err0, (i, err, err0)
        assert err < 25.0  # HU, interpolation only


def test_warping_moving_spect_with_saved_field_reproduces_reference_frame_activity(small_series):
    s = small_series
    grid = s.reference_spect_geometry
    sigma = s.spect_fwhm_mm * FWHM_TO_SIGMA / np.asarray(grid.spacing[::-1])
    for i, field in s.truth_field_spect.items():
        expected = ndimage.gaussian_filter(s.truth_activity[i], sigma)
        warped = resample(s.spect[i], s.spect_geometry[i], grid, displacement=field)
        unwarped = resample(s.spect[i], s.spect_geometry[i], grid)
        hot = expected > 0.2 * expected.max()
        err = np.abs(warped - expected)[hot].mean() / expected[hot].mean()
        err0 = np.abs(unwarped - expected)[hot].mean() / expected[hot].mean()
        assert err < 0.5 * err0 and err < 0.12, (i, err, err0)


def test_spect_field_differs_from_ct_field_by_the_session_mismatch(small_series):
    s = small_series
    for i in s.truth_field_ct:
        d = s.truth_field_spect[i] - s.truth_field_ct[i]
        assert float(np.abs(d).max()) > 0.1  # CT-only registration is wrong for SPECT


def test_saved_fields_are_invertible(small_series_dir):
    manifest = json.loads((small_series_dir / "series.json").read_text())
    for point in manifest["time_points"]:
        for key in ("field_ct", "field_spect"):
            if key in point["truth"]:
                field, g = read_displacement_field(small_series_dir / point["truth"][key])
                assert float(jacobian_determinant(field, g.spacing).min()) > 0.0


def test_region_tia_equals_numeric_integral_of_curve():
    lam_p = np.log(2) / 159.528
    curve = RegionCurve(1e5, (Term(0.3, LN2 / 2.5), Term(0.7, LN2 / 75.0), Term(-1.0, LN2 / 0.5, modulated=False)))
    t = np.concatenate([np.linspace(0, 50, 200001), np.linspace(50, 20000, 400001)[1:]])
    for m, w in ((1.0, 1.0), (0.7, 1.3)):
        numeric = np.trapezoid(curve.concentration(t, m, w, lam_p), t)
        assert curve.tia(m, w, lam_p) == pytest.approx(numeric, rel=1e-5)


def test_saved_tia_equals_integral_of_saved_curves(small_series):
    s = small_series
    p = s.phantom
    kin = VoxelKinetics(p.labels, p.uptake_scale, p.washout_scale, s.curves)
    exact = kin.tia()
    t = np.concatenate([np.linspace(0, 24, 481), np.linspace(24, 4000, 3001)[1:]])
    numeric = np.zeros_like(exact, dtype=np.float64)
    prev = kin.activity(t[0])
    for t0, t1 in zip(t[:-1], t[1:]):
        cur = kin.activity(t1)
        numeric += 0.5 * (prev + cur) * (t1 - t0)
        prev = cur
    tail = prev / (np.log(2) / 159.528)  # beyond 4000 h only physical decay matters (< 1e-7 of the total)
    hot = exact > 0.01 * exact.max()
    np.testing.assert_allclose((numeric + tail)[hot], exact[hot], rtol=5e-3)


def test_deterministic_for_a_seed():
    cfg = SimulationConfig.preset("small", seed=5, times_h=(4.0, 24.0))
    a, b = simulate_series(cfg), simulate_series(SimulationConfig.preset("small", seed=5, times_h=(4.0, 24.0)))
    np.testing.assert_array_equal(a.spect[1], b.spect[1])
    np.testing.assert_array_equal(a.ct[1], b.ct[1])
    c = simulate_series(SimulationConfig.preset("small", seed=6, times_h=(4.0, 24.0)))
    assert not np.array_equal(a.ct[1], c.ct[1])


def test_written_series_has_geometry_manifest_and_segmentation(small_series, small_series_dir):
    manifest = json.loads((small_series_dir / "series.json").read_text())
    assert manifest["format"] == "corx-series/1" and manifest["units"]["spect"] == "Bq/mL"
    assert [p["hours"] for p in manifest["time_points"]] == [4.0, 24.0, 48.0, 120.0]
    for i, point in enumerate(manifest["time_points"]):
        _, g = read_image(small_series_dir / point["spect"])
        assert g.same_grid(small_series.spect_geometry[i])
        _, g = read_image(small_series_dir / point["ct"])
        assert g.same_grid(small_series.ct_geometry[i])
    segs, g = read_segmentation(small_series_dir / manifest["truth"]["segmentation"])
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= set(segs)
    assert g.same_grid(small_series.reference_spect_geometry)


def test_activity_is_realistic_and_quantified(small_series):
    s = small_series
    kidney = np.isin(s.labels_spect, (6, 7, 8, 9))
    liver = s.labels_spect == 4
    a24 = s.truth_activity[1]
    assert 0.2e6 < a24[kidney].mean() < 3e6      # Bq/mL for ~7.4 GBq 177Lu-DOTATATE
    assert a24[kidney].mean() > 3 * a24[liver].mean()
    assert s.truth_activity[3][kidney].mean() < a24[kidney].mean()  # clearance


def test_patient15_orientation_and_labels():
    pytest.importorskip("zipfile")
    from CoRXRegistrationLib.simulation.patient15 import default_zip_path, patient15_phantom
    if not default_zip_path().is_file():
        pytest.skip("shared patient15 data not present")
    p = patient15_phantom(np.random.default_rng(0))
    g = p.geometry
    def centroid(label):
        return g.index_to_lps(np.argwhere(p.labels == label)[:, ::-1].astype(float)).mean(axis=0)
    assert centroid(4)[0] < 0 < centroid(5)[0]           # liver on patient right (-x LPS), spleen left
    assert centroid(8)[0] > 0 > centroid(6)[0]           # left/right kidneys
    assert centroid(4)[2] > centroid(6)[2]               # liver above kidneys (superior = +z)
    assert centroid(6)[1] > centroid(4)[1]               # kidneys posterior to the liver centre
    assert p.hu.max() < 1500                             # the couch is removed


def test_randomised_training_patients_differ_and_keep_the_seed_stream():
    """The randomised preset draws each patient's settings from its own stream: two seeds differ, a seed
    repeats, and the default-valued SPECT/CT mismatch scale leaves the scanner cache keys (and so the
    reconstructions cached before it existed) as they were."""
    from dataclasses import asdict
    import hashlib
    from CoRXRegistrationLib.simulation.randomised import randomised_config
    from CoRXRegistrationLib.simulation.series import scanner_cache_key
    a, b = randomised_config(200), randomised_config(201)
    assert asdict(a) == asdict(randomised_config(200)) and asdict(a) != asdict(b)
    for cfg in (a, b):
        cfg.validate()
        assert cfg.seed in (200, 201) and 0.5 <= cfg.spect_mismatch_scale <= 2.5
    clinical = SimulationConfig.preset("clinical", seed=5000, imaging="scanner")
    settings = {k: v for k, v in asdict(clinical).items()
                if k not in ("patient15_zip", "scanner_truth_recon", "spect_mismatch_scale")}
    before = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]
    assert scanner_cache_key(clinical) == f"procedural-5000-{before}"
    assert scanner_cache_key(SimulationConfig.preset("clinical", seed=5000, imaging="scanner",
                                                     spect_mismatch_scale=2.0)) != scanner_cache_key(clinical)

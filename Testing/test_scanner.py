"""Scanner-like SPECT (projection, Poisson counts, OSEM): the collimator's resolution, the counts and the
calibration come out as stated; without the 'scanner' extra the library still works."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from CoRXRegistrationLib.geometry import Geometry

ROOT = Path(__file__).resolve().parents[1]
pytomography = pytest.importorskip("pytomography", reason="the optional extra 'scanner' (pytomography) is not "
                                   "installed; make test installs it")

from CoRXRegistrationLib.simulation.scanner import (ScannerConfig, collimator_fwhm_mm, hu_to_mu,  # noqa: E402
                                                    image_spect)

VOXEL = 4.8


def _grid(n=32, nz=12):
    return Geometry((nz, n, n), (VOXEL,) * 3, (0.0, 0.0, 0.0))


def _fwhm_mm(profile) -> float:
    y = np.asarray(profile, float)
    half = y.max() / 2
    above = np.nonzero(y >= half)[0]
    left, right = above[0], above[-1]
    x_left = left - 1 + (half - y[left - 1]) / (y[left] - y[left - 1])
    x_right = right + (y[right] - half) / (y[right] - y[right + 1])
    return float((x_right - x_left) * VOXEL)


@pytest.mark.parametrize("radius_mm", [150.0, 250.0])
def test_a_point_source_reconstructs_to_the_collimator_fwhm_at_its_depth(radius_mm):
    """A point on the rotation axis is at the orbit radius from the collimator in every view; reconstructed
    without resolution modelling its FWHM is the collimator-detector FWHM there (SY-ME, 208 keV)."""
    g = _grid()
    point = np.zeros(g.shape, np.float32)
    point[6, 16, 16] = 1e9
    cfg = ScannerConfig(views=24, osem_subsets=4, osem_iterations=4, orbit_radius_mm=radius_mm,
                        resolution_modelling=False)
    recon, info = image_spect(point, np.zeros(g.shape, np.float32), g, cfg, np.random.default_rng(0), noise=False)
    stated = float(collimator_fwhm_mm(cfg, radius_mm))
    assert 13.0 < stated < 24.0                       # 14.4 mm at 15 cm, 21.8 mm at 25 cm
    for profile in (recon[6, 16, :], recon[6, :, 16], recon[:, 16, 16]):
        assert _fwhm_mm(profile) == pytest.approx(stated, rel=0.10)
    assert info["fwhm_mm_at_orbit"] == pytest.approx(stated)
    assert float(collimator_fwhm_mm(cfg, 100.0)) == pytest.approx(10.8, abs=0.3)   # SY-ME at 10 cm


def test_counts_follow_activity_times_sensitivity_times_time():
    """In air every photon that leaves towards the collimator is counted with the stated sensitivity."""
    g = _grid()
    zz, yy, xx = np.mgrid[:g.shape[0], :g.shape[1], :g.shape[2]]
    source = ((np.hypot(yy - 15.5, xx - 15.5) < 6) & (zz >= 3) & (zz < 9)).astype(np.float32) * 2e5
    cfg = ScannerConfig(views=12, osem_subsets=3, osem_iterations=1, orbit_radius_mm=200.0)
    _, info = image_spect(source, np.zeros(g.shape, np.float32), g, cfg, np.random.default_rng(1))
    lam = math.log(2) / (6.647 * 24 * 3600)
    mbq = source.sum(dtype=np.float64) * g.voxel_volume_ml * 1e-6
    expected = mbq * cfg.sensitivity_cps_per_mbq * cfg.acquisition_s * -math.expm1(-lam * cfg.acquisition_s) / (
        lam * cfg.acquisition_s)
    assert info["expected_counts"] == pytest.approx(expected, rel=5e-3)     # the response spreads a little
    #                                                                          past the axial field of view
    assert abs(info["total_counts"] - expected) < 4 * math.sqrt(expected)


def test_a_uniform_cylinder_reconstructs_to_its_concentration():
    """A 20 cm water cylinder with attenuation: its centre within 5 % of the concentration (Bq/mL)."""
    g = _grid(48, 16)
    _, yy, xx = np.mgrid[:g.shape[0], :g.shape[1], :g.shape[2]]
    r_mm = np.hypot(yy - 23.5, xx - 23.5) * VOXEL
    cylinder = (r_mm < 100.0).astype(np.float32)
    mu = hu_to_mu(np.where(cylinder > 0, 0.0, -1000.0))
    assert mu.max() == pytest.approx(0.1352, abs=0.002) and mu.min() == 0.0      # water at 208 keV, air
    cfg = ScannerConfig(views=30, osem_subsets=5, osem_iterations=4)
    recon, info = image_spect(cylinder * 1e5, mu, g, cfg, np.random.default_rng(2))
    centre = recon[4:12][:, r_mm[0] < 50.0]
    assert float(centre.mean()) == pytest.approx(1e5, rel=0.05)
    assert info["orbit_radius_mm"] >= 130.0                       # clears the body by 30 mm at least


def test_the_library_works_without_the_extra(tmp_path):
    """A process where pytomography cannot be imported: the Gaussian simulator and the registration library
    load, and asking for scanner imaging names the missing extra."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class _No(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "pytomography":
                    raise ImportError("no pytomography")
        sys.meta_path.insert(0, _No())
        sys.path[:0] = [{str(ROOT / 'CoRXRegistration')!r}, {str(ROOT / 'TIAMapping')!r}]
        import numpy as np
        from CoRXRegistrationLib.simulation import SimulationConfig
        from CoRXRegistrationLib.simulation.scanner import ScannerUnavailable, image_spect, ScannerConfig
        from CoRXRegistrationLib.geometry import Geometry
        SimulationConfig.preset("small").validate()
        g = Geometry((4, 8, 8), (4.8, 4.8, 4.8), (0.0, 0.0, 0.0))
        try:
            image_spect(np.ones(g.shape), np.zeros(g.shape), g, ScannerConfig(views=4, osem_subsets=1), None)
        except ScannerUnavailable as exc:
            print("refused:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused: scanner-like SPECT needs the optional extra 'scanner'" in done.stdout


def test_importing_the_extra_keeps_the_warning_filters():
    """pytomography's import silences every warning of the process; CoRX puts the filters back."""
    def run(load: str) -> str:
        code = textwrap.dedent(f"""
            import sys, warnings
            sys.path[:0] = [{str(ROOT / 'CoRXRegistration')!r}, {str(ROOT / 'TIAMapping')!r}]
            import torch, scipy.special
            from CoRXRegistrationLib.simulation import scanner
            warnings.simplefilter("error", UserWarning)
            before = list(warnings.filters)
            {load}
            print(warnings.filters == before)
        """)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]
    assert run("import pytomography") == "False"               # what the bare import does
    assert run("scanner.load_pytomography()") == "True"


def test_a_scanner_series_is_written_with_its_truth_and_reuses_its_cache(tmp_path):
    """The simulator's scanner mode on a coarse grid: SPECT in Bq/mL near the activity it images, the unmoved
    activity imaged as truth, the settings in series.json; a cached run gives the same series."""
    import json

    from CoRXRegistrationLib.series_io import read_series
    from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series, write_series
    cfg = SimulationConfig.preset("small", seed=3, times_h=(4.0, 24.0), spect_shape_zyx=(20, 24, 24),
                                  spect_spacing_mm=14.0, imaging="scanner", n_tumours=1,
                                  scanner={"views": 8, "osem_subsets": 2, "osem_iterations": 2,
                                           "seconds_per_view": 225.0})
    cache = tmp_path / "cache"
    series = simulate_series(cfg, scanner_cache=cache)
    again = simulate_series(cfg, scanner_cache=cache)
    assert all(np.array_equal(a, b) for a, b in zip(series.spect, again.spect))
    assert all(np.array_equal(a, b) for a, b in zip(series.truth_recon_unmoved, again.truth_recon_unmoved))
    assert len(list(cache.glob("*/*.npz"))) == 4                       # 2 sessions + 2 unmoved images
    for spect, truth, info in zip(series.spect, series.truth_activity, series.imaging_info):
        v = series.reference_spect_geometry.voxel_volume_ml
        assert spect.sum() * v == pytest.approx(truth.sum() * v, rel=0.25)   # coarse, attenuated, 2 iterations
        assert info["total_counts"] > 1e5
    write_series(series, tmp_path / "series")
    manifest = json.loads((tmp_path / "series" / "series.json").read_text())
    assert manifest["imaging"]["mode"] == "scanner" and manifest["imaging"]["scanner"]["views"] == 8
    assert manifest["time_points"][1]["truth"]["recon_unmoved"] == "truth/recon_unmoved_024h.nii.gz"
    assert (tmp_path / "series" / "truth" / "recon_unmoved_024h.nii.gz").is_file()
    assert read_series(tmp_path / "series").hours == [4.0, 24.0]


def test_the_iec_phantom_has_its_volumes_and_images_like_a_patient():
    """The IEC body phantom: sphere volumes by voxel occupancy within 3 % of pi d^3 / 6, body and lung as drawn;
    imaged by the scanner chain on a coarse grid, the background reads its concentration and the sphere
    recovery grows with the diameter."""
    from CoRXRegistrationLib.simulation.iec_phantom import (SPHERE_DIAMETERS_MM, IECPhantom, image_phantom,
                                                             occupancy, phantom_grid)
    phantom = IECPhantom(background_bq_per_ml=20e3, ratio=8.0)
    fine = phantom_grid(2.5, 128)
    occ = occupancy(phantom, fine)
    for d in SPHERE_DIAMETERS_MM:
        assert occ[f"sphere_{d:g}mm"].sum() * fine.voxel_volume_ml == pytest.approx(math.pi / 6 * d ** 3 / 1000, rel=0.03)
    assert occ["lung"].sum() * fine.voxel_volume_ml == pytest.approx(math.pi * 25.5 ** 2 * 180 / 1000, rel=0.02)
    area = (math.pi * 147 ** 2 / 2 + 2 * 147 * 77 - 2 * (77 ** 2 - math.pi * 77 ** 2 / 4)) / 100   # cm^2
    assert occ["body"].sum() * fine.voxel_volume_ml == pytest.approx(area * 18.0, rel=0.02)
    coarse = phantom_grid(8.84, 48)
    done = image_phantom(phantom, coarse, "scanner", scanner={"views": 30, "osem_subsets": 5,
                                                              "seconds_per_view": 60.0})
    spect, occ = done["spect"], done["occupancy"]
    spheres = sum(occ[f"sphere_{d:g}mm"] for d in SPHERE_DIAMETERS_MM)
    background = (occ["body"] == 1) & (occ["lung"] == 0) & (spheres == 0)
    zz = np.nonzero(background.any(axis=(1, 2)))[0]
    far = background & (np.arange(coarse.shape[0])[:, None, None] < zz.min() + 6)      # away from the spheres
    assert float(spect[far].mean()) == pytest.approx(20e3, rel=0.10)
    rc = [float(spect[occ[f"sphere_{d:g}mm"] >= 0.5].mean()) / 160e3 for d in SPHERE_DIAMETERS_MM[3:]]
    assert rc[0] < rc[1] < rc[2] < 1.1

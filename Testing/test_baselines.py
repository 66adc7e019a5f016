"""The classical baselines run the real elastix (itk-elastix) and ANTs (antspyx): each recovers a known
translation and a known smooth deformation on a small rotated pair; CoRX's SPECT/CT fit composes with
any CT-driven field; a missing package leaves its rows out with the reason."""
import sys

import numpy as np
import pytest
from scipy import ndimage

from CoRXRegistrationLib.geometry import Geometry
from CoRXRegistrationLib.resample import resample

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # itk wrapping noise

C, S = np.cos(0.3), np.sin(0.3)
GRID = Geometry((24, 28, 32), (4.0, 3.0, 3.5), (10.0, -20.0, 5.0), np.array([[C, -S, 0], [S, C, 0], [0, 0, 1]]).ravel())
TEXTURE_GRID = Geometry((52, 60, 68), (2.0, 1.5, 2.0), (-10.0, -40.0, -15.0), GRID.direction)
INNER = (slice(5, -5),) * 3          # away from the border, where a field is only extrapolated


def _texture(seed: int, sigma: float = 3.0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=TEXTURE_GRID.shape), sigma) * 1000 + offset).astype(np.float32)


def _smooth_field(amplitude_mm: float) -> np.ndarray:
    """A smooth LPS-mm field on GRID: one half-period sine per axis, up to ``amplitude_mm`` per component."""
    k, j, i = np.meshgrid(*(np.linspace(0, np.pi, n) for n in GRID.shape), indexing="ij")
    u = np.stack([np.sin(k) * np.sin(j), np.sin(j) * np.sin(i), np.sin(i) * np.sin(k)], axis=-1)
    return (amplitude_mm * u).astype(np.float32)


def _pair(truth: np.ndarray, seed: int = 0, offset: float = 0.0):
    """(fixed, moving) on GRID with moving(p + truth(p)) == fixed(p): the resampling field is ``truth``."""
    texture = _texture(seed, offset=offset)
    return (resample(texture, TEXTURE_GRID, GRID, displacement=truth, fill=offset),
            resample(texture, TEXTURE_GRID, GRID, fill=offset))


def _check(field: np.ndarray, truth: np.ndarray, median_mm: float, mean_mm: float = 0.5) -> None:
    error = np.linalg.norm(field[INNER] - truth[INNER], axis=-1)
    assert np.median(error) < median_mm, np.median(error)
    np.testing.assert_allclose(field[INNER].reshape(-1, 3).mean(0), truth[INNER].reshape(-1, 3).mean(0), atol=mean_mm)


TRANSLATION = np.broadcast_to(np.array([6.0, -4.0, 3.0], np.float32), GRID.shape + (3,)).copy()   # LPS mm
SMOOTH = _smooth_field(5.0)          # up to 5 mm per component (median 6.1 mm in all): 1-2 voxels
# Bounds below: median |u - u_true| in the inner block, about 1.3-2x what each adapter gave when written
# (Elastix displacement distribution 0.77 / 0.75 mm, CT + SPECT 0.99 / 0.93 mm, ANTs SyN 0.42 / 0.59 mm).


@pytest.fixture(scope="module")
def itk():
    return pytest.importorskip("itk")


def test_elastix_adapter_recovers_a_pure_translation_in_lps_mm(itk):
    from CoRXRegistrationLib.baselines.elastix import elastix_register_ct
    fixed, moving = _pair(TRANSLATION)
    field = elastix_register_ct(fixed, moving, GRID, iterations=100, resolutions=2)
    _check(field, TRANSLATION, median_mm=1.0)


def test_elastix_adapter_with_a_fixed_mask_on_a_rotated_grid(itk):
    """The mask shares the fixed image's geometry: with the metric sampled only in an inner block
    (as evaluate's "elastix-masked" samples the axial band) the translation is still recovered."""
    from CoRXRegistrationLib.baselines.elastix import elastix_register_ct
    shift = np.broadcast_to(np.array([-5.0, 3.0, 4.0], np.float32), GRID.shape + (3,)).copy()
    fixed, moving = _pair(shift, seed=1)
    mask = np.zeros(GRID.shape, bool)
    mask[6:-6, :, :] = True
    field = elastix_register_ct(fixed, moving, GRID, iterations=100, resolutions=2, fixed_mask=mask)
    np.testing.assert_allclose(field[mask].mean(axis=0), shift[0, 0, 0], atol=0.5)


@pytest.mark.parametrize("truth", [TRANSLATION, SMOOTH], ids=["translation", "smooth"])
def test_elastix_displacement_distribution_recovers_known_motion(itk, truth):
    from CoRXRegistrationLib.baselines.elastix import elastix_register_ct
    fixed, moving = _pair(truth, seed=2)
    field = elastix_register_ct(fixed, moving, GRID, iterations=200, resolutions=2,
                                step_estimation="DisplacementDistribution")
    _check(field, truth, median_mm=1.0)             # no registration: 7.8 / 6.1 mm


@pytest.mark.parametrize("truth", [TRANSLATION, SMOOTH], ids=["translation", "smooth"])
def test_elastix_ct_plus_spect_recovers_known_motion(itk, truth):
    """Both modalities moved alike (CT texture in HU, a positive SPECT texture): one field recovers it."""
    from CoRXRegistrationLib.baselines.elastix import elastix_register_ct_spect
    fixed_ct, moving_ct = _pair(truth, seed=3)
    fixed_spect, moving_spect = _pair(truth, seed=4, offset=3000.0)
    field = elastix_register_ct_spect(fixed_ct, moving_ct, fixed_spect, moving_spect, GRID, iterations=200,
                                      resolutions=2)
    _check(field, truth, median_mm=1.3)


@pytest.mark.parametrize("truth", [TRANSLATION, SMOOTH], ids=["translation", "smooth"])
def test_ants_syn_recovers_known_motion(truth):
    pytest.importorskip("ants")
    from CoRXRegistrationLib.baselines.ants import ants_register_ct
    fixed, moving = _pair(truth, seed=5, offset=-500.0)
    field = ants_register_ct(fixed, moving, GRID)
    _check(field, truth, median_mm=0.8)


def test_elastix_parameter_maps_are_the_papers_set_up(itk):
    """Affine then B-spline, advanced Mattes MI only (no penalty term evaluated), the iteration budget
    given, elastix's own step-size estimation; the multi-metric maps give each image its own components."""
    from CoRXRegistrationLib.baselines.elastix import CT_SPECT_METRICS, paper_parameter_maps
    params = paper_parameter_maps(itk, iterations=1000, resolutions=4)
    maps = [params.GetParameterMap(i) for i in range(params.GetNumberOfParameterMaps())]
    assert [m["Transform"][0] for m in maps] == ["AffineTransform", "BSplineTransform"]
    for m in maps:
        assert list(m["Metric"]) == ["AdvancedMattesMutualInformation"]
        assert not [k for k in m.keys() if k.startswith("Metric") and k[6:7].isdigit()]
        assert m["MaximumNumberOfIterations"][0] == "1000"
        assert m["NumberOfResolutions"][0] == "4"
        assert m["ASGDParameterEstimationMethod"][0] == "Original"
    multi = paper_parameter_maps(itk, 500, 3, "DisplacementDistribution", CT_SPECT_METRICS, (1.0, 0.5))
    for m in (multi.GetParameterMap(i) for i in range(2)):
        assert m["Registration"][0] == "MultiMetricMultiResolutionRegistration"
        assert list(m["Metric"]) == list(CT_SPECT_METRICS)
        assert [m["Metric0Weight"][0], m["Metric1Weight"][0]] == ["1.0", "0.5"]
        assert all(len(m[k]) == 2 for k in ("FixedImagePyramid", "MovingImagePyramid", "Interpolator", "ImageSampler"))
        assert m["ASGDParameterEstimationMethod"][0] == "DisplacementDistribution"
    with pytest.raises(ValueError, match="step_estimation"):
        paper_parameter_maps(itk, step_estimation="Fast")


def test_itk_threads_are_set_globally(itk):
    """Threads go through ITK's global default (ElastixRegistrationMethod.SetNumberOfThreads crashes
    itk-elastix 0.25); two threads then run a registration."""
    from CoRXRegistrationLib.baselines.elastix import elastix_register_ct, set_threads
    before = set_threads(None)
    try:
        assert set_threads(2) == 2 == itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
        fixed, moving = _pair(TRANSLATION, seed=6)
        field = elastix_register_ct(fixed, moving, GRID, iterations=50, resolutions=2, threads=2)
        assert np.isfinite(field).all()
    finally:
        set_threads(before)


def _shifted(volume, geometry, shift_mm, fill=0.0):
    """``volume`` moved by ``shift_mm`` (LPS): shifted(p + shift) == volume(p)."""
    return resample(volume, geometry, geometry, fill=fill,
                    displacement=np.broadcast_to(-np.asarray(shift_mm, np.float32), geometry.shape + (3,)).copy())


@pytest.fixture(scope="module")
def fixed_session():
    from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series
    return simulate_series(SimulationConfig.preset("small", seed=3, times_h=(4.0, 24.0))).sessions()[0]


@pytest.mark.parametrize("ct_shift", [(0.0, 0.0, 0.0), (4.0, 0.0, -3.0)], ids=["identity-field", "translation-field"])
def test_spect_fit_composes_with_any_ct_driven_field(fixed_session, ct_shift):
    """CoRX's SPECT/CT fit after a CT-driven field: the moving CT moved by ``ct_shift`` (the CT-driven
    field, given), its SPECT by ``ct_shift`` + a known 6 mm: the field the SPECT follows is the CT-driven
    field plus the 6 mm; the CT-driven field passed in is not changed."""
    from CoRXRegistrationLib.engine import fit_spect_to_field
    from CoRXRegistrationLib.preprocess import PreprocessConfig, SpectCt, network_grid
    fixed = fixed_session
    offset = np.array([0.0, 6.0, 0.0], np.float32)          # LPS mm: the moving SPECT 6 mm further posterior
    moving = SpectCt(_shifted(fixed.ct, fixed.ct_geometry, ct_shift, fill=-1000.0), fixed.ct_geometry,
                     _shifted(fixed.spect, fixed.spect_geometry, np.add(ct_shift, offset)), fixed.spect_geometry)
    cfg = PreprocessConfig(grid_size=(48, 48, 48), spacing_mm=8.0)
    grid = network_grid(fixed, cfg)
    field_ct = np.broadcast_to(np.asarray(ct_shift, np.float32), grid.shape + (3,)).copy()
    given = field_ct.copy()
    field_spect, fit, note = fit_spect_to_field(fixed, moving, field_ct, grid, cfg)
    assert fit.applied, note
    assert np.array_equal(field_ct, given)
    uptake = resample(fixed.spect, fixed.spect_geometry, grid) > 0.1 * fixed.spect.max()
    np.testing.assert_allclose(np.median(field_spect[uptake] - field_ct[uptake], axis=0), offset, atol=1.0)


def test_rows_of_a_missing_package_are_left_out_with_the_reason(monkeypatch, tmp_path):
    """Without antspyx (its import fails) the ANTs rows are skipped, named with the reason, in the runner
    and in the report; asking for them explicitly is refused with that reason."""
    from CoRXRegistrationLib.evaluation import MethodRunner
    monkeypatch.setitem(sys.modules, "ants", None)           # import ants -> ImportError
    runner = MethodRunner({"corx": "bundled"})
    skipped = runner.skipped()
    assert "antspyx" in skipped["ants-syn"] and "antspyx" in skipped["ants-syn+fit"]
    assert "ants-syn" not in runner.available() and "rigid" in runner.available()
    from CoRXRegistrationLib.cli import main
    assert main(["evaluate", "--quick", "--out", str(tmp_path / "e"), "--methods", "identity", "ants-syn"]) == 2

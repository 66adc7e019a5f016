"""The Elastix baseline runs the real elastix (itk-elastix wheel) and recovers a known translation."""
import numpy as np
import pytest
from scipy import ndimage

from CoRXRegistrationLib.geometry import Geometry
from CoRXRegistrationLib.resample import resample

pytest.importorskip("itk")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # itk wrapping noise


def test_elastix_adapter_recovers_a_pure_translation_in_lps_mm():
    from CoRXRegistrationLib.baselines.elastix import elastix_register_ct
    c, s = np.cos(0.3), np.sin(0.3)
    g = Geometry((24, 28, 32), (4.0, 3.0, 3.5), (10.0, -20.0, 5.0), np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel())
    rng = np.random.default_rng(0)
    texture_grid = Geometry((52, 60, 68), (2.0, 1.5, 2.0), (-10.0, -40.0, -15.0), g.direction)
    texture = ndimage.gaussian_filter(rng.normal(size=texture_grid.shape), 3).astype(np.float32)
    shift = np.array([6.0, -4.0, 3.0], np.float32)                      # LPS mm
    fixed = resample(texture, texture_grid, g)
    moving = resample(texture, texture_grid, g, displacement=np.broadcast_to(-shift, g.shape + (3,)).copy())
    # moving(p + shift) == fixed(p): the resampling field is +shift everywhere
    field = elastix_register_ct(fixed, moving, g, iterations=100, resolutions=2)
    inner = np.zeros(g.shape, bool)
    inner[5:-5, 5:-5, 5:-5] = True
    np.testing.assert_allclose(field[inner].mean(axis=0), shift, atol=0.5)
    assert np.median(np.linalg.norm(field[inner] - shift, axis=-1)) < 1.0


def test_elastix_adapter_with_a_fixed_mask_on_a_rotated_grid():
    """The mask shares the fixed image's geometry: with the metric sampled only in an inner block
    (as evaluate's "elastix-masked" samples the axial band) the translation is still recovered."""
    from CoRXRegistrationLib.baselines.elastix import elastix_register_ct
    c, s = np.cos(0.3), np.sin(0.3)
    g = Geometry((24, 28, 32), (4.0, 3.0, 3.5), (10.0, -20.0, 5.0), np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel())
    rng = np.random.default_rng(1)
    texture_grid = Geometry((52, 60, 68), (2.0, 1.5, 2.0), (-10.0, -40.0, -15.0), g.direction)
    texture = ndimage.gaussian_filter(rng.normal(size=texture_grid.shape), 3).astype(np.float32)
    shift = np.array([-5.0, 3.0, 4.0], np.float32)
    fixed = resample(texture, texture_grid, g)
    moving = resample(texture, texture_grid, g, displacement=np.broadcast_to(-shift, g.shape + (3,)).copy())
    mask = np.zeros(g.shape, bool)
    mask[6:-6, :, :] = True
    field = elastix_register_ct(fixed, moving, g, iterations=100, resolutions=2, fixed_mask=mask)
    np.testing.assert_allclose(field[mask].mean(axis=0), shift, atol=0.5)


def test_elastix_parameter_maps_are_the_papers_set_up():
    """Affine then B-spline, advanced Mattes MI only (no penalty term evaluated), the iteration budget given."""
    import itk
    from CoRXRegistrationLib.baselines.elastix import paper_parameter_maps
    params = paper_parameter_maps(itk, iterations=1000, resolutions=4)
    maps = [params.GetParameterMap(i) for i in range(params.GetNumberOfParameterMaps())]
    assert [m["Transform"][0] for m in maps] == ["AffineTransform", "BSplineTransform"]
    for m in maps:
        assert list(m["Metric"]) == ["AdvancedMattesMutualInformation"]
        assert not [k for k in m.keys() if k.startswith("Metric") and k[6:7].isdigit()]
        assert m["MaximumNumberOfIterations"][0] == "1000"
        assert m["NumberOfResolutions"][0] == "4"

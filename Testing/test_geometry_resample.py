import numpy as np
import pytest

from CoRXRegistrationLib.geometry import Geometry, GeometryError, lps_to_ras
from CoRXRegistrationLib.imageio import ImageFileError, read_image, write_image
from CoRXRegistrationLib.resample import resample, resample_field, sample_at, sample_vectors, warp_with_field


def oblique():
    c, s = np.cos(0.4), np.sin(0.4)
    d = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return Geometry((20, 24, 28), (1.2, 2.0, 3.3), (-15.0, 40.0, 7.0), d.ravel())


def test_index_lps_round_trip_and_ras():
    g = oblique()
    ijk = np.array([[0, 0, 0], [3.5, 2.0, 7.25], [27, 23, 19]])
    np.testing.assert_allclose(g.lps_to_index(g.index_to_lps(ijk)), ijk, atol=1e-9)
    np.testing.assert_allclose(g.ijk_to_ras[:3, :3] @ [1, 0, 0], [-1.2, 0, 0])  # i runs to patient left
    back = Geometry.from_ijk_to_ras(g.shape, g.ijk_to_ras)
    assert back.same_grid(g)
    assert lps_to_ras([1.0, 2.0, 3.0]).tolist() == [-1.0, -2.0, 3.0]


def test_invalid_geometry_is_refused():
    with pytest.raises(GeometryError):
        Geometry((4, 4, 4), (1.0, 0.0, 1.0), (0, 0, 0))
    with pytest.raises(GeometryError):
        Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0, 0, 0), (1, 1, 0, 0, 1, 0, 0, 0, 1))


def test_identity_field_leaves_image_unchanged(rng):
    g = oblique()
    img = rng.random(g.shape).astype(np.float32)
    out = resample(img, g, g, displacement=np.zeros(g.shape + (3,), np.float32))
    np.testing.assert_allclose(out, img, atol=1e-5)


def test_known_shift_moves_feature_by_the_right_millimetres_in_lps():
    """A blob at LPS p in the moving image appears at p - u in the warped image (resampling convention)."""
    g = oblique()
    pts = g.lps_grid()
    centre = g.centre_lps()
    moving = np.exp(-np.sum((pts - centre) ** 2, axis=-1) / (2 * 6.0 ** 2)).astype(np.float32)
    u = np.array([4.0, -3.0, 5.0], np.float32)  # mm LPS
    warped = resample(moving, g, g, displacement=np.broadcast_to(u, g.shape + (3,)).copy())
    w = warped / warped.sum()
    found = np.tensordot(w, pts, axes=([0, 1, 2], [0, 1, 2]))
    np.testing.assert_allclose(found, centre - u, atol=0.3)


def test_simpleitk_warp_through_a_coarse_field_equals_the_torch_reference(rng):
    """The CT warp of ``register()``: a field on its own coarse oblique grid, interpolated linearly and
    continued by its edge vectors where the target reaches outside it, sampled by SimpleITK, equals the
    same field built densely on the target and sampled with torch's grid_sample (zero padding)."""
    import torch

    source = oblique()
    c, s = np.cos(-0.2), np.sin(-0.2)
    coarse = Geometry((6, 7, 8), (5.0, 6.0, 7.5), (-10.0, 35.0, 0.0),
                      np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).ravel())
    target = Geometry((18, 22, 25), (1.7, 1.9, 2.6), (-20.0, 30.0, -5.0))     # partly outside the coarse grid
    field = rng.normal(0.0, 3.0, coarse.shape + (3,)).astype(np.float32)
    volume = rng.random(source.shape).astype(np.float32) * 100.0
    points = target.lps_grid()
    dense = sample_vectors(field, coarse, points)                          # edge vectors outside
    np.testing.assert_allclose(resample_field(field, coarse, target), dense, atol=1e-4)
    reference = sample_at(torch.from_numpy(volume), source, torch.from_numpy(points + dense), fill=-7.0).numpy()
    warped = warp_with_field(volume, source, target, field, coarse, fill=-7.0)
    np.testing.assert_allclose(warped, reference, atol=2e-3)
    assert np.mean(warped == -7.0) > 0.05 and np.mean(warped != -7.0) > 0.3   # both inside and outside seen
    rounded = np.round(volume).astype(np.int16)
    as_int = warp_with_field(rounded, source, target, field, coarse, fill=-7.0)
    as_float = warp_with_field(rounded.astype(np.float32), source, target, field, coarse, fill=-7.0)
    assert as_int.dtype == np.int16 and np.abs(as_int - as_float).max() <= 0.5 + 1e-3     # rounded, not truncated
    # a float32 field is cast to ITK's float64 inside SimpleITK: the warp of the same field given in float64
    np.testing.assert_array_equal(warp_with_field(volume, source, target, field.astype(np.float64), coarse,
                                                  fill=-7.0), warped)


def test_image_file_round_trip_keeps_geometry(tmp_path, rng):
    g = oblique()
    img = rng.random(g.shape).astype(np.float32)
    for name in ("a.nii.gz", "b.nrrd"):
        write_image(tmp_path / name, img, g)
        back, g2 = read_image(tmp_path / name)
        assert g2.same_grid(g)
        np.testing.assert_array_equal(back, img)


def test_nan_and_corrupt_files_give_clear_errors(tmp_path):
    g = Geometry((3, 3, 3), (1, 1, 1), (0, 0, 0))
    img = np.zeros(g.shape, np.float32)
    img[1, 1, 1] = np.nan
    with pytest.raises(ImageFileError, match="NaN"):
        write_image(tmp_path / "nan.nrrd", img, g)
    import SimpleITK as sitk
    from CoRXRegistrationLib.imageio import to_sitk
    sitk.WriteImage(to_sitk(img, g), str(tmp_path / "nan.nrrd"))  # a file made elsewhere
    with pytest.raises(ImageFileError, match="NaN"):
        read_image(tmp_path / "nan.nrrd")
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ImageFileError, match="cannot be read"):
        read_image(tmp_path / "bad.nii.gz")
    with pytest.raises(ImageFileError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")

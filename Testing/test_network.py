"""CoRX-NET / TransMorph: parameter counts, spatial transformer geometry, metrics, checkpoints."""
import numpy as np
import pytest
import torch

from CoRXRegistrationLib.geometry import Geometry, displacement_lps_to_voxels, displacement_voxels_to_lps
from CoRXRegistrationLib.network import PAPER_PARAMETER_COUNTS, build_network, count_parameters, named_config
from CoRXRegistrationLib.network.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from CoRXRegistrationLib.network.losses import diffusion, registration_loss
from CoRXRegistrationLib.network.metrics import (deformation_rgb, jacobian_determinant, lncc, local_cc_squared,
                                                 nonpositive_jacobian_percent, ssim)
from CoRXRegistrationLib.network.transform import integrate_velocity, warp
from CoRXRegistrationLib.resample import resample

# A grid whose i axis points anterior (-y), j axis left (+x), k axis superior (a 90 degree rotation), anisotropic.
ROTATED = Geometry((20, 24, 28), (2.0, 3.0, 4.0), (10.0, -20.0, 5.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))


def blob(geometry, centre_lps, sigma_mm=9.0):
    p = geometry.lps_grid().astype(np.float64)
    return np.exp(-np.sum((p - np.asarray(centre_lps)) ** 2, axis=-1) / (2 * sigma_mm ** 2)).astype(np.float32)


def centroid_lps(image, geometry):
    p = geometry.lps_grid().astype(np.float64)
    w = image.astype(np.float64)
    return (p * w[..., None]).reshape(-1, 3).sum(0) / w.sum()


@pytest.mark.parametrize("name", ["corx-paper", "corx-paper-nocs", "transmorph-paper"])
def test_paper_parameter_counts(name):
    n = count_parameters(build_network(named_config(name)))
    paper = PAPER_PARAMETER_COUNTS[name]
    if name == "transmorph-paper":
        assert n == paper
    else:
        assert abs(n - paper) / paper < 1e-3


def test_cross_stitch_adds_exactly_28_parameters():
    with_cs = count_parameters(build_network(named_config("corx-paper")))
    without = count_parameters(build_network(named_config("corx-paper-nocs")))
    assert with_cs - without == 28


def test_displacement_unit_conversion_round_trip():
    rng = np.random.default_rng(0)
    u = rng.normal(size=ROTATED.shape + (3,)).astype(np.float32)
    vox = displacement_lps_to_voxels(u, ROTATED)
    np.testing.assert_allclose(displacement_voxels_to_lps(vox, ROTATED), u, atol=1e-5)
    # +6 mm along LPS y (posterior) is -3 voxels along the i axis (3rd channel), which points anterior, 2 mm
    shift = np.zeros(ROTATED.shape + (3,), np.float32)
    shift[..., 1] = 6.0
    vox = displacement_lps_to_voxels(shift, ROTATED)
    np.testing.assert_allclose(vox[:, 0, 0, 0], [0.0, 0.0, -3.0], atol=1e-6)


def test_known_shift_lands_at_the_right_millimetre_in_lps_on_a_rotated_anisotropic_grid():
    centre = ROTATED.centre_lps()
    shift_mm = np.array([7.0, -5.0, 6.0])                   # LPS: 7 mm left, 5 mm anterior, 6 mm superior
    moving = blob(ROTATED, centre + shift_mm)
    field = np.broadcast_to(shift_mm.astype(np.float32), ROTATED.shape + (3,)).copy()
    # resampling convention: warped(p) = moving(p + u(p)) moves the blob back to ``centre``
    warped_native = resample(moving, ROTATED, ROTATED, displacement=field)
    np.testing.assert_allclose(centroid_lps(warped_native, ROTATED), centre, atol=0.3)
    # the network-grid transformer agrees once the field is in voxel units
    vox = torch.from_numpy(displacement_lps_to_voxels(field, ROTATED))[None]
    warped_net = warp(torch.from_numpy(moving)[None, None], vox, padding="zeros")[0, 0].numpy()
    np.testing.assert_allclose(warped_net, warped_native, atol=1e-4)
    # RAS view of the same displacement: x and y negate
    from CoRXRegistrationLib.geometry import lps_to_ras
    np.testing.assert_allclose(lps_to_ras(shift_mm), [-7.0, 5.0, 6.0])


def test_identity_field_leaves_images_and_labels_unchanged():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.random((1, 2, 9, 10, 11)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 5, (1, 1, 9, 10, 11)).astype(np.int64))
    zero = torch.zeros(1, 3, 9, 10, 11)
    torch.testing.assert_close(warp(img, zero), img, atol=1e-6, rtol=0)
    assert torch.equal(warp(labels, zero, mode="nearest"), labels)


def test_the_sampling_grid_without_gradients_is_the_differentiable_one_bit_for_bit():
    """sampling_grid builds its coordinates in place when no gradient is needed; the values are exactly
    those of the differentiable path, for a whole grid and for a block at an origin, float32 and float64."""
    from CoRXRegistrationLib.network.transform import sampling_grid
    rng = np.random.default_rng(5)
    for shape, image_grid, origin in (((9, 10, 11), (9, 10, 11), None), ((4, 6, 5), (13, 7, 27), (3, 1, 20)),
                                      ((1, 5, 7), (1, 5, 7), None)):
        for dtype in (torch.float32, torch.float64):
            u = torch.from_numpy(rng.normal(0.0, 3.0, (2, 3) + shape)).to(dtype)
            in_place = sampling_grid((2, 1) + image_grid, u, origin)
            differentiable = sampling_grid((2, 1) + image_grid, u.clone().requires_grad_(), origin)
            assert differentiable.requires_grad and not in_place.requires_grad and in_place.is_contiguous()
            assert torch.equal(in_place, differentiable.detach()), (shape, dtype)


def test_nearest_warp_moves_labels_by_whole_voxels():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int64)
    labels[0, 0, 4, 4, 4] = 7
    u = torch.zeros(1, 3, 8, 8, 8)
    u[:, 2] = 1.0                                   # sample one voxel further along x
    out = warp(labels, u, mode="nearest", padding="zeros")
    assert out[0, 0, 4, 4, 3] == 7 and int((out == 7).sum()) == 1 and out.dtype == torch.int64


def test_lncc_matches_a_brute_force_computation():
    rng = np.random.default_rng(2)
    a = rng.random((7, 8, 9))
    b = 0.5 * a + rng.random((7, 8, 9))
    w, r = 3, 1
    expected = np.zeros_like(a)
    for z in range(7):
        for y in range(8):
            for x in range(9):
                sa = a[max(z - r, 0):z + r + 1, max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1].ravel()
                sb = b[max(z - r, 0):z + r + 1, max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1].ravel()
                c = np.mean((sa - sa.mean()) * (sb - sb.mean()))
                expected[z, y, x] = c * c / (sa.var() * sb.var() + 1e-5 / w ** 6)
    got = local_cc_squared(torch.from_numpy(a), torch.from_numpy(b), window=w)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    # a linear intensity change is invisible to LNCC
    lin = float(lncc(torch.from_numpy(a), torch.from_numpy(3 * a + 2), window=9))
    assert lin == pytest.approx(1.0, abs=1e-4)


def test_ssim_of_constant_images_matches_the_formula():
    m1, m2 = 0.2, 0.6
    a = torch.full((1, 1, 12, 12, 12), m1, dtype=torch.float64)
    b = torch.full((1, 1, 12, 12, 12), m2, dtype=torch.float64)
    c1 = (0.01) ** 2
    expected = (2 * m1 * m2 + c1) / (m1 ** 2 + m2 ** 2 + c1)
    assert float(ssim(a, b)) == pytest.approx(expected, rel=1e-5)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((1, 1, 16, 16, 16)).astype(np.float32))
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(ssim(x, torch.flip(x, dims=(2,)))) < 0.5


def test_ssim_matches_a_brute_force_gaussian_window_with_and_without_gradients():
    """SSIM matches a brute-force Gaussian-window computation (edges replicated; an axis shorter than the
    window), with and without gradients; batched with the fixed image filtered once it gives the same."""
    from CoRXRegistrationLib.network.metrics import registration_metrics, registration_metrics_of, ssim_against
    rng = np.random.default_rng(4)
    a = rng.random((9, 10, 11))
    b = 0.7 * a + 0.3 * rng.random((9, 10, 11))
    k = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    k /= k.sum()

    def blur(v):
        p = np.pad(v, 5, mode="edge")
        out = np.zeros_like(v)
        for dz in range(11):
            for dy in range(11):
                for dx in range(11):
                    out += k[dz] * k[dy] * k[dx] * p[dz:dz + 9, dy:dy + 10, dx:dx + 11]
        return out
    ma, mb = blur(a), blur(b)
    saa, sbb, sab = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = np.mean((2 * ma * mb + c1) * (2 * sab + c2) / ((ma ** 2 + mb ** 2 + c1) * (saa + sbb + c2)))
    ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    assert float(ssim(ta, tb)) == pytest.approx(expected, rel=1e-6)
    with torch.enable_grad():
        differentiable = ssim(ta.clone().requires_grad_(True), tb)
    assert float(differentiable.detach()) == pytest.approx(expected, rel=1e-6)
    c = torch.from_numpy(rng.random((1, 1, 9, 10, 11)))
    both = ssim_against(ta, [tb, c])
    assert float(both[0]) == pytest.approx(float(ssim(ta, tb)), rel=1e-9)
    assert float(both[1]) == pytest.approx(float(ssim(ta, c)), rel=1e-9)
    u = torch.zeros(1, 3, 9, 10, 11)
    u[0, 2, :, :, 6:] = 0.5
    shared = registration_metrics_of(ta, tb, [(c, c, torch.zeros_like(u)), (tb, ta, u)])
    assert shared[0] == pytest.approx(registration_metrics(ta, c, tb, c, torch.zeros_like(u)), rel=1e-9)
    assert shared[1] == pytest.approx(registration_metrics(ta, tb, tb, ta, u), rel=1e-9)
    assert shared[0]["jacobian_nonpositive_percent"] == 0.0


def test_qa_lncc_one_box_mean_at_a_time_is_the_mean_of_the_lncc_map():
    """The QA metrics' LNCC (one box mean at a time, in place) equals the mean of the batched map the
    SPECT/CT fit uses, flat windows included."""
    from CoRXRegistrationLib.network.metrics import local_cc_squared_against, local_statistics, mean_local_cc_squared
    torch.manual_seed(5)
    for dtype in (torch.float64, torch.float32):
        a = torch.rand(1, 1, 13, 12, 15, dtype=dtype)
        b = 0.6 * a + 0.4 * torch.rand_like(a)
        b[0, 0, :4] = 0.3                                        # flat windows: the clamp and eps matter
        fixed = local_statistics(a)
        expected = float(local_cc_squared_against(fixed, b).mean())
        assert mean_local_cc_squared(fixed, b) == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-6)
        assert 0.1 < expected < 1.0


def test_jacobian_of_affine_fields_and_folding_count():
    z, y, x = torch.meshgrid(*(torch.arange(10.0) for _ in range(3)), indexing="ij")
    a = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.1]])   # p -> A p, channels (z, y, x)
    p = torch.stack([z, y, x])
    u = torch.einsum("ij,jzyx->izyx", a - torch.eye(3), p)[None]
    det = jacobian_determinant(u)
    torch.testing.assert_close(det, torch.full_like(det, float(torch.linalg.det(a))), atol=1e-5, rtol=0)
    assert float(nonpositive_jacobian_percent(u)) == 0.0
    fold = torch.zeros(1, 3, 10, 10, 10)
    fold[0, 2, :, :, 5:] = -3.0                        # x jumps back by 3 voxels: folding at the step
    assert 0 < float(nonpositive_jacobian_percent(fold)) < 100


def test_jacobian_in_slabs_equals_the_whole_volume_at_once():
    u = torch.randn(1, 3, 41, 9, 11, generator=torch.Generator().manual_seed(2))
    whole = jacobian_determinant(u, slab=10 ** 6)
    for slab in (1, 5, 16):
        torch.testing.assert_close(jacobian_determinant(u, slab=slab), whole, rtol=0, atol=0)


def test_scaling_and_squaring_gives_no_folding_where_the_raw_field_folds():
    g = torch.Generator().manual_seed(4)
    v = torch.randn(1, 3, 6, 6, 6, generator=g) * 3.0
    v = torch.nn.functional.interpolate(v, size=(32, 32, 32), mode="trilinear", align_corners=True)
    assert float(nonpositive_jacobian_percent(v)) > 5.0           # used as a displacement it folds
    assert float(nonpositive_jacobian_percent(integrate_velocity(v, 7))) == 0.0


def test_deformation_rgb_is_grey_for_no_motion_and_saturates_at_max():
    u = np.zeros((2, 3, 4, 3), np.float32)
    u[0, 0, 0] = [10.0, -10.0, 0.0]
    rgb = deformation_rgb(u, max_mm=10.0).numpy()
    assert rgb.dtype == np.uint8 and tuple(rgb[1, 1, 1]) == (128, 128, 128)
    assert tuple(rgb[0, 0, 0]) == (255, 0, 128)


def test_loss_is_the_papers_weighted_sum():
    rng = np.random.default_rng(5)
    t = [torch.from_numpy(rng.random((1, 1, 12, 12, 12)).astype(np.float32)) for _ in range(4)]
    u = torch.from_numpy(rng.normal(size=(1, 3, 12, 12, 12)).astype(np.float32))
    total, parts = registration_loss(t[0], t[1], t[2], t[3], u)
    expected = float(torch.mean((t[0] - t[1]) ** 2)) - 0.1 * float(lncc(t[2], t[3])) + 8e-4 * float(diffusion(u))
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"ct_mse", "spect_lncc", "regularisation"}


def test_network_output_shape_and_bad_input():
    net = build_network(named_config("corx-tiny")).eval()
    x = [torch.rand(1, 1, 64, 64, 64) for _ in range(4)]
    with torch.no_grad():
        assert net(*x).shape == (1, 3, 64, 64, 64)
    with pytest.raises(ValueError, match="shape"):
        net(torch.rand(1, 1, 60, 64, 64), *x[1:])
    with pytest.raises(ValueError, match="SPECT"):
        net(x[0], x[1])
    tm = build_network(named_config("transmorph-cpu", image_size=(64, 64, 64))).eval()
    with torch.no_grad():
        assert tm(x[0], x[1]).shape == (1, 3, 64, 64, 64)   # TransMorph sees the CT pair only


def test_diffeomorphic_and_config_errors():
    with pytest.raises(ValueError, match="unknown network configuration"):
        named_config("corx-huge")
    with pytest.raises(ValueError, match="divisible"):
        named_config("corx-tiny", image_size=(60, 64, 64))
    net = build_network(named_config("corx-tiny", diffeomorphic=True))
    with torch.no_grad():
        assert torch.isfinite(net(*[torch.rand(1, 1, 64, 64, 64) for _ in range(4)])).all()


def test_checkpoint_round_trip_half_precision_and_clear_errors(tmp_path):
    net = build_network(named_config("corx-tiny")).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "m.pt", net, {"spect_normalisation": "log"}, half=True)
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["name"] == "corx-tiny"
    loaded, _ = load_checkpoint(path)
    x = [torch.rand(1, 1, 64, 64, 64) for _ in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), net(*x), atol=2e-3, rtol=2e-2)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    raw["config"]["embed_dim"] = 16
    raw["config"]["num_heads"] = [2, 2, 4]
    torch.save(raw, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_fov_masked_loss_does_not_reward_stretching_a_cut_face():
    """Fixed and moving show the same body (no motion), but the moving scan's field of view stops 8
    slices earlier (beyond it: air fill). Unmasked, a field that stretches the moving body over the
    gap scores better than the true zero field; inside both fields of view (overlap_mask) it does not."""
    from CoRXRegistrationLib.network.losses import mse, overlap_mask
    z = torch.arange(48, dtype=torch.float32).view(1, 1, 48, 1, 1).expand(1, 1, 48, 16, 16)
    body = (0.6 + 0.2 * torch.sin(z / 10.0)) * (z < 44)           # body down to slice 43, slow texture
    fixed_fov, moving_fov = (z < 44).float(), (z < 36).float()
    fixed, moving = body * fixed_fov, body * moving_fov               # outside its field of view: air (0)
    zero = torch.zeros(1, 3, 48, 16, 16)
    stretch = zero.clone()
    stretch[:, 0] = z[:, 0] * (35.0 / 43.0) - z[:, 0]                 # samples slice 35/43 z: stretches over the gap
    for u in (zero, stretch):
        assert float(overlap_mask(fixed_fov, moving_fov, u).sum()) > 0
    unmasked = {n: float(mse(fixed, warp(moving, u))) for n, u in (("zero", zero), ("stretch", stretch))}
    masked = {n: float(mse(fixed, warp(moving, u), overlap_mask(fixed_fov, moving_fov, u)))
              for n, u in (("zero", zero), ("stretch", stretch))}
    assert unmasked["stretch"] < unmasked["zero"]                    # the v1 loss rewards the stretch
    assert masked["zero"] == pytest.approx(0.0, abs=1e-10) and masked["stretch"] > 1e-3
    # the mask is not differentiated: no gradient reaches the field through it
    u = stretch.clone().requires_grad_(True)
    assert not overlap_mask(fixed_fov, moving_fov, u).requires_grad


def test_masked_loss_terms_average_over_the_mask_only():
    rng = np.random.default_rng(2)
    t = [torch.from_numpy(rng.random((1, 1, 12, 12, 12)).astype(np.float32)) for _ in range(4)]
    u = torch.zeros(1, 3, 12, 12, 12)
    mask = torch.zeros(1, 1, 12, 12, 12)
    mask[..., 2:9, :, 3:] = 1.0
    total, parts = registration_loss(t[0], t[1], t[2], t[3], u, mask=mask)
    inside = mask[0, 0].bool()
    assert parts["ct_mse"] == pytest.approx(float(((t[0] - t[1])[0, 0][inside] ** 2).mean()), rel=1e-5)
    assert parts["spect_lncc"] == pytest.approx(-float(local_cc_squared(t[2], t[3])[0, 0][inside].mean()), rel=1e-5)
    assert parts["regularisation"] == pytest.approx(float(diffusion(u)))


@pytest.mark.parametrize("shape, channels", [((1, 2, 24, 24, 24), 16), ((1, 16, 16, 16, 16), 16)])
def test_the_inference_convolution_is_the_standard_one(shape, channels):
    from CoRXRegistrationLib.network.layers import Conv3d
    torch.manual_seed(0)
    ours = Conv3d(shape[1], channels, 3, padding=1)
    standard = torch.nn.Conv3d(shape[1], channels, 3, padding=1)
    standard.load_state_dict(ours.state_dict())
    x = torch.rand(shape)
    with torch.no_grad():
        np.testing.assert_allclose(ours(x).numpy(), standard(x).numpy(), atol=1e-5)
    # with gradients the standard path runs, and it trains as one
    x.requires_grad_(True)
    ours(x).square().sum().backward()
    assert x.grad is not None and ours.weight.grad is not None and float(ours.weight.grad.abs().sum()) > 0

"""Rigid CT pre-alignment: recovers a known repositioning; old checkpoints keep running without it."""
import numpy as np
import pytest
import torch

from CoRXRegistrationLib.network.rigid import prealign_moving, rigid_displacement, rigid_prealign, rotation_matrix
from CoRXRegistrationLib.network.transform import warp
from CoRXRegistrationLib.preprocess import PreprocessConfig


def torso(shape=(64, 64, 64)) -> torch.Tensor:
    """A normalised-CT-like torso: soft-tissue ellipse cylinder cut by the field of view in z,
    with an off-centre 'spine' and 'lungs' so that every rotation and translation is observable."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    body = ((y - 32) / 20) ** 2 + ((x - 32) / 26) ** 2 < 1
    ct = np.where(body, 0.5, 0.0)
    spine = ((y - 44) / 4) ** 2 + ((x - 32) / 4) ** 2 < 1
    lungs = [((y - 28) / 9) ** 2 + ((x - c) / 7) ** 2 + ((z - 40) / 14) ** 2 < 1 for c in (20, 44)]
    kidney = ((y - 38) / 4) ** 2 + ((x - 22) / 3) ** 2 + ((z - 18) / 6) ** 2 < 1
    ct = np.where(spine, 0.65, ct)
    for lung in lungs:
        ct = np.where(lung, 0.15, ct)
    ct = np.where(kidney, 0.55, ct)
    return torch.from_numpy(ct.astype(np.float32))[None, None]


def test_rotation_matrix_is_a_rotation():
    r = rotation_matrix(torch.tensor([0.1, -0.2, 0.3]))
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-6)
    assert float(torch.det(r)) == pytest.approx(1.0, abs=1e-6)


def test_rigid_prealign_recovers_a_known_repositioning():
    fixed = torso()
    truth = torch.tensor([0.04, -0.02, 0.03, 3.0, -2.5, 4.0])        # radians, voxels (z, y, x)
    u_true = rigid_displacement(truth, tuple(fixed.shape[2:]))
    # moving(q) such that moving(p + u_true(p)) = fixed(p): sample fixed through the inverse transform
    r = rotation_matrix(truth[:3])
    grid_centre = torch.tensor([31.5, 31.5, 31.5]).view(3, 1)
    p = torch.stack(torch.meshgrid(*(torch.arange(64.0),) * 3, indexing="ij")).reshape(3, -1)
    back = r.T @ (p - grid_centre - truth[3:].view(3, 1)) + grid_centre
    moving = warp(fixed, (back - p).reshape(1, 3, 64, 64, 64))
    u, params = rigid_prealign(fixed, moving, body_level=0.25)
    body = fixed[0, 0] > 0.25
    err = (u - u_true).norm(dim=1)[0][body]
    before = u_true.norm(dim=1)[0][body]
    assert float(before.mean()) > 4.0
    assert float(err.mean()) < 0.5, (params, truth)


def test_prealign_none_is_the_identity():
    fixed, moving = torso(), torso()
    u, mct, msp = prealign_moving("none", fixed, moving, moving, 0.25)
    assert float(u.abs().max()) == 0.0 and mct is moving and msp is moving
    with pytest.raises(ValueError, match="unknown pre-alignment"):
        prealign_moving("affine", fixed, moving, moving, 0.25)


def test_preprocess_prealign_defaults():
    assert PreprocessConfig().prealign == "rigid"
    old = PreprocessConfig().to_dict()
    del old["prealign"]
    assert PreprocessConfig.from_dict(old).prealign == "none"      # models trained before it existed
    assert PreprocessConfig().body_level == pytest.approx(0.25)
    with pytest.raises(ValueError, match="prealign"):
        PreprocessConfig(prealign="affine")


def test_prealign_moving_warps_ct_and_spect_through_the_fitted_transform():
    fixed = torso()
    moving = torch.roll(fixed, shifts=(2, -1, 3), dims=(2, 3, 4))
    spect = torch.rand_like(fixed)
    u, mct, msp = prealign_moving("rigid", fixed, moving, spect, 0.25)
    assert torch.equal(mct, warp(moving, u)) and torch.equal(msp, warp(spect, u))


def test_rigid_sampling_points_are_the_rigid_displacement_in_grid_sample_units():
    from CoRXRegistrationLib.network.rigid import _centred_points, rigid_sampling_points
    from CoRXRegistrationLib.network.transform import voxels_to_sampling
    params, shape = torch.tensor([0.05, -0.03, 0.02, 1.5, -2.0, 0.7]), (24, 20, 16)
    identity = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))
    expected = voxels_to_sampling(identity[None] + rigid_displacement(params, shape), shape)[:, 5:17]
    got = rigid_sampling_points(params, _centred_points(shape, 5, 17, "cpu"), shape).view(1, 12, 20, 16, 3)
    assert torch.allclose(got, expected, atol=1e-6)

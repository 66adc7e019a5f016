"""SPECT/CT offset: the translation of the moving SPECT against its CT-driven field."""
import json

import numpy as np
import pytest
import torch

from CoRXRegistrationLib.engine import FIELD_STEP_MM, register, write_registration
from CoRXRegistrationLib.network import build_network, named_config
from CoRXRegistrationLib.network.checkpoint import save_checkpoint
from CoRXRegistrationLib.network.spect_offset import SpectOffsetConfig, fit_spect_offset, uptake_weight
from CoRXRegistrationLib.network.transform import warp
from CoRXRegistrationLib.preprocess import PreprocessConfig, field_on_native_grid

TINY_PREP = PreprocessConfig(grid_size=(64, 64, 64), spacing_mm=7.74)
SHAPE = (48, 48, 52)
# organ-sized uptake: (centre (z, y, x) voxels, radius voxels, activity at the fixed time point)
UPTAKE = [((24, 26, 20), 7.0, 1.0), ((30, 34, 36), 5.0, 0.6), ((16, 18, 34), 4.0, 0.8), ((36, 20, 26), 6.0, 0.3)]
HALVED = (0.5, 0.5, 0.5, 0.5)                 # every VOI loses half its activity
TRANSLATION_ONLY = SpectOffsetConfig(organ_shift=False)
WASHOUT = (0.45, 0.83, 1.0, 0.4)              # each at its own rate; the third (a tumour) keeps it


def spect(shift=(0.0, 0.0, 0.0), retained=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Smooth uptake blobs on a faint body background, displaced by ``shift`` voxels, each blob's
    activity times ``retained``, max-normalised as the network's inputs are."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    image = np.full(SHAPE, 0.03, np.float32)
    for (centre, radius, activity), kept in zip(UPTAKE, retained):
        r2 = sum((c - (c0 + s)) ** 2 for c, c0, s in zip((z, y, x), centre, shift))
        image += activity * kept * np.exp(-0.5 * r2 / radius ** 2)
    return torch.from_numpy(image / image.max())[None, None]


def test_warp_of_a_block_is_that_block_of_the_whole_warp():
    torch.manual_seed(0)
    image = torch.rand(1, 1, 20, 18, 16)
    u = 1.5 * torch.randn(1, 3, 20, 18, 16)
    block = (slice(None), slice(None), slice(3, 15), slice(2, 11), slice(5, 16))
    np.testing.assert_allclose(warp(image, u[block], origin=(3, 2, 5)), warp(image, u)[block], atol=1e-6)
    with pytest.raises(ValueError, match="does not lie inside"):
        warp(image, u[block], origin=(10, 2, 5))


@pytest.mark.parametrize("ct_field", [(0.0, 0.0, 0.0), (2.0, -1.0, 0.5)])
def test_offset_recovers_a_known_spect_ct_mismatch(ct_field):
    """Moving SPECT = fixed uptake carried by the CT-driven field u plus a mismatch s (resampling
    convention: warped(p) = moving(p + u(p) + t), so the answer is t = s). With the activity halved
    everywhere the fit finds s to a quarter voxel; with washout at a different rate per VOI (what the
    LNCC cannot fully tell from motion) it still removes more than half of the mismatch."""
    mismatch = np.array([1.3, -0.8, 0.6])
    u = torch.tensor(ct_field, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE).contiguous()
    moved = tuple(np.add(ct_field, mismatch))
    halved = fit_spect_offset(spect(), spect(moved, HALVED), u, spacing_mm=4.0, config=TRANSLATION_ONLY)
    assert halved.applied and halved.reason == ""
    assert np.linalg.norm(np.subtract(halved.offset_voxels, mismatch)) < 0.25
    assert halved.lncc_after > halved.lncc_before and halved.evaluations > 1
    washout = fit_spect_offset(spect(), spect(moved, WASHOUT), u, spacing_mm=4.0, config=TRANSLATION_ONLY)
    assert washout.applied
    assert np.linalg.norm(np.subtract(washout.offset_voxels, mismatch)) < 0.5 * np.linalg.norm(mismatch)
    # no mismatch: no offset worth the name
    none = fit_spect_offset(spect(), spect(tuple(ct_field), HALVED), u, spacing_mm=4.0, config=TRANSLATION_ONLY)
    assert np.linalg.norm(none.offset_voxels) < 0.25


def body_and_organs() -> torch.Tensor:
    """The uptake blobs of :func:`spect` inside a body of faint activity (0.12 of the maximum, below the
    uptake level) with soft edges, so the body and the organs can be told apart."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    r = np.sqrt(((z - 24) / 19) ** 2 + ((y - 25) / 17) ** 2 + ((x - 27) / 21) ** 2)
    body = torch.from_numpy(0.12 / (1.0 + np.exp((r - 1.0) / 0.06)))[None, None]
    return torch.maximum(spect(), body)


def test_organ_shift_recovers_organs_sliding_against_the_body():
    """Moving SPECT built from the model itself: the whole image shifted by t and the uptake organs by
    a further w(p) s along z (breathing), w from the fixed SPECT. The fit recovers t and s; the
    translation alone cannot, and it leaves a larger error in the organs."""
    spacing = 4.0
    fixed = body_and_organs()
    t, s_mm = torch.tensor([0.6, -0.5, 0.4]), 6.0                  # voxels (z, y, x); mm along +z
    w = uptake_weight(fixed, SpectOffsetConfig(), spacing)
    v = t.view(1, 3, 1, 1, 1) + w * torch.tensor([s_mm / spacing, 0.0, 0.0]).view(1, 3, 1, 1, 1)
    moving = warp(fixed, -v)                       # moving(p + v(p)) = fixed(p) to first order in grad v
    u = torch.zeros(1, 3, *SHAPE)
    fit = fit_spect_offset(fixed, moving, u, spacing_mm=spacing, cranio_caudal_voxels=(1 / spacing, 0.0, 0.0))
    assert fit.applied and fit.organ_note == "" and fit.lncc_after > fit.lncc_before
    assert fit.organ_shift_mm == pytest.approx(s_mm, abs=1.0)
    assert np.linalg.norm(np.subtract(fit.offset_voxels, t.numpy())) < 0.25
    assert fit.organ_weight.shape == fixed.shape and float(fit.organ_weight.max()) == pytest.approx(1.0)
    alone = fit_spect_offset(fixed, moving, u, spacing_mm=spacing, config=TRANSLATION_ONLY)
    assert alone.organ_weight is None and alone.organ_shift_mm == 0.0
    organs = fixed > SpectOffsetConfig().uptake_level
    found = (torch.tensor(fit.offset_voxels).view(1, 3, 1, 1, 1)           # t + w(p) s c, c = +1 mm along z
             + fit.organ_weight * fit.organ_shift_mm * torch.tensor([1 / spacing, 0.0, 0.0]).view(1, 3, 1, 1, 1))
    error = (found - v).norm(dim=1, keepdim=True)[organs].mean()
    error_alone = (torch.tensor(alone.offset_voxels).view(1, 3, 1, 1, 1) - v).norm(dim=1, keepdim=True)[organs].mean()
    assert error < 0.25 * error_alone
    # an organ shift beyond its limit is dropped and the translation fitted alone, with a note why
    capped = fit_spect_offset(fixed, moving, u, spacing_mm=spacing, cranio_caudal_voxels=(1 / spacing, 0.0, 0.0),
                              config=SpectOffsetConfig(max_organ_shift_mm=2.0))
    assert capped.applied and capped.organ_shift_mm == 0.0 and "exceeds 2 mm" in capped.organ_note
    assert capped.offset_voxels == pytest.approx(alone.offset_voxels)


def test_offset_is_refused_without_uptake_and_beyond_its_limit():
    u = torch.zeros(1, 3, *SHAPE)
    empty = fit_spect_offset(torch.zeros(1, 1, *SHAPE), spect(), u, spacing_mm=4.0)
    assert not empty.applied and empty.offset_voxels == (0.0, 0.0, 0.0) and "no fixed SPECT voxel" in empty.reason
    far = fit_spect_offset(spect(), spect((1.3, -0.8, 0.6), HALVED), u, spacing_mm=4.0,
                           config=SpectOffsetConfig(max_offset_mm=3.0))     # the fit is ~6.5 mm
    assert not far.applied and far.offset_voxels == (0.0, 0.0, 0.0) and "exceeds 3 mm" in far.reason
    with pytest.raises(ValueError, match="one pair at a time"):
        fit_spect_offset(spect().repeat(2, 1, 1, 1, 1), spect().repeat(2, 1, 1, 1, 1),
                         u.repeat(2, 1, 1, 1, 1), spacing_mm=4.0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    corx = save_checkpoint(out / "corx.pt", build_network(named_config("corx-tiny")), TINY_PREP.to_dict())
    ct_only = named_config("corx-tiny", architecture="transmorph", cross_stitch=False)
    transmorph = save_checkpoint(out / "transmorph.pt", build_network(ct_only), TINY_PREP.to_dict())
    return {"corx": corx, "transmorph": transmorph}


def test_register_moves_the_spect_by_the_offset_and_the_ct_without_it(small_series, tiny_models, tmp_path):
    fixed, moving = small_series.sessions()[0], small_series.sessions()[2]
    with_offset = register(fixed, moving, model=tiny_models["corx"], device="cpu")
    without = register(fixed, moving, model=tiny_models["corx"], device="cpu", spect_offset=False)
    offset = with_offset.spect_offset_mm
    assert np.all(without.spect_offset_mm == 0) and "spect_offset" not in without.timings_s
    assert np.isfinite(offset).all() and "spect_offset" in with_offset.timings_s
    assert any(n.startswith("SPECT/CT offset") for n in with_offset.notes)
    # the CT follows the same field either way; the SPECT follows it plus the offset, on every grid
    np.testing.assert_allclose(with_offset.field_network, without.field_network, atol=1e-5)
    np.testing.assert_array_equal(with_offset.warped_ct, without.warped_ct)
    added = np.broadcast_to(offset, with_offset.field_network.shape).copy()
    added[..., 2] += with_offset.spect_organ_shift_mm * with_offset.spect_organ_weight     # along LPS +z
    np.testing.assert_allclose(with_offset.field_network_spect - with_offset.field_network, added, atol=1e-5)
    np.testing.assert_allclose(with_offset.field_spect - without.field_spect,
                               field_on_native_grid(added, with_offset.grid, fixed.spect_geometry),
                               atol=FIELD_STEP_MM + 1e-3)       # each field stored to the nearest FIELD_STEP_MM / 2
    w = with_offset.spect_organ_weight
    assert w.shape == with_offset.grid.shape and 0.0 <= w.min() and w.max() == pytest.approx(1.0)
    assert without.spect_organ_weight is None and without.spect_organ_shift_mm == 0.0
    translation = register(fixed, moving, model=tiny_models["corx"], device="cpu", native_outputs=False,
                           qa_metrics=False, spect_offset_config=TRANSLATION_ONLY)
    assert translation.spect_organ_weight is None and translation.spect_organ_shift_mm == 0.0
    np.testing.assert_allclose(translation.field_network_spect - translation.field_network,
                               np.broadcast_to(translation.spect_offset_mm, added.shape), atol=1e-5)
    assert with_offset.metrics["registered"]["ct_ssim"] == pytest.approx(without.metrics["registered"]["ct_ssim"])
    summary = json.loads(open(write_registration(with_offset, tmp_path / "reg")["metrics"]).read())
    np.testing.assert_allclose(summary["spect_offset_mm_lps"], offset, atol=1e-3)
    assert summary["spect_organ_shift_mm_superior"] == pytest.approx(with_offset.spect_organ_shift_mm, abs=1e-3)


def test_ct_only_model_fits_no_offset_and_refuses_to_be_asked(small_series, tiny_models):
    fixed, moving = small_series.sessions()[0], small_series.sessions()[1]
    result = register(fixed, moving, model=tiny_models["transmorph"], device="cpu", native_outputs=False,
                      qa_metrics=False)
    assert np.all(result.spect_offset_mm == 0)
    with pytest.raises(ValueError, match="CT-only"):
        register(fixed, moving, model=tiny_models["transmorph"], device="cpu", spect_offset=True)

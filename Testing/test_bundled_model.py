"""The bundled CoRX model: loads weights-only, its card matches its weights, it beats identity; the supervised
model: its card matches, its network alone beats its rigid stage."""
import json

import numpy as np
import pytest
import torch

from CoRXRegistrationLib.engine import BUNDLED_MODEL, load_model, register
from CoRXRegistrationLib.evaluation import displacement_error_mm
from CoRXRegistrationLib.network import count_parameters
from CoRXRegistrationLib.network.checkpoint import file_sha256

CARD = BUNDLED_MODEL.with_suffix(".json")


def test_bundled_model_loads_weights_only_and_matches_its_card():
    payload = torch.load(BUNDLED_MODEL, map_location="cpu", weights_only=True)
    card = json.loads(CARD.read_text())
    model = load_model("bundled")
    assert card["sha256"] == file_sha256(BUNDLED_MODEL)
    assert card["parameters"] == count_parameters(model.network)
    assert card["config"] == payload["config"] == model.network.config.to_dict()
    assert card["preprocess"] == payload["preprocess"]
    assert BUNDLED_MODEL.stat().st_size < 8 * 2 ** 20            # "a few MB"
    assert (BUNDLED_MODEL.with_suffix(".md")).read_text().count(card["sha256"]) == 1


def test_bundled_model_beats_identity_on_a_simulated_pair(small_series):
    """Seed 11 is not a training seed (100-127). Displacement error against the true field."""
    s = small_series
    sessions = s.sessions()
    body = s.labels_spect > 0
    improvements = []
    for moving in (1, 3):
        result = register(sessions[0], sessions[moving], model="bundled", device="cpu")
        truth = s.truth_field_spect[moving]
        corx = displacement_error_mm(result.field_spect, truth, body)["mean_mm"]
        identity = displacement_error_mm(np.zeros_like(truth), truth, body)["mean_mm"]
        improvements.append(corx / identity)
        assert result.metrics["registered"]["spect_lncc"] > result.metrics["identity"]["spect_lncc"]
        assert result.metrics["registered"]["jacobian_nonpositive_percent"] < 0.05     # the folding target
    assert max(improvements) < 0.75, improvements


SUPERVISED = BUNDLED_MODEL.parents[3] / "training_checkpoints" / "models" / "corx-cpu-supervised.pt"


def test_supervised_model_loads_weights_only_and_matches_its_card():
    payload = torch.load(SUPERVISED, map_location="cpu", weights_only=True)
    card = json.loads(SUPERVISED.with_suffix(".json").read_text())
    model = load_model(SUPERVISED)
    assert card["sha256"] == file_sha256(SUPERVISED)
    assert card["config"] == payload["config"] == model.network.config.to_dict()
    assert card["config"]["spect_correction"] and card["training"]["train_config"]["loss"] == "supervised"
    assert card["training"]["recipe"] == "scripts/train_supervised_model.sh"


@pytest.fixture(scope="module")
def clinical_series():
    """A clinical-size series of a seed no model was trained or evaluated on (training 100-127 and 200-239,
    evaluation >= 5000, demo 1001)."""
    from CoRXRegistrationLib.simulation import SimulationConfig, simulate_series
    return simulate_series(SimulationConfig.preset("clinical", seed=1013))


def test_supervised_network_alone_beats_its_rigid_stage_on_a_simulated_series(clinical_series):
    """The network's own CT field (no SPECT/CT fit) against its rigid pre-alignment, both against the true
    CT field, in the liver, spleen and kidneys, over the series' three pairs."""
    from CoRXRegistrationLib.geometry import displacement_voxels_to_lps
    from CoRXRegistrationLib.network.rigid import rigid_prealign
    from CoRXRegistrationLib.preprocess import network_grid, normalise_ct, onto_grid
    from CoRXRegistrationLib.resample import resample_field
    s, model = clinical_series, load_model(SUPERVISED)
    sessions = s.sessions()
    organs = np.isin(s.labels_spect, [4, 5, 6, 7, 8, 9])
    grid = network_grid(sessions[0], model.preprocess)
    fixed_ct = torch.from_numpy(normalise_ct(onto_grid(sessions[0], grid, model.preprocess)[0], model.preprocess))
    ratios = []
    for moving in (1, 2, 3):
        result = register(sessions[0], sessions[moving], model=model, device="cpu", spect_offset=False,
                          native_outputs=False, qa_metrics=False)
        moving_ct = torch.from_numpy(normalise_ct(onto_grid(sessions[moving], grid, model.preprocess)[0],
                                                  model.preprocess))
        rigid, _ = rigid_prealign(fixed_ct[None, None], moving_ct[None, None], model.preprocess.body_level)
        rigid_mm = displacement_voxels_to_lps(rigid[0].numpy(), grid)
        truth = s.truth_field_ct[moving]
        on_spect = [resample_field(f, grid, s.reference_spect_geometry) for f in (result.field_network, rigid_mm)]
        net, rig = (displacement_error_mm(f, truth, organs)["mean_mm"] for f in on_spect)
        ratios.append(net / rig)
    # measured 0.966 / 0.924 / 0.972; the unsupervised bundled v3 gives 1.047 / 0.858 / 1.065 (worse than rigid on
    # two pairs). The margin is small: the evaluation's 24 pairs give organs -7.5 % (docs/training.md)
    assert max(ratios) < 0.99 and np.mean(ratios) < 0.97, ratios

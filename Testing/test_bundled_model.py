"""The bundled CoRX model: loads weights-only, its card matches its weights, it beats identity."""
import json

import numpy as np
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

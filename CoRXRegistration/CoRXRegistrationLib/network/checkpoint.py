"""Checkpoints: weights plus the network and preprocessing configuration, loadable with
``torch.load(..., weights_only=True)`` (plain dicts, lists, numbers, strings and tensors only)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import NetworkConfig
from .networks import RegistrationNetwork, build_network

FORMAT = "corx-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its configuration."""


def save_checkpoint(path, model: RegistrationNetwork, preprocess: dict, meta: dict | None = None,
                    half: bool = False, extra: dict | None = None) -> Path:
    """Write ``model`` with its config. ``half`` stores float tensors as float16 (loaded back as float32).
    ``extra`` holds training state (optimiser, RNG, step) for resuming; it must be weights_only-safe."""
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "config": model.config.to_dict(), "preprocess": dict(preprocess),
               "meta": dict(meta or {}), "state_dict": state}
    if extra:
        payload["training"] = extra
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(payload, tmp)
    tmp.replace(path)              # never leaves a half-written checkpoint under the real name
    return path


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, checked for format. Raises CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled code objects...
        raise CheckpointError(f"{path} is not a readable CoRX checkpoint (corrupt, truncated or not "
                              f"weights-only): {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a CoRX checkpoint (expected format {FORMAT!r})")
    for key in ("config", "preprocess", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks '{key}'")
    return payload


def load_checkpoint(path, device="cpu"):
    """Build the network from the stored config and load its weights. Returns (model, payload)."""
    payload = read_checkpoint(path)
    try:
        cfg = NetworkConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid network configuration: {exc}") from None
    model = build_network(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} "
                         f"vs {tuple(expected[wrong[0]].shape)})")
        raise CheckpointError(f"{path}: weights do not match configuration {cfg.name!r}: " + "; ".join(parts))
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} has NaN or infinite values")
    model.load_state_dict(state)
    return model.to(device).eval(), payload


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""Supervised training from the simulator's truth: the true CT and SPECT fields of any ordered pair of
a packed patient, the voxels where their error counts, and the endpoint-error loss.

Packed truth fields map the reference time point to each time point (``training.data``). For a pair
whose fixed time point f is not the reference, the fixed image at p shows the reference at
p + inv_f(p), hence the moving image at that point moved by the moving time point's field:
u_fm = compose(inv_f, u_m), with inv_f the inverse of f's field (fixed-point iteration; the
simulated motions are invertible by construction). Displacements are (B, 3, Z, Y, X) network voxels,
channels (z, y, x), resampling convention, as everywhere on the network grid.
"""
from __future__ import annotations

import numpy as np
import torch

from ..network.transform import compose, warp
from ..simulation.anatomy import ORGAN_VOIS, TUMOUR_BASE

#: Truth keys of a packed patient: the field the CT follows and the one the SPECT follows.
TRUTH_KEYS = {"ct": "truth_displacement_ct", "spect": "truth_displacement"}


def invert_displacement(displacement: torch.Tensor, iterations: int = 30, tol_voxels: float = 1e-3) -> torch.Tensor:
    """w with p + w(p) = q where q + u(q) = p, by the fixed-point iteration w = -u(p + w)."""
    w = -displacement
    for _ in range(iterations):
        new = -warp(displacement, w, padding="border")
        change = float((new - w).abs().max())
        w = new
        if change < tol_voxels:
            break
    return w


def has_truth(patient: dict) -> bool:
    return all(k in patient for k in TRUTH_KEYS.values())


def pair_truth(patient: dict, fixed: int, moving: int, device="cpu") -> tuple:
    """(CT truth, SPECT truth, labels in the fixed frame (1, 1, Z, Y, X) float) for one ordered pair."""
    if not has_truth(patient):
        raise ValueError(f"{patient.get('patient_id', 'patient')}: no CT and SPECT truth fields stored (user data, "
                         "or packed before the CT truth was stored); supervised training needs simulated patients "
                         "packed by this version of prepare-data")
    ref = int(patient["reference_index"])
    labels = patient["labels"].to(device).float()[None, None] if "labels" in patient else None
    out = []
    for key in ("ct", "spect"):
        fields = patient[TRUTH_KEYS[key]]
        to_moving = fields[moving].to(device).float()[None]
        if fixed == ref:
            out.append(to_moving)
            continue
        inverse = invert_displacement(fields[fixed].to(device).float()[None])
        out.append(compose(inverse, to_moving))
        if key == "ct" and labels is not None:
            labels = warp(labels, inverse, mode="nearest", padding="zeros")
    return out[0], out[1], labels


#: Tissue labels of the organ VOIs the simulator and the evaluation report (liver, spleen, kidneys, bladder).
ORGAN_LABELS = tuple(sorted({c for codes in ORGAN_VOIS.values() for c in codes}))


def uptake_tissue(labels: torch.Tensor) -> torch.Tensor:
    """1 in the organ VOIs (:data:`simulation.anatomy.ORGAN_VOIS`) and tumours, the VOIs a dose is reported
    for, else 0."""
    organs = torch.isin(labels, torch.tensor(ORGAN_LABELS, dtype=labels.dtype, device=labels.device))
    return (organs | (labels >= TUMOUR_BASE)).float()


def error_weights(fixed_ct: torch.Tensor, uptake: torch.Tensor | None, body_level: float,
                  organ_weight: float) -> torch.Tensor:
    """Where the endpoint error counts (B, 1, Z, Y, X): 1 in the body (normalised fixed CT above
    ``body_level``), 1 + ``organ_weight`` where ``uptake`` (:func:`uptake_tissue`, possibly resampled) is 1."""
    body = (fixed_ct > body_level).float()
    if uptake is None or organ_weight == 0.0:
        return body
    return body * (1.0 + organ_weight * uptake)


def endpoint_error_mm(displacement: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor,
                      spacing_mm: float) -> torch.Tensor:
    """Weighted mean endpoint error |displacement - truth| in mm (isotropic grid of ``spacing_mm``)."""
    err = (displacement - truth).square().sum(dim=1, keepdim=True).add(1e-12).sqrt()
    return (err * weights).sum() / weights.sum().clamp_min(1.0) * spacing_mm


def randomise_intensity(images: list, rng: np.random.Generator) -> list:
    """[fixed CT, moving CT, fixed SPECT, moving SPECT] (normalised to about [0, 1]) with each image's
    contrast, brightness and noise drawn at random: CT a*x + b (a 0.9-1.1, b +-0.03), SPECT x**gamma
    (gamma 0.8-1.25), Gaussian noise of SD 0-0.02 on each; a seeded generator, so runs resume exactly."""
    out = []
    for k, im in enumerate(images):
        if k < 2:
            im = im * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.03, 0.03))
        else:
            im = im.clamp_min(0.0) ** float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        sd = float(rng.uniform(0.0, 0.02))
        if sd > 0:
            gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2 ** 31)))
            im = im + sd * torch.randn(im.shape, generator=gen).to(im.device)
        out.append(im)
    return out

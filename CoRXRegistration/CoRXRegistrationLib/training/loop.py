"""The resumable, deterministic training loop (single process or torch DDP): unsupervised (the paper's
loss), supervised from the simulator's truth fields (:mod:`training.supervision`), or both.

Data: every ordered (fixed, moving) pair of time points within each training patient; the
validation patients are held out whole. Randomness (pair order, augmentation) is drawn from
``numpy.random.default_rng([seed, epoch, position])``, so a run resumed from a checkpoint
takes exactly the steps the uninterrupted run would have taken. Under ``torchrun`` each rank
takes every WORLD_SIZE-th pair and DistributedDataParallel averages the gradients (gloo on CPU,
NCCL on GPU); rank 0 validates, logs and writes checkpoints.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..network.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from ..network.config import named_config
from ..network.losses import LossWeights, diffusion, overlap_mask, registration_loss
from ..network.metrics import registration_metrics
from ..network.networks import build_network, count_parameters
from ..network.rigid import prealign_moving
from ..network.transform import compose, warp
from ..preprocess import METRIC_NORMALISATION, PreprocessConfig, normalise_spect
from .augment import apply_augmentation, augment_displacement, sample_augmentation
from .data import load_patient, ordered_pairs, session_field_of_view, session_tensors
from .supervision import endpoint_error_mm, error_weights, has_truth, pair_truth, randomise_intensity, uptake_tissue

#: What the loss learns from: the paper's image loss, the truth fields of simulated patients, or both.
LOSSES = ("unsupervised", "supervised", "both")


@dataclass
class TrainConfig:
    """A training run. ``network`` names a configuration; ``network_overrides`` changes fields of it.
    ``prealign``: "rigid" fits each moving CT rigidly to its fixed CT before the network (stored in
    the model, applied again at inference); ``init``: a model or checkpoint whose weights start
    the run (fine-tuning) instead of the seeded random initialisation. ``loss``: "unsupervised" (the
    paper's), "supervised" (endpoint error against the truth fields, body weight 1 and uptake organs and
    tumours 1 + ``organ_weight``, the SPECT field's error times ``lambda_spect_field``, plus
    ``lambda_reg`` x diffusion) or "both" (the sum, the paper's image terms times ``lambda_image``: the
    endpoint error is in mm, the image terms near 0.01, so at 1 they barely count; the diffusion once);
    ``randomise_intensity``: each image's contrast, brightness and noise drawn at random per step."""
    data: str = ""
    out: str = "training_run"
    network: str = "corx-cpu"
    network_overrides: dict = field(default_factory=dict)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lambda_spect: float = 0.1
    lambda_reg: float = 8e-4
    val_patients: int = 1
    seed: int = 0
    augment: bool = True
    max_rotation_deg: float = 5.0
    checkpoint_every: int = 25
    max_minutes: float | None = None
    max_steps: int | None = None
    epoch_steps: int | None = None  # optimiser steps per epoch (default: every training pair once per epoch)
    prealign: str = "rigid"
    init: str | None = None
    loss_mask: str = "fov"          # "fov": image terms inside both fields of view; "none": everywhere (v1)
    loss: str = "unsupervised"
    organ_weight: float = 3.0
    lambda_spect_field: float = 1.0
    randomise_intensity: bool = False
    lambda_image: float = 1.0       # "both": weight of the paper's image terms (MSE(CT) + lambda_spect LNCC)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        known = {f.name for f in fields(TrainConfig)}
        d = {"loss_mask": "none", **d}                # stored before the option existed: trained unmasked
        return TrainConfig(**{k: v for k, v in d.items() if k in known})


# What defines a run: resuming with any of these changed would mix two trainings under one label.
RUN_DEFINING = ("data", "network", "network_overrides", "lr", "weight_decay", "lambda_spect", "lambda_reg",
                "val_patients", "seed", "augment", "max_rotation_deg", "epoch_steps", "prealign", "init", "loss_mask",
                "loss", "organ_weight", "lambda_spect_field", "randomise_intensity", "lambda_image")


def resume_conflicts(stored: dict, cfg: TrainConfig) -> list:
    """'key: stored -> now' for every run-defining setting that differs from the checkpoint's."""
    now = cfg.to_dict()
    out = []
    for key in RUN_DEFINING:
        if key not in stored:
            continue
        a, b = stored[key], now[key]
        if key in ("data", "init") and a and b:
            a, b = str(Path(a).resolve()), str(Path(b).resolve())
        if a != b:
            out.append(f"{key}: {stored[key]!r} -> {now[key]!r}")
    return out


class _InterruptFlag:
    """Ctrl-C (SIGINT) during training sets this flag; the loop saves last.pt after the step under way
    and stops. A second Ctrl-C interrupts at once. Only in the main thread (signals live there)."""

    def __init__(self):
        self.count = 0
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt

    def __bool__(self):
        return self.count > 0

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _patient_files(data_dir) -> list:
    files = sorted(Path(data_dir).glob("*.pt"))
    if len(files) < 2:
        raise ValueError(f"{data_dir}: need at least 2 patient files (*.pt) to hold one out for validation, "
                         f"found {len(files)}; run 'corx prepare-data' first")
    return files


def split_patients(files: list, n_val: int) -> tuple:
    """Last ``n_val`` patients (sorted by file name) validate; the rest train."""
    n_val = min(max(int(n_val), 1), len(files) - 1)
    return files[:-n_val], files[-n_val:]


class PatientCache:
    def __init__(self):
        self._cache = {}

    def __call__(self, path) -> dict:
        key = str(path)
        if key not in self._cache:
            self._cache[key] = load_patient(path)
        return self._cache[key]


def pair_batch(patient: dict, fixed: int, moving: int, cfg: PreprocessConfig, device) -> tuple:
    """([fixed CT, moving CT, fixed SPECT, moving SPECT] with the moving pair pre-aligned as
    ``cfg.prealign`` says, pre-alignment displacement (1, 3, Z, Y, X) voxels)."""
    fct, fsp = (t.to(device) for t in session_tensors(patient, fixed, cfg))
    mct, msp = (t.to(device) for t in session_tensors(patient, moving, cfg))
    initial, mct, msp = prealign_moving(cfg.prealign, fct, mct, msp, cfg.body_level)
    return [fct, mct, fsp, msp], initial


def pair_fields_of_view(patient: dict, fixed: int, moving: int, initial: torch.Tensor, device) -> list:
    """[fixed field of view, moving field of view resampled through the pre-alignment ``initial``]."""
    fixed_fov = session_field_of_view(patient, fixed).to(device)
    moving_fov = warp(session_field_of_view(patient, moving).to(device), initial, padding="zeros")
    return [fixed_fov, moving_fov]


def pair_loss(network, batch: list, fovs: list | None, weights: LossWeights, with_spect: bool = False) -> tuple:
    """(own field, loss, parts) of the network on a pre-aligned batch; ``fovs``: count the image terms
    only where both scans hold data (:func:`losses.overlap_mask`), None: everywhere. With ``with_spect``
    the own field is (CT field, SPECT field) and the SPECT is warped by the SPECT field."""
    fct, mct, fsp, msp = batch
    own = network(fct, mct, fsp, msp, with_spect=True) if with_spect else network(fct, mct, fsp, msp)
    own_ct, own_spect = own if with_spect else (own, own)
    mask = None if fovs is None else overlap_mask(fovs[0], fovs[1], own_ct)
    loss, parts = registration_loss(fct, warp(mct, own_ct), fsp, warp(msp, own_spect), own_ct, weights, mask)
    return own, loss, parts


def truth_loss(displacements: tuple, truths: tuple, weight_map: torch.Tensor, spacing_mm: float,
               lambda_spect_field: float) -> tuple:
    """(weighted endpoint error of the CT field + ``lambda_spect_field`` x that of the SPECT field (mm),
    parts): the supervised loss of one pair, its fields composed with the pre-alignment."""
    ct = endpoint_error_mm(displacements[0], truths[0], weight_map, spacing_mm)
    spect = endpoint_error_mm(displacements[1], truths[1], weight_map, spacing_mm)
    return ct + lambda_spect_field * spect, {"truth_ct_mm": float(ct.detach()), "truth_spect_mm": float(spect.detach())}


def supervised_step_loss(model, patient: dict, fixed: int, moving: int, prep: PreprocessConfig, cfg: "TrainConfig",
                         weights: LossWeights, rng: np.random.Generator | None, device) -> tuple:
    """(loss, parts) of one training step with the truth (``cfg.loss`` "supervised" or "both"): the raw
    pair and its truth fields augmented together (``rng``; None: as stored), the moving pair pre-aligned in
    the augmented frame, the network's CT and SPECT fields composed with the pre-alignment and compared
    with the truth; "both" adds the paper's image loss of the pre-aligned pair."""
    fct, fsp = (t.to(device) for t in session_tensors(patient, fixed, prep))
    mct, msp = (t.to(device) for t in session_tensors(patient, moving, prep))
    truth_ct, truth_spect, labels = pair_truth(patient, fixed, moving, device)
    organs = uptake_tissue(labels) if labels is not None else torch.zeros_like(fct)
    images = [fct, mct, fsp, msp]
    fovs = pair_fields_of_view(patient, fixed, moving, torch.zeros_like(truth_ct), device) \
        if cfg.loss == "both" and cfg.loss_mask == "fov" else []
    if rng is not None and cfg.augment:
        aug = sample_augmentation(rng, cfg.max_rotation_deg)
        moved = apply_augmentation(images + fovs + [organs], aug)
        images, fovs, organs = moved[:4], moved[4:-1], moved[-1]
        truth_ct, truth_spect = augment_displacement(truth_ct, aug), augment_displacement(truth_spect, aug)
    if rng is not None and cfg.randomise_intensity:
        images = randomise_intensity(images, rng)
    fct, mct, fsp, msp = images
    initial, mct_pre, msp_pre = prealign_moving(prep.prealign, fct, mct, msp, prep.body_level)
    own, image_loss, parts = pair_loss(model, [fct, mct_pre, fsp, msp_pre],
                                       [fovs[0], warp(fovs[1], initial, padding="zeros")] if fovs else None,
                                       weights, with_spect=True)
    disps = tuple(compose(o, initial) for o in own)
    weight_map = error_weights(fct, organs, prep.body_level, cfg.organ_weight)
    spacing = float(patient["grid"]["spacing_xyz_mm"][0])
    loss, truth_parts = truth_loss(disps, (truth_ct, truth_spect), weight_map, spacing, cfg.lambda_spect_field)
    if cfg.loss == "supervised":
        reg = diffusion(own[0])
        return loss + weights.regularisation * reg, {**truth_parts, "regularisation": float(reg.detach())}
    if cfg.lambda_image == 1.0:
        return loss + image_loss, {**truth_parts, **parts}
    smoothness = weights.regularisation * diffusion(own[0])
    return loss + cfg.lambda_image * (image_loss - smoothness) + smoothness, {**truth_parts, **parts}


def evaluate_pair(network, patient: dict, fixed: int, moving: int, cfg: PreprocessConfig,
                  weights: LossWeights, device="cpu", loss_mask: str = "none", organ_weight: float = 3.0,
                  lambda_spect_field: float = 1.0) -> dict:
    """Loss, the paper's metrics and (where the truth is stored) displacement error in mm for one pair;
    with CT and SPECT truth also ``truth_loss`` (the supervised loss, :func:`truth_loss`) and the
    endpoint errors of the CT and SPECT fields and of the pre-alignment alone, in the body and in the
    uptake organs and tumours."""
    batch, initial = pair_batch(patient, fixed, moving, cfg, device)
    fct = batch[0]
    fovs = pair_fields_of_view(patient, fixed, moving, initial, device) if loss_mask == "fov" else None
    with torch.no_grad():
        (own, own_spect), loss, parts = pair_loss(network, batch, fovs, weights, with_spect=True)
        disp = compose(own, initial)
        mct = session_tensors(patient, moving, cfg)[0].to(device)
        unit = [torch.from_numpy(normalise_spect(patient["spect_unit"][i].float().numpy(),
                                                 METRIC_NORMALISATION))[None, None].to(device) for i in (fixed, moving)]
        out = {"loss": float(loss), **parts,
               **registration_metrics(fct, warp(mct, disp), unit[0], warp(unit[1], disp), disp)}
        ref = patient["reference_index"]
        if "truth_displacement" in patient and fixed == ref:
            spacing = float(patient["grid"]["spacing_xyz_mm"][0])
            truth = patient["truth_displacement"][moving].float().to(device)[None]
            err = (disp - truth).norm(dim=1)[0] * spacing
            body = fct[0, 0] > 0.25
            out["displacement_error_body_mm"] = float(err[body].mean())
            if "labels" in patient:
                organs = patient["labels"].to(device) > 0
                out["displacement_error_labels_mm"] = float(err[organs & body].mean()) if (organs & body).any() \
                    else float("nan")
            identity_err = truth[0].norm(dim=0) * spacing
            out["identity_error_body_mm"] = float(identity_err[body].mean())
        if has_truth(patient):
            truths = pair_truth(patient, fixed, moving, device)
            spacing = float(patient["grid"]["spacing_xyz_mm"][0])
            tissue = uptake_tissue(truths[2]) if truths[2] is not None else None
            body = error_weights(fct, None, cfg.body_level, 0.0)
            weight_map = error_weights(fct, tissue, cfg.body_level, organ_weight)
            uptake = body if tissue is None else body * tissue
            disps = (disp, compose(own_spect, initial))
            out["truth_loss"] = float(truth_loss(disps, truths[:2], weight_map, spacing, lambda_spect_field)[0])
            for name, d, t in (("ct", disps[0], truths[0]), ("spect", disps[1], truths[1]),
                               ("rigid_ct", initial, truths[0]), ("rigid_spect", initial, truths[1])):
                out[f"epe_{name}_body_mm"] = float(endpoint_error_mm(d, t, body, spacing))
                out[f"epe_{name}_uptake_mm"] = float(endpoint_error_mm(d, t, uptake, spacing))
    return out


def validate(network, files: list, cache: PatientCache, cfg: PreprocessConfig, weights: LossWeights,
             device="cpu", loss_mask: str = "none", organ_weight: float = 3.0, lambda_spect_field: float = 1.0) -> dict:
    """Mean of :func:`evaluate_pair` over the reference-fixed pairs of every validation patient."""
    network.eval()
    rows = []
    for f in files:
        p = cache(f)
        ref = p["reference_index"]
        rows += [evaluate_pair(network, p, ref, m, cfg, weights, device, loss_mask, organ_weight, lambda_spect_field)
                 for m in range(len(p["hours"])) if m != ref]
    network.train()
    keys = rows[0].keys()
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}


def _distributed() -> tuple:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def training_pairs(train_files: list, cache) -> list:
    """(patient index, fixed, moving) of every ordered pair of time points of every training patient."""
    return [(fi, f, m) for fi, path in enumerate(train_files) for f, m in ordered_pairs(len(cache(path)["hours"]))]


def epoch_order(seed: int, epoch: int, n_pairs: int) -> np.ndarray:
    """The order in which an epoch visits the training pairs (the same for a seed on every machine)."""
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)


def step_draws(seed: int, epoch: int, position: int, rank: int = 0) -> np.random.Generator:
    """The random draws (augmentation, intensities) of the step at ``position`` of an epoch."""
    return np.random.default_rng([seed, epoch, position, rank])


def train(cfg: TrainConfig, resume: bool = True, log=print, progress=None) -> dict:
    """Run (or resume) training; returns {"checkpoint": path, "history": [...], "stopped": reason}."""
    world, rank = _distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    out = Path(cfg.out)
    last_path = out / "last.pt"
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    net_cfg = named_config(cfg.network, **cfg.network_overrides)   # a bad configuration fails before any work
    files = _patient_files(cfg.data)
    train_files, val_files = split_patients(files, cfg.val_patients)
    cache = PatientCache()
    if cfg.loss != "unsupervised":
        without = [f.name for f in files if not has_truth(cache(f))]
        if without:
            raise ValueError(f"--loss {cfg.loss} needs the CT and SPECT truth of simulated patients; "
                             f"{', '.join(without[:5])} hold none (pack them with this version's prepare-data)")
    prep = replace(PreprocessConfig.from_dict(cache(train_files[0])["preprocess"]), prealign=cfg.prealign)
    weights = LossWeights(cfg.lambda_spect, cfg.lambda_reg)

    torch.manual_seed(cfg.seed)                       # initial weights are part of "deterministic for a seed"
    network = build_network(net_cfg)
    if cfg.init:                                      # same layers required; flags such as diffeomorphic may differ
        initial, _ = load_checkpoint(cfg.init)
        try:                                          # a SPECT correction head may be new: it starts at zero
            missing, unexpected = network.load_state_dict(initial.state_dict(), strict=False)
            if unexpected or any(not k.startswith("spect_head.") for k in missing):
                raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
        except RuntimeError as exc:
            raise ValueError(f"--init {cfg.init}: its {initial.config.name} weights do not fit {net_cfg.name}: "
                             f"{str(exc).splitlines()[0]}") from None
    start = {"epoch": 0, "position": 0, "step": 0, "history": [], "best": None, "elapsed_s": 0.0}
    opt_state = None
    if resume and last_path.is_file():
        payload = read_checkpoint(last_path)
        network, _ = load_checkpoint(last_path)
        if payload["config"] != net_cfg.to_dict():
            raise ValueError(f"{last_path} was trained with another network configuration; use a new --out")
        stored = payload.get("meta", {}).get("train_config", {})
        conflicts = resume_conflicts({"loss_mask": "none", **stored}, cfg)
        if conflicts:
            raise ValueError(f"{last_path} was trained with other settings ({'; '.join(conflicts)}); resume with "
                             "the same settings, or start a new run with a new --out (or --restart)")
        tr = payload["training"]
        start = {k: tr[k] for k in start}
        opt_state = tr["optimizer"]
        if rank == 0:
            log(f"resuming from {last_path}: epoch {start['epoch']}, position {start['position']}, "
                f"step {start['step']}")
    network = network.to(device).train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        optimiser.load_state_dict(opt_state)
    model = torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network

    pairs = training_pairs(train_files, cache)
    per_rank = len(pairs) // world
    if cfg.epoch_steps is not None:                   # a shorter epoch: the first steps of each epoch's shuffle
        if cfg.epoch_steps < 1:
            raise ValueError(f"epoch_steps must be at least 1, got {cfg.epoch_steps}")
        per_rank = min(per_rank, cfg.epoch_steps)
    history, best = list(start["history"]), start["best"]
    step, t_start, elapsed0 = start["step"], time.perf_counter(), start["elapsed_s"]
    if rank == 0:
        log(f"training {net_cfg.name} ({count_parameters(network):,} parameters) on {len(train_files)} patients "
            f"({len(pairs)} ordered pairs), validating on {len(val_files)}; device {device}, world size {world}")

    def save(epoch, position, reason):
        if rank != 0:
            return
        meta = {"train_config": cfg.to_dict(), "step": step, "epoch": epoch, "reason": reason,
                "train_patients": [p.stem for p in train_files], "val_patients": [p.stem for p in val_files]}
        extra = {"epoch": epoch, "position": position, "step": step, "history": history, "best": best,
                 "elapsed_s": elapsed0 + time.perf_counter() - t_start, "optimizer": optimiser.state_dict()}
        save_checkpoint(last_path, network, prep.to_dict(), meta, extra=extra)

    if cfg.max_steps is not None and step >= cfg.max_steps:   # e.g. the recipe run again after it finished
        save(start["epoch"], start["position"], "step budget")
        return {"checkpoint": str(last_path), "history": history, "stopped": "step budget", "step": step}
    stop_reason = "finished"
    interrupted = _InterruptFlag()
    for epoch in range(start["epoch"], cfg.epochs):
        order = epoch_order(cfg.seed, epoch, len(pairs))
        mine = order[rank::world][:per_rank]
        position = start["position"] if epoch == start["epoch"] else 0
        running = []
        while position < per_rank:
            fi, f, m = pairs[mine[position]]
            patient = cache(train_files[fi])
            step_rng = step_draws(cfg.seed, epoch, position, rank)
            if cfg.loss != "unsupervised":
                loss, _ = supervised_step_loss(model, patient, f, m, prep, cfg, weights, step_rng, device)
            else:
                batch, initial = pair_batch(patient, f, m, prep, device)
                fovs = pair_fields_of_view(patient, f, m, initial, device) if cfg.loss_mask == "fov" else []
                if cfg.augment:
                    aug = sample_augmentation(step_rng, cfg.max_rotation_deg)
                    batch = apply_augmentation(batch + fovs, aug)
                    batch, fovs = batch[:4], batch[4:]
                if cfg.randomise_intensity:
                    batch = randomise_intensity(batch, step_rng)
                _, loss, _ = pair_loss(model, batch, fovs or None, weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            position += 1
            running.append(float(loss.detach()))
            if progress and rank == 0:
                progress(position / per_rank, f"epoch {epoch + 1}/{cfg.epochs} loss {np.mean(running[-20:]):.4f}")
            over_time = cfg.max_minutes is not None and \
                (time.perf_counter() - t_start) / 60.0 >= cfg.max_minutes
            over_steps = cfg.max_steps is not None and step >= cfg.max_steps
            flag = torch.tensor([1.0 if (over_time or over_steps or interrupted) else 0.0])
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                stop_reason = "interrupted" if interrupted else "time budget" if over_time else "step budget"
                save(epoch, position, stop_reason)
                interrupted.restore()
                if stop_reason == "interrupted" and rank == 0:
                    log(f"interrupted: saved {last_path} at step {step}; run the same command again to resume")
                return {"checkpoint": str(last_path), "history": history, "stopped": stop_reason, "step": step}
            if step % cfg.checkpoint_every == 0:
                save(epoch, position, "periodic")
        if rank == 0:
            val = validate(network, val_files, cache, prep, weights, device, cfg.loss_mask, cfg.organ_weight,
                           cfg.lambda_spect_field)
            entry = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(running)) if running else None,
                     "elapsed_s": round(elapsed0 + time.perf_counter() - t_start, 1),
                     **{f"val_{k}": v for k, v in val.items()}}
            history.append(entry)
            log(json.dumps(entry))
            key = "loss" if cfg.loss == "unsupervised" else "truth_loss"      # the best epoch by what is learnt
            if best is None or val[key] < best["val_loss"]:
                best = {"epoch": epoch + 1, "val_loss": val[key]}
                save_checkpoint(out / "best.pt", network, prep.to_dict(), {"train_config": cfg.to_dict(),
                                                                           "epoch": epoch + 1, "step": step,
                                                                           "validation": val})
        save(epoch + 1, 0, "epoch end")
        if world > 1:
            dist.barrier()
    interrupted.restore()
    return {"checkpoint": str(last_path), "history": history, "stopped": stop_reason, "step": step}

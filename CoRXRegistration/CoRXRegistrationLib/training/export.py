"""Export a trained checkpoint as a shippable model: float16 weights plus a model card
(``<name>.json`` machine-readable, ``<name>.md`` for people) that states the configuration,
parameter count, training data and exact recipe, steps, wall time, hardware, validation figures,
known limits and the SHA-256 of the weights file it describes."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from ..network.checkpoint import file_sha256, load_checkpoint, read_checkpoint, save_checkpoint
from ..network.networks import count_parameters

RECIPE = "NETWORK={network} LOSS_MASK={loss_mask} CT_STEPS={ct_steps} scripts/train_model.sh"  # bundled: train_bundled_model.sh
SUPERVISED_RECIPE = "scripts/train_supervised_model.sh"
UNSUPERVISED_DATA = ("simulated procedural patients (corx simulate, clinical preset), seeds 100-127; "
                     "the 2 highest seeds are the validation split; never patient15, never seeds >= 5000")
CT_ONLY_LIMIT = ("The last training stage drops the paper's SPECT LNCC term (CT term only): on simulated series that "
                 "term paid for turning activity change between time points (bladder emptying, washout around "
                 "tumours) into motion. The network still takes both SPECT and CT as input.")
LIMITS = [
    "Trained on simulated procedural anatomies only (177Lu-DOTATATE kinetics); real patient "
    "data may differ (scatter, attenuation artefacts, metal, truncated fields of view).",
    "CPU-sized configuration (see 'config'); the paper's 9.56 M-parameter CoRX-NET is available as "
    "'corx-paper' for users with a GPU and their own training data.",
    "The field is predicted at half resolution (7.74 mm) and upsampled; structures smaller than about "
    "two SPECT voxels are aligned only as well as their surroundings.",
]
UNSUPERVISED_STANDING = [
    "Not better than the best classical registration wherever that works: on the 24 pairs of `corx evaluate` "
    "(2026-12-01, docs/evaluation.md) ANTs SyN (CT-driven) followed by the same SPECT/CT fit was lower than "
    "CoRX in tumour error on 18 pairs and in organ error on 13 (CoRX is lower on average because ANTs failed "
    "on 6 pairs); with the same fit, the network lowers the organ error of its own rigid stage by about 1 mm.",
]
SUPERVISED_LIMITS = [
    "Learned from the simulator's motion model (couch repositioning, breathing with sliding organs, bowel "
    "displacement, bladder filling, SPECT/CT shifts within a session); motion outside it is not learned. Its "
    "standing against classical registration on held-out series is in docs/training.md. On your own unlabeled "
    "series, fine-tune with the unsupervised loss (`corx train --loss unsupervised --init <this model>`).",
]


def portable_path(value):
    """A path as a card may show it: an absolute path becomes ``<training>/`` + its last part (a folder)
    or last two parts (a file), so no machine's folders are published; anything else is unchanged."""
    if not isinstance(value, str) or not Path(value).is_absolute():
        return value
    parts = Path(value).parts
    return "<training>/" + "/".join(parts[-2:] if Path(value).suffix else parts[-1:])


def portable_config(train_config: dict) -> dict:
    """``train_config`` with every path value made portable (:func:`portable_path`)."""
    return {k: portable_path(v) for k, v in train_config.items()}


def export_model(checkpoint, out, run_dir=None, half: bool = True, overwrite: bool = False) -> dict:
    """Write the shippable model ``out`` (.pt) and its card beside it (.json, .md; paths made portable);
    returns the card. The three files are checked before any work: none may be the checkpoint or a
    file of the run, and existing ones are replaced (as a set) only with ``overwrite``."""
    from ..outputs import OutputSet, write_text

    out = Path(out)
    if out.suffix != ".pt":
        raise ValueError(f"--out {out}: the model file must end in .pt (its card is written beside it as "
                         f"{out.stem}.json and {out.stem}.md)")
    run_files = sorted(Path(run_dir).glob("*")) if run_dir and Path(run_dir).is_dir() else []
    plan = OutputSet(out.parent, [out.name, out.stem + ".json", out.stem + ".md"],
                     inputs=[checkpoint, *run_files]).prepare(overwrite)
    network, payload = load_checkpoint(checkpoint)
    meta = dict(payload.get("meta", {}))
    init = meta.get("train_config", {}).get("init")
    meta["train_config"] = portable_config(meta.get("train_config", {}))
    history, elapsed, step = [], None, meta.get("step")
    data = UNSUPERVISED_DATA
    if run_dir and (Path(run_dir) / "last.pt").is_file():
        last = read_checkpoint(Path(run_dir) / "last.pt")
        tr = last.get("training", {})
        history, elapsed, step_total = tr.get("history", []), tr.get("elapsed_s"), tr.get("step")
        data = data_description(last.get("meta", {}), meta.get("train_config", {})) or data
    else:
        step_total = step
    if not meta.get("validation") and history and history[-1].get("step") == step:    # the run's end, validated
        meta["validation"] = {k[len("val_"):]: v for k, v in history[-1].items() if k.startswith("val_")}
    initialised_from = None
    if init and Path(init).is_file():             # a fine-tuned model: say what it started from
        start = read_checkpoint(init).get("meta", {})
        initialised_from = {"checkpoint": Path(init).name, "steps": start.get("step"), "epoch": start.get("epoch"),
                            "train_config": portable_config(start.get("train_config", {}))}
    meta_out = {"name": out.stem, "trained_step": step, "validation": meta.get("validation", {}),
                "train_config": meta.get("train_config", {})}
    save_checkpoint(plan.path(out.name), network, payload["preprocess"], meta_out, half=half)
    card = {
        "name": out.stem,
        "weights_file": out.name,
        "sha256": file_sha256(out),
        "storage": "float16" if half else "float32",
        "config": network.config.to_dict(),
        "parameters": count_parameters(network),
        "preprocess": payload["preprocess"],
        "training": {
            "recipe": recipe_line(network.config.name, meta.get("train_config", {})),
            "train_config": meta.get("train_config", {}),
            "selected_epoch": meta.get("epoch"),
            "selected_step": step,
            "total_steps_run": step_total,
            "wall_time_h": None if elapsed is None else round(elapsed / 3600.0, 2),
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                        f"torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU",
            "data": data,
            "loss": loss_description(meta.get("train_config", {}))
            + (f"; initialised from a model trained with {loss_description(initialised_from['train_config'])}"
               if initialised_from else ""),
            "history": history,
            "initialised_from": initialised_from,
        },
        "validation": meta.get("validation", {}),
        "known_limits": _status_lines(meta.get("validation", {}), step)
        + ([CT_ONLY_LIMIT] if _ct_only(meta.get("train_config", {})) else []) + LIMITS
        + (SUPERVISED_LIMITS if _supervised(meta.get("train_config", {})) else UNSUPERVISED_STANDING),
    }
    write_text(plan.path(out.stem + ".json"), json.dumps(card, indent=2))
    write_text(plan.path(out.stem + ".md"), model_card_markdown(card))
    return card


def _ct_only(train_config: dict) -> bool:
    return train_config.get("lambda_spect", 0.1) == 0


def _supervised(train_config: dict) -> bool:
    return train_config.get("loss", "unsupervised") != "unsupervised"


def data_description(run_meta: dict, train_config: dict) -> str | None:
    """The training and validation patients a supervised run's last.pt names; None for the unsupervised
    recipe (its data are described by :data:`UNSUPERVISED_DATA`) or a run that names none."""
    train, val = run_meta.get("train_patients"), run_meta.get("val_patients")
    if not _supervised(train_config) or not train or not val:
        return None
    return (f"{len(train)} domain-randomised simulated procedural patients (`corx prepare-data --preset randomised`: "
            f"protocol, resolution, counts, noise, motion, SPECT/CT mismatch and field of view drawn per patient), "
            f"{train[0]} to {train[-1]}; validation {', '.join(val)}; never patient15, never seeds >= 5000")


def recipe_line(network: str, train_config: dict) -> str:
    """The recipe that makes this run: the supervised script, or the scripts/train_model.sh call (a CT-only
    short-epoch run is its stage 3)."""
    if _supervised(train_config):
        return SUPERVISED_RECIPE
    ct_steps = train_config.get("epoch_steps") if _ct_only(train_config) else 0
    return RECIPE.format(network=network, loss_mask=train_config.get("loss_mask", "none"), ct_steps=ct_steps or 0)


def loss_description(train_config: dict) -> str:
    """The loss a run used, from its stored training configuration (older runs: no mask)."""
    tc = {"lambda_spect": 0.1, "lambda_reg": 8e-4, "loss_mask": "none", **train_config}
    if _supervised(tc):
        truth = (f"endpoint error (mm) of the CT field + {tc.get('lambda_spect_field', 1.0):g} x that of the SPECT "
                 f"field against the simulator's true fields, weight 1 in the body and "
                 f"{1 + tc.get('organ_weight', 3.0):g} in the uptake organs and tumours, + {tc['lambda_reg']:g} "
                 f"diffusion (supervised; not the paper's loss)"
                 + ("; intensities randomised per step" if tc.get("randomise_intensity") else ""))
        if tc["loss"] == "supervised":
            return truth
        weight = tc.get("lambda_image", 1.0)
        image = loss_description({**tc, "loss": "unsupervised"})
        return f"{truth} + {image}" + ("" if weight == 1.0 else
                                        f", its image terms weighted {weight:g} (the diffusion counted once)")
    where = " over the voxels inside both scans' fields of view" if tc["loss_mask"] == "fov" else ""
    if _ct_only(tc):
        return (f"MSE(CT){where} + {tc['lambda_reg']:g} diffusion (the paper's Eq. 2-5 without its SPECT LNCC "
                f"term)")
    return (f"MSE(CT) + {tc['lambda_spect']:g} LNCC(SPECT, 9^3){where} + {tc['lambda_reg']:g} diffusion "
            f"(paper Eq. 2-5)")


def _status_lines(val: dict, step) -> list:
    """The model's measured standing, stated plainly first among the limits."""
    if "epe_ct_uptake_mm" in val and "epe_rigid_ct_uptake_mm" in val:
        return [f"Measured on the validation patients after {step} steps: endpoint error of the CT field in the "
                f"uptake organs and tumours {val['epe_ct_uptake_mm']:.2f} mm vs {val['epe_rigid_ct_uptake_mm']:.2f} mm "
                f"for its rigid stage, of the SPECT field {val['epe_spect_uptake_mm']:.2f} vs "
                f"{val['epe_rigid_spect_uptake_mm']:.2f} mm (body: CT {val['epe_ct_body_mm']:.2f} vs "
                f"{val['epe_rigid_ct_body_mm']:.2f}, SPECT {val['epe_spect_body_mm']:.2f} vs "
                f"{val['epe_rigid_spect_body_mm']:.2f} mm); {val.get('jacobian_nonpositive_percent', float('nan')):.2f} % "
                "of voxels with Jacobian <= 0. Check the Jacobian and the overlays before using its fields for "
                "dosimetry."]
    if "displacement_error_body_mm" not in val or "identity_error_body_mm" not in val:
        return []
    err, ident = val["displacement_error_body_mm"], val["identity_error_body_mm"]
    return [f"Measured on the validation patients after {step} steps of its last training stage: mean displacement error in the body "
            f"{err:.2f} mm vs {ident:.2f} mm without registration ({100 * (1 - err / ident):.0f} % lower); "
            f"{val.get('jacobian_nonpositive_percent', float('nan')):.2f} % of voxels with Jacobian <= 0. "
            "Check the Jacobian and the overlays before using its fields for dosimetry."]


def model_card_markdown(card: dict) -> str:
    cfg, tr, val = card["config"], card["training"], card["validation"]
    lines = [f"# Model card: {card['name']}", "",
             f"- Weights: `{card['weights_file']}` ({card['storage']}), SHA-256 `{card['sha256']}`",
             f"- Network: `{cfg['name']}` — {'CoRX-NET with cross-stitch' if cfg.get('cross_stitch') else cfg['architecture']}, "
             f"embed {cfg['embed_dim']}, depths {cfg['depths']}, heads {cfg['num_heads']}, window {cfg['window_size']}, "
             f"field at {'half' if cfg['flow_level'] else 'full'} resolution, input {cfg['image_size']}, "
             f"{'diffeomorphic (stationary velocity field, scaling and squaring)' if cfg.get('diffeomorphic') else 'displacement field'}",
             f"- Pre-alignment: {card['preprocess'].get('prealign', 'none')} (CT-CT, fitted per pair before the network; "
             "the network corrects what is left)" if card['preprocess'].get('prealign', 'none') != 'none' else
             "- Pre-alignment: none",
             *([f"- SPECT head: the network also predicts a smooth correction of the field the SPECT follows (cells "
                f"of {cfg.get('spect_correction_cell')} field voxels, interpolated), learned from the true SPECT fields"]
               if cfg.get("spect_correction") else []),
             *(["- SPECT/CT offset (at registration, after the network; fitted, not learned): one translation of the "
                "moving SPECT against the field its CT gives plus one cranio-caudal shift of the uptake organs "
                "(breathing the CT-driven field missed), maximising SPECT LNCC over the uptake "
                "(`network/spect_offset.py`); `corx register --no-spect-offset` or `spect_offset=False` leaves it out"]
               if cfg["architecture"] == "corx" else []),
             f"- Parameters: {card['parameters']:,}",
             f"- Preprocessing: {card['preprocess']}",
             "", "## Training", "",
             f"- Recipe: `{tr['recipe']}` (resumable); command line: `corx train` with {tr['train_config']}",
             f"- Data: {tr['data']}",
             f"- Loss: {tr['loss']}; optimiser AdamW",
             f"- Selected checkpoint: epoch {tr['selected_epoch']}, step {tr['selected_step']} "
             f"(of {tr['total_steps_run']} run); wall time {tr['wall_time_h']} h",
             f"- Hardware: {tr['hardware']}",
             *([f"- Initialised from `{tr['initialised_from']['checkpoint']}`: {tr['initialised_from']['steps']} steps "
                f"({tr['initialised_from']['epoch']} epochs) of `corx train` with "
                f"{tr['initialised_from']['train_config']}"] if tr.get("initialised_from") else []),
             "", "## Validation (held-out simulated patients, reference-fixed pairs)", ""]
    if val:
        lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v:.4f} |" for k, v in val.items()]
    if tr["history"]:
        keys = ["epoch", "step", "train_loss", "val_loss", "val_spect_lncc", "val_displacement_error_body_mm",
                "val_identity_error_body_mm", "val_jacobian_nonpositive_percent"]
        if "val_truth_loss" in tr["history"][0]:
            keys = ["epoch", "step", "train_loss", "val_truth_loss", "val_epe_ct_uptake_mm",
                    "val_epe_rigid_ct_uptake_mm", "val_epe_spect_uptake_mm", "val_epe_rigid_spect_uptake_mm",
                    "val_epe_ct_body_mm", "val_jacobian_nonpositive_percent"]
        lines += ["", "### Per epoch", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for h in tr["history"]:
            lines.append("| " + " | ".join(f"{h.get(k, float('nan')):.4g}" if isinstance(h.get(k), float)
                                            else str(h.get(k, "")) for k in keys) + " |")
    lines += ["", "## Known limits", ""] + [f"- {x}" for x in card["known_limits"]]
    return "\n".join(lines) + "\n"

"""How much the paper's image terms pull on a network beside the endpoint error, at one checkpoint.

`corx train --loss both` adds the image terms (MSE(CT) + lambda_spect LNCC(SPECT), inside both fields of view)
to the endpoint error (mm), times ``--lambda-image``. The two are in different units, so the weight is chosen
by their gradients: on the first ``--pairs`` training pairs of a run (the run's own augmentation and intensity
draws), the gradient of each with respect to the network's weights, and

    .venv/bin/python scripts/measure_loss_gradients.py --checkpoint output/training/corx-cpu-nocs-supervised/last.pt

prints, per pair, the two gradient norms, their ratio (endpoint error / image terms: the weight at which the
image terms pull as hard), and the cosine between them (negative: they pull against each other), then the
medians. The image terms' gradient is that of ``--loss both`` less that of ``--loss supervised`` on the same
draw (the diffusion term is in both).
"""
import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "CoRXRegistration"), str(ROOT / "TIAMapping")]

from CoRXRegistrationLib.network.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from CoRXRegistrationLib.network.losses import LossWeights  # noqa: E402
from CoRXRegistrationLib.preprocess import PreprocessConfig  # noqa: E402
from CoRXRegistrationLib.training.loop import (PatientCache, TrainConfig, _patient_files, epoch_order,  # noqa: E402
                                               split_patients, step_draws, supervised_step_loss, training_pairs)


def gradient(network, loss) -> torch.Tensor:
    network.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (its run's settings are used)")
    parser.add_argument("--data", help="training data folder (default: the run's)")
    parser.add_argument("--pairs", type=int, default=8, help="training pairs to measure on (default 8)")
    args = parser.parse_args(argv)

    stored = read_checkpoint(args.checkpoint).get("meta", {}).get("train_config", {})
    cfg = TrainConfig.from_dict(stored)
    if args.data:
        cfg = replace(cfg, data=args.data)
    network, _ = load_checkpoint(args.checkpoint)
    network.train()
    cache = PatientCache()
    train_files, _ = split_patients(_patient_files(cfg.data), cfg.val_patients)
    prep = replace(PreprocessConfig.from_dict(cache(train_files[0])["preprocess"]), prealign=cfg.prealign)
    weights = LossWeights(cfg.lambda_spect, cfg.lambda_reg)
    pairs = training_pairs(train_files, cache)
    order = epoch_order(cfg.seed, 0, len(pairs))[:args.pairs]
    ratios, cosines = [], []
    print("| pair | endpoint-error gradient | image-terms gradient | ratio | cosine |\n|---|---:|---:|---:|---:|")
    for k, index in enumerate(order):
        fi, f, m = pairs[index]
        patient = cache(train_files[fi])
        grads = {}
        for loss in ("supervised", "both"):
            rng = step_draws(cfg.seed, 0, k)
            value, _ = supervised_step_loss(network, patient, f, m, prep, replace(cfg, loss=loss, lambda_image=1.0),
                                            weights, rng, "cpu")
            grads[loss] = gradient(network, value)
        truth, image = grads["supervised"], grads["both"] - grads["supervised"]
        ratio = float(truth.norm() / image.norm().clamp(min=1e-30))
        cosine = float(torch.dot(truth, image) / (truth.norm() * image.norm()).clamp(min=1e-30))
        ratios.append(ratio)
        cosines.append(cosine)
        print(f"| {train_files[fi].stem} {f}->{m} | {float(truth.norm()):.4g} | {float(image.norm()):.4g} | "
              f"{ratio:.4g} | {cosine:+.3f} |")
    print(f"\nmedian ratio {statistics.median(ratios):.4g} (the --lambda-image at which the image terms pull as hard "
          f"as the endpoint error), median cosine {statistics.median(cosines):+.3f}, {len(ratios)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The recipe of the supervised CoRX model (corx-cpu with a SPECT head): the bundled v3 weights
# (training_checkpoints/corx-cpu-ct/best.pt) fine-tuned on domain-randomised simulated patients
# (`prepare-data --preset randomised`, seeds 200-239; the last 2 validate) with the endpoint error
# against their true CT and SPECT fields (uptake organs and tumours weighted 4x, intensities
# randomised per step), behind the same rigid CT-CT pre-alignment, diffeomorphic. One epoch is
# EPOCH_STEPS pairs followed by validation. The model exported is the end of the run (RUN/last.pt,
# EPOCHS x EPOCH_STEPS steps): RUN/best.pt, the epoch with the lowest validation truth loss, is chosen
# on 2 patients only and was the first epoch, whose CT field was still worse than the rigid stage's.
# Resumable: run it again after an interruption and it continues from RUN/last.pt.
# Committed: training_checkpoints/corx-cpu-supervised/{best,last}.pt and the exported model
# training_checkpoints/models/corx-cpu-supervised.{pt,json,md} (copy them into RUN to skip training).
# Never add the patient15 anatomy, the evaluation seeds (>= 5000) or the demo seed (1001) here.
set -euo pipefail
CORX=${CORX:-.venv/bin/corx}
DATA=${DATA:-output/training/data-randomised}
RUN=${RUN:-output/training/corx-cpu-supervised}
INIT=${INIT:-training_checkpoints/corx-cpu-ct/best.pt}
EPOCHS=${EPOCHS:-4}
EPOCH_STEPS=${EPOCH_STEPS:-150}
EXPORT=${EXPORT:-output/models/corx-cpu-supervised.pt}
NETWORK=${NETWORK:-corx-cpu}   # corx-cpu-nocs for the cross-stitch ablation (INIT: its stage-3 checkpoint)
# the SPECT head needs a network that reads the SPECT; for the SPECT-stream ablation (NETWORK=transmorph-cpu,
# INIT=training_checkpoints/transmorph-cpu-ct/best.pt) give OVERRIDES='{"diffeomorphic": true}'
OVERRIDES=${OVERRIDES:-'{"diffeomorphic": true, "spect_correction": true}'}
# COOL_STEPS > 0: then a learning-rate cool-down, COOL_STEPS steps at COOL_LR from RUN/last.pt (fresh optimiser,
# the same data, loss and seed) in COOL_RUN, and that run's end is exported instead (corx-cpu-nocs-supervised-cool:
# NETWORK=corx-cpu-nocs, COOL_STEPS=150); COOL_LOSS=both adds the paper's image loss in the cool-down, its
# image terms weighted COOL_LAMBDA_IMAGE (the supervised + unsupervised ablation, corx-cpu-nocs-supervised-
# cool-both1000: COOL_LAMBDA_IMAGE=1000, about where they pull as hard as the endpoint error by
# scripts/measure_loss_gradients.py; at 1 they barely count)
COOL_STEPS=${COOL_STEPS:-0}
COOL_LR=${COOL_LR:-1e-4}
COOL_RUN=${COOL_RUN:-$RUN-cool}
COOL_LOSS=${COOL_LOSS:-supervised}
COOL_LAMBDA_IMAGE=${COOL_LAMBDA_IMAGE:-1}

$CORX prepare-data --simulate 40 --first-seed 200 --preset randomised --out "$DATA"
$CORX train --data "$DATA" --out "$RUN" --network "$NETWORK" \
    --network-overrides "$OVERRIDES" --prealign rigid --init "$INIT" \
    --loss supervised --organ-weight 3 --lambda-spect-field 1 --randomise-intensity \
    --epochs "$EPOCHS" --epoch-steps "$EPOCH_STEPS" --lr 1e-3 --val-patients 2 --seed 0 --checkpoint-every 25
FINAL=$RUN
if [ "$COOL_STEPS" -gt 0 ]; then
    FINAL=$COOL_RUN
    $CORX train --data "$DATA" --out "$FINAL" --network "$NETWORK" \
        --network-overrides "$OVERRIDES" --prealign rigid --init "$RUN/last.pt" \
        --loss "$COOL_LOSS" --lambda-image "$COOL_LAMBDA_IMAGE" --organ-weight 3 --lambda-spect-field 1 --randomise-intensity \
        --epochs 1 --epoch-steps "$COOL_STEPS" --lr "$COOL_LR" --val-patients 2 --seed 0 --checkpoint-every 25
fi
mkdir -p "$(dirname "$EXPORT")"
$CORX export-model --checkpoint "$FINAL/last.pt" --run "$FINAL" --out "$EXPORT" --overwrite

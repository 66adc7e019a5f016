#!/usr/bin/env bash
# The recipe of the bundled CoRX model (CoRXRegistration/Resources/Models/corx-bundled.pt).
# Resumable: run it again after an interruption and each stage continues from its RUN/last.pt.
#   DATA  training patients (simulated procedural anatomies, seeds 100-127; the last 2 validate)
#   RUN1  stage 1: corx-cpu on the pairs as scanned (no pre-alignment), 2 epochs = 624 steps
#   RUN2  stage 2: the same weights fine-tuned behind the rigid CT-CT pre-alignment, diffeomorphic,
#         2 epochs = 624 steps; best.pt is the epoch with the lowest validation loss (epoch 2)
# Never add the patient15 anatomy or the evaluation seeds (>= 5000) or the demo seed (1001) here.
# The committed checkpoints training_checkpoints/corx-cpu/best.pt (end of stage 1) and
# training_checkpoints/corx-cpu-rigid/{best,last}.pt (stage 2; last.pt lies a few steps into a
# third epoch that was stopped, so with --epochs 2 the stage is complete) let you skip or continue:
#   mkdir -p "$RUN1" "$RUN2"; cp training_checkpoints/corx-cpu/best.pt "$RUN1/";
#   cp training_checkpoints/corx-cpu-rigid/*.pt "$RUN2/"
set -euo pipefail
CORX=${CORX:-.venv/bin/corx}
DATA=${DATA:-output/training/data}
RUN1=${RUN1:-output/training/corx-cpu}
RUN2=${RUN2:-output/training/corx-cpu-rigid}

$CORX prepare-data --simulate 28 --first-seed 100 --preset clinical --out "$DATA"
if [ ! -f "$RUN1/best.pt" ]; then
  $CORX train --data "$DATA" --out "$RUN1" --network corx-cpu --prealign none --epochs 2 --lr 2e-3 \
      --val-patients 2 --seed 0 --checkpoint-every 25
fi
$CORX train --data "$DATA" --out "$RUN2" --network corx-cpu --network-overrides '{"diffeomorphic": true}' \
    --prealign rigid --init "$RUN1/best.pt" --epochs 2 --lr 1e-3 --val-patients 2 --seed 0 \
    --checkpoint-every 25
$CORX export-model --checkpoint "$RUN2/best.pt" --run "$RUN2" \
    --out CoRXRegistration/Resources/Models/corx-bundled.pt

#!/usr/bin/env bash
# The recipe of the bundled CoRX model (CoRXRegistration/Resources/Models/corx-bundled.pt):
# scripts/train_model.sh with NETWORK=corx-cpu, exported into the module's Resources.
# Resumable: run it again after an interruption and each stage continues from its RUN/last.pt.
# The committed checkpoints training_checkpoints/corx-cpu/best.pt (end of stage 1) and
# training_checkpoints/corx-cpu-rigid/{best,last}.pt (stage 2; last.pt lies a few steps into a
# third epoch that was stopped, so with --epochs 2 the stage is complete) let you skip or continue:
#   mkdir -p "$RUN1" "$RUN2"; cp training_checkpoints/corx-cpu/best.pt "$RUN1/";
#   cp training_checkpoints/corx-cpu-rigid/*.pt "$RUN2/"
set -euo pipefail
export NETWORK=corx-cpu
export LOSS_MASK=${LOSS_MASK:-none}      # v1 was trained before the field-of-view mask existed
export RUN1=${RUN1:-output/training/corx-cpu}
export RUN2=${RUN2:-output/training/corx-cpu-rigid}
export EXPORT=${EXPORT:-CoRXRegistration/Resources/Models/corx-bundled.pt}
exec "$(dirname "$0")/train_model.sh"

#!/usr/bin/env bash
# The recipe of the bundled CoRX model (CoRXRegistration/Resources/Models/corx-bundled.pt, v3):
# scripts/train_model.sh with NETWORK=corx-cpu, no loss mask, and the CT-only stage 3 of 156 steps,
# exported into the module's Resources. Resumable: run it again after an interruption and each
# stage continues from its RUN/last.pt.
# The committed checkpoints let you skip or continue stages: training_checkpoints/corx-cpu/best.pt
# (end of stage 1), training_checkpoints/corx-cpu-rigid/{best,last}.pt (stage 2 = v1; last.pt lies a few
# steps into a third epoch that was stopped, so with --epochs 2 the stage is complete) and
# training_checkpoints/corx-cpu-ct/best.pt (stage 3 = v3):
#   mkdir -p "$RUN1" "$RUN2"; cp training_checkpoints/corx-cpu/best.pt "$RUN1/";
#   cp training_checkpoints/corx-cpu-rigid/*.pt "$RUN2/"
# CT_STEPS=0 reproduces v1 (training_checkpoints/models/corx-cpu-v1.pt).
set -euo pipefail
export NETWORK=corx-cpu
export LOSS_MASK=${LOSS_MASK:-none}      # v1 was trained before the field-of-view mask existed; v3 continues it
export CT_STEPS=${CT_STEPS:-156}
export RUN1=${RUN1:-output/training/corx-cpu}
export RUN2=${RUN2:-output/training/corx-cpu-rigid}
export RUN3=${RUN3:-output/training/corx-cpu-ct}
export EXPORT=${EXPORT:-CoRXRegistration/Resources/Models/corx-bundled.pt}
exec "$(dirname "$0")/train_model.sh"

#!/usr/bin/env bash
# The recipe of the bundled CoRX model (CoRXRegistration/Resources/Models/corx-bundled.pt).
# Resumable: run it again after an interruption and it continues from RUN/last.pt.
#   DATA  training patients (simulated procedural anatomies, seeds 100-127; the last 2 validate)
#   RUN   checkpoints and logs
# Never add the patient15 anatomy or the evaluation seeds (>= 5000) or the demo seed (1001) here.
set -euo pipefail
CORX=${CORX:-.venv/bin/corx}
DATA=${DATA:-output/training/data}
RUN=${RUN:-output/training/corx-cpu}
MAX_MINUTES=${MAX_MINUTES:-100}

$CORX prepare-data --simulate 28 --first-seed 100 --preset clinical --out "$DATA"
$CORX train --data "$DATA" --out "$RUN" --network corx-cpu --epochs 6 --lr 2e-3 --val-patients 2 \
    --seed 0 --checkpoint-every 25 --max-minutes "$MAX_MINUTES"
$CORX export-model --checkpoint "$RUN/best.pt" --run "$RUN" \
    --out CoRXRegistration/Resources/Models/corx-bundled.pt

#!/usr/bin/env bash
# The training recipe of every CPU-sized model we ship or compare against; resumable: run it
# again after an interruption and each stage continues from its RUN/last.pt.
#   NETWORK  corx-cpu (the bundled model), transmorph-cpu or corx-cpu-nocs (the comparison rows
#            of `corx evaluate`, "trained the same way")
#   DATA     training patients (simulated procedural anatomies, seeds 100-127; the last 2 validate)
#   RUN1     stage 1: NETWORK on the pairs as scanned (no pre-alignment), 2 epochs = 624 steps
#   RUN2     stage 2: the same weights fine-tuned behind the rigid CT-CT pre-alignment,
#            diffeomorphic, 2 epochs = 624 steps; best.pt is the epoch with the lowest validation loss
#   EXPORT   the exported model (default: output/models/NETWORK.pt)
#   LOSS_MASK fov (default): the image terms of the loss count only inside both scans' fields of view;
#            none: everywhere, as the bundled v1 and the committed transmorph-cpu were trained
# Committed checkpoints (training_checkpoints/NETWORK/best.pt = end of stage 1,
# training_checkpoints/NETWORK-rigid/best.pt = end of stage 2; the exported comparison models in
# training_checkpoints/models/) exist for corx-cpu, transmorph-cpu and corx-cpu-nocs (all LOSS_MASK=none);
# training_checkpoints/models/corx-cpu-v2.* is corx-cpu with LOSS_MASK=fov (measured, not bundled).
# Never add the patient15 anatomy or the evaluation seeds (>= 5000) or the demo seed (1001) here.
set -euo pipefail
CORX=${CORX:-.venv/bin/corx}
NETWORK=${NETWORK:-corx-cpu}
DATA=${DATA:-output/training/data}
RUN1=${RUN1:-output/training/$NETWORK}
RUN2=${RUN2:-output/training/$NETWORK-rigid}
EXPORT=${EXPORT:-output/models/$NETWORK.pt}
LOSS_MASK=${LOSS_MASK:-fov}

$CORX prepare-data --simulate 28 --first-seed 100 --preset clinical --out "$DATA"
if [ ! -f "$RUN1/best.pt" ]; then
  $CORX train --data "$DATA" --out "$RUN1" --network "$NETWORK" --prealign none --epochs 2 --lr 2e-3 \
      --val-patients 2 --seed 0 --checkpoint-every 25 --loss-mask "$LOSS_MASK"
fi
$CORX train --data "$DATA" --out "$RUN2" --network "$NETWORK" --network-overrides '{"diffeomorphic": true}' \
    --prealign rigid --init "$RUN1/best.pt" --epochs 2 --lr 1e-3 --val-patients 2 --seed 0 \
    --checkpoint-every 25 --loss-mask "$LOSS_MASK"
mkdir -p "$(dirname "$EXPORT")"
$CORX export-model --checkpoint "$RUN2/best.pt" --run "$RUN2" --out "$EXPORT"

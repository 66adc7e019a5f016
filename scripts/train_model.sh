#!/usr/bin/env bash
# The training recipe of every CPU-sized model we ship or compare against; resumable: run it
# again after an interruption and each stage continues from its RUN/last.pt.
#   NETWORK  corx-cpu (the bundled model), transmorph-cpu or corx-cpu-nocs (the comparison rows
#            of `corx evaluate`, "trained the same way")
#   DATA     training patients (simulated procedural anatomies, seeds 100-127; the last 2 validate)
#   RUN1     stage 1: NETWORK on the pairs as scanned (no pre-alignment), 2 epochs = 624 steps
#   RUN2     stage 2: the same weights fine-tuned behind the rigid CT-CT pre-alignment,
#            diffeomorphic, 2 epochs = 624 steps; best.pt is the epoch with the lowest validation loss
#   RUN3     stage 3: the stage-2 weights fine-tuned CT_STEPS steps (one short epoch, then validation)
#            with the CT term of the loss only (lambda_spect 0): the SPECT LNCC term pays for turning
#            activity change between time points into motion, so it is dropped at the end. The network
#            still takes the SPECT as input. A departure from the paper's loss, stated in the model card.
#   CT_STEPS 156 (default, v3); 0 skips stage 3 and exports stage 2, as v1 and v2 were made
#   EXPORT   the exported model (default: output/models/NETWORK.pt)
#   LOSS_MASK fov (default): the image terms of the loss count only inside both scans' fields of view;
#            none: everywhere, as the bundled v1 and the committed transmorph-cpu were trained
# Committed checkpoints (training_checkpoints/NETWORK/best.pt = end of stage 1,
# training_checkpoints/NETWORK-rigid/best.pt = end of stage 2, training_checkpoints/NETWORK-ct/best.pt = end
# of stage 3; exported models in training_checkpoints/models/) exist for corx-cpu, transmorph-cpu and
# corx-cpu-nocs (all LOSS_MASK=none, CT_STEPS=156: the comparison rows of `corx evaluate` are trained the
# same way as the bundled v3); training_checkpoints/models/corx-cpu-v1.* is corx-cpu with CT_STEPS=0 (the
# bundled model before v3) and corx-cpu-v2.* corx-cpu with LOSS_MASK=fov CT_STEPS=0 (measured, not bundled).
# Never add the patient15 anatomy or the evaluation seeds (>= 5000) or the demo seed (1001) here.
set -euo pipefail
CORX=${CORX:-.venv/bin/corx}
NETWORK=${NETWORK:-corx-cpu}
DATA=${DATA:-output/training/data}
RUN1=${RUN1:-output/training/$NETWORK}
RUN2=${RUN2:-output/training/$NETWORK-rigid}
EXPORT=${EXPORT:-output/models/$NETWORK.pt}
LOSS_MASK=${LOSS_MASK:-fov}
RUN3=${RUN3:-output/training/$NETWORK-ct}
CT_STEPS=${CT_STEPS:-156}

$CORX prepare-data --simulate 28 --first-seed 100 --preset clinical --out "$DATA"
if [ ! -f "$RUN1/best.pt" ]; then
  $CORX train --data "$DATA" --out "$RUN1" --network "$NETWORK" --prealign none --epochs 2 --lr 2e-3 \
      --val-patients 2 --seed 0 --checkpoint-every 25 --loss-mask "$LOSS_MASK"
fi
$CORX train --data "$DATA" --out "$RUN2" --network "$NETWORK" --network-overrides '{"diffeomorphic": true}' \
    --prealign rigid --init "$RUN1/best.pt" --epochs 2 --lr 1e-3 --val-patients 2 --seed 0 \
    --checkpoint-every 25 --loss-mask "$LOSS_MASK"
FINAL=$RUN2
if [ "$CT_STEPS" -gt 0 ]; then
  $CORX train --data "$DATA" --out "$RUN3" --network "$NETWORK" --network-overrides '{"diffeomorphic": true}' \
      --prealign rigid --init "$RUN2/best.pt" --epochs 1 --epoch-steps "$CT_STEPS" --lr 5e-4 --lambda-spect 0 \
      --val-patients 2 --seed 0 --checkpoint-every 25 --loss-mask "$LOSS_MASK"
  FINAL=$RUN3
fi
mkdir -p "$(dirname "$EXPORT")"
$CORX export-model --checkpoint "$FINAL/best.pt" --run "$FINAL" --out "$EXPORT" --overwrite

#!/usr/bin/env bash
# The paper-size CoRX-NET trained with the supervised recipe on a GPU machine, when one is available
# (never required): about 10 minutes in all. Prepares a small domain-randomised set (12 patients,
# seeds 200-211; the last 2 validate), then trains `corx-paper` (9.56 M parameters, full-resolution
# field, diffeomorphic, SPECT head) from scratch with the endpoint-error loss for MINUTES minutes of
# wall time, validating every EPOCH_STEPS steps; the per-epoch validation table (CT and SPECT endpoint
# errors against the rigid stage's) is printed and the run folder keeps last.pt to resume.
# Set-up there: make setup TORCH=torch EXTRAS=test  (the CUDA build of torch instead of the pinned CPU one)
#   scripts/gpu_train_supervised.sh
set -euo pipefail
CORX=${CORX:-.venv/bin/corx}
DATA=${DATA:-output/gpu-training/data}
RUN=${RUN:-output/gpu-training/corx-paper-supervised}
MINUTES=${MINUTES:-6}
EPOCH_STEPS=${EPOCH_STEPS:-60}
$CORX prepare-data --simulate 12 --first-seed 200 --preset randomised --out "$DATA"
$CORX train --data "$DATA" --out "$RUN" --network corx-paper \
    --network-overrides '{"diffeomorphic": true, "spect_correction": true}' --prealign rigid \
    --loss supervised --randomise-intensity --epochs 100 --epoch-steps "$EPOCH_STEPS" --lr 2e-4 \
    --val-patients 2 --seed 0 --checkpoint-every 50 --max-minutes "$MINUTES"
"${PY:-.venv/bin/python}" - "$RUN/last.pt" <<'PYEOF'
import sys, torch
history = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["training"]["history"]
keys = ["epoch", "step", "elapsed_s", "val_epe_ct_uptake_mm", "val_epe_rigid_ct_uptake_mm",
        "val_epe_spect_uptake_mm", "val_epe_rigid_spect_uptake_mm", "val_jacobian_nonpositive_percent"]
print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
for h in history:
    print("| " + " | ".join(f"{h.get(k, float('nan')):.4g}" for k in keys) + " |")
PYEOF

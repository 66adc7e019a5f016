#!/usr/bin/env bash
# CoRX on a GPU machine, when one is available (never required): the same register() path on CUDA,
# benchmarked in about 5 minutes and stopped at 10, the tables written to OUT/benchmark.md.
#   1. the forward pass of the paper's configurations and of the bundled CPU-sized one, with GPU memory;
#   2. every stage of register() in a warm process (rigid pre-alignment, network and SPECT/CT fit on the
#      GPU; QA metrics, native-resolution warps and writing on the CPU);
#   3. the whole `corx register` and `corx register-series` commands, each a fresh process.
# Set-up on that machine (the CUDA build of torch instead of the CPU one the Makefile pins):
#   make setup TORCH=torch EXTRAS=test        # or reuse an environment that has a CUDA torch
#   DEVICE=cuda scripts/gpu_benchmark.sh
# DEVICE=cpu runs the same script here, as a check that it works.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-output/gpu-benchmark}
LIMIT_S=${LIMIT_S:-600}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/CoRXRegistration:$PWD/TIAMapping${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# CoRX benchmark on $DEVICE ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
  echo
  timeout "$LIMIT_S" "$PY" -m CoRXRegistrationLib.cli benchmark --device "$DEVICE" --skip-tia --commands \
    --configs corx-paper corx-paper-nocs transmorph-paper corx-cpu --repeats 3
} 2>"$OUT/benchmark.log" | tee "$OUT/benchmark.md"
echo "wrote $OUT/benchmark.md (progress in $OUT/benchmark.log)"

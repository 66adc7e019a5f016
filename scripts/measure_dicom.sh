#!/usr/bin/env bash
# DICOM in and out on one series, side by side with its NIfTI files: export time and size, reading time,
# `corx dosimetry` wall time and peak on NIfTI / DICOM BQML (classic) / DICOM counts (enhanced), and how
# far the TIA, the VOI TIA and the RT Dose lie from the NIfTI path. Run from the repository root:
#   scripts/measure_dicom.sh SERIES_DIR WORK_DIR      (SERIES_DIR: a simulated series with truth/)
set -euo pipefail
SERIES=$(realpath "$1"); WORK=$2
ROOT=$(pwd); C=$ROOT/.venv/bin/corx; PY=$ROOT/.venv/bin/python
SEG=$SERIES/truth/segmentation.seg.nrrd
mkdir -p "$WORK" && cd "$WORK" && rm -rf bq cn out_* log_*
/usr/bin/time -f "export classic BQML: %e s wall, peak %M KB" "$C" export-dicom "$SERIES" --out bq
/usr/bin/time -f "export enhanced CNTS: %e s wall, peak %M KB" "$C" export-dicom "$SERIES" --out cn --units CNTS \
  --style enhanced
echo "bytes: DICOM classic $(du -sb bq | cut -f1), enhanced $(du -sb cn | cut -f1), NIfTI inputs" \
  "$(du -cb "$SERIES"/ct_*.nii.gz "$SERIES"/spect_*.nii.gz | tail -1 | cut -f1); files $(find bq -type f | wc -l)"
"$PY" - "$SERIES" <<'PY'
import statistics, sys, time
from CoRXRegistrationLib.quantification import read_calibration_file
from CoRXRegistrationLib.series_io import read_series
cal = read_calibration_file("cn/calibration.json")
for name, path, kw in (("NIfTI", sys.argv[1], {}), ("DICOM classic BQML", "bq", {}),
                       ("DICOM enhanced CNTS", "cn", {"calibration": cal})):
    runs = []
    for _ in range(3):
        t = time.perf_counter(); m = read_series(path, **kw); t1 = time.perf_counter(); m.sessions()
        runs.append((t1 - t, time.perf_counter() - t))
    print(f"read {name}: sorting and pairing {statistics.median(a for a, _ in runs):.2f} s, whole read "
          f"{statistics.median(b for _, b in runs):.2f} s (median of 3)")
PY
for r in 1 2; do
  for k in nifti bq cn; do
    case $k in nifti) IN=$SERIES; X=();; bq) IN=bq; X=();; cn) IN=cn; X=(--calibration cn/calibration.json);; esac
    /usr/bin/time -f "dosimetry $k run $r: %e s wall, peak %M KB" "$C" dosimetry "$IN" --out "out_${k}_$r" \
      --segmentation "$SEG" "${X[@]}" > "log_${k}_$r" 2>&1 || { cat "log_${k}_$r"; exit 1; }
    tail -1 "log_${k}_$r"
  done
done
"$PY" <<'PY'
import csv
import numpy as np
from CoRXRegistrationLib.dicom_read import read_rt_dose
from CoRXRegistrationLib.imageio import read_image
def voi(p):
    return {r["segment"]: float(r["voxel_tia_sum_mbq_h"]) for r in csv.DictReader(open(p)) if r["status"] == "ok"}
a, _ = read_image("out_nifti_1/tia/tia.nii.gz"); va = voi("out_nifti_1/tia/voi.csv")
for k in ("bq", "cn"):
    b, _ = read_image(f"out_{k}_1/tia/tia.nii.gz"); vb = voi(f"out_{k}_1/tia/voi.csv")
    d = [100 * (vb[s] / va[s] - 1) for s in va]
    dose, _ = read_image(f"out_{k}_1/tia/dose.nii.gz"); r, _, _ = read_rt_dose(f"out_{k}_1/dicom/rtdose.dcm")
    print(f"{k} vs NIfTI: total TIA {100 * (b.sum() / a.sum() - 1):+.4f} %, VOI TIA max |diff| {max(map(abs, d)):.3f} % "
          f"over {len(d)} VOIs; RT Dose vs its dose map max |diff| {np.abs(r - dose).max() / dose.max():.1e} of the "
          f"maximum ({dose.max():.1f} Gy)")
PY
echo "bytes of OUT/dicom: $(du -sb out_bq_1/dicom | cut -f1)"

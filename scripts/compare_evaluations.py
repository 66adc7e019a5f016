"""One method's SPECT-field error in two `corx evaluate` runs, paired over the pairs both ran.

Used to show that an engine change leaves the accuracy where it was: run the same command on the old
and on the new commit (e.g. `corx evaluate --out A --methods identity corx`), then

    .venv/bin/python scripts/compare_evaluations.py A/pairs.csv B/pairs.csv [--method corx]

prints, per region (body, organs, tumours, mean error in mm), the mean of each run, the paired
difference B minus A (mean ± standard error), the largest |difference| on one pair and how many
pairs got better / worse, and the seconds per pair of each run (median).
"""
import argparse
import csv
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "CoRXRegistration"), str(ROOT / "TIAMapping")]

from CoRXRegistrationLib.evaluation import PAIRED_ERRORS, paired_differences  # noqa: E402


def read_rows(path, method: str, label: str) -> list:
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] == method]
    if not rows:
        raise SystemExit(f"{path}: no rows of method {method!r}")
    for r in rows:
        r["method"] = label
        for key, _ in PAIRED_ERRORS:
            r[key] = float(r[key]) if r.get(key) not in (None, "") else None
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="pairs.csv of the first run (A)")
    ap.add_argument("after", help="pairs.csv of the second run (B)")
    ap.add_argument("--method", default="corx", help="the row to compare (default corx)")
    args = ap.parse_args()
    rows = read_rows(args.before, args.method, "A") + read_rows(args.after, args.method, "B")
    print(f"{args.method}: B = {args.after} minus A = {args.before}, paired over pairs\n")
    print("| region | A mean (mm) | B mean (mm) | B - A (mean ± SE) | largest abs(B - A) | better / worse in B | pairs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, name in PAIRED_ERRORS:
        d = paired_differences(rows, "B", "A", key)
        if not d.size:
            continue
        a = [r[key] for r in rows if r["method"] == "A" and r[key] is not None]
        b = [r[key] for r in rows if r["method"] == "B" and r[key] is not None]
        se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
        print(f"| {name} | {np.mean(a):.3f} | {np.mean(b):.3f} | {d.mean():+.3f} ± {se:.3f} | "
              f"{np.abs(d).max():.3f} | {int((d < 0).sum())} / {int((d > 0).sum())} | {d.size} |")
    for label, path in (("A", args.before), ("B", args.after)):
        seconds = [float(r["seconds"]) for r in read_rows(path, args.method, label)]
        print(f"\n{label}: median {statistics.median(seconds):.2f} s per pair ({len(seconds)} pairs)", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

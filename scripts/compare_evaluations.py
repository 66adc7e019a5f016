"""One method's SPECT-field error in two `corx evaluate` runs, paired over the pairs both ran.

Used to show that an engine change leaves the accuracy where it was: run the same command on the old
and on the new commit (e.g. `corx evaluate --out A --methods identity corx`), then

    .venv/bin/python scripts/compare_evaluations.py A/pairs.csv B/pairs.csv [--method corx]

prints, per region (body, organs, tumours, mean error in mm), the mean of each run over the pairs both
ran, the paired difference B minus A (mean ± standard error), the largest |difference| on one pair and
how many pairs got better / worse, and the seconds per pair of each run (median). Either side may be
several runs' pairs.csv joined by commas (e.g. one run per protocol); ``--method`` may name several rows.
``--before-method M`` takes A's rows of method M instead (e.g. a new model's network-alone row in B against
the rigid stage or ANTs SyN in A, on the same pairs). ``--dataset TEXT`` / ``--patient TEXT`` keep the pairs
whose dataset / patient column contains TEXT (e.g. ``--patient patient15``; ``--dataset "0.5, 4"`` for the
0.5–48 h protocol, ``--dataset "48, 120"`` for the 4–120 h one).
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


def read_rows(paths, method: str, label: str, dataset: str = "", patient: str = "") -> list:
    rows = []
    for path in str(paths).split(","):
        with open(path, newline="") as fh:
            rows += [r for r in csv.DictReader(fh) if r["method"] == method and dataset in r["dataset"]
                     and patient in r["patient"]]
    if not rows:
        raise SystemExit(f"{paths}: no rows of method {method!r}"
                         + (f" with dataset ~ {dataset!r} and patient ~ {patient!r}" if dataset or patient else ""))
    for r in rows:
        r["method"] = label
        for key, _ in PAIRED_ERRORS:
            r[key] = float(r[key]) if r.get(key) not in (None, "") else None
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="pairs.csv of the first run (A)")
    ap.add_argument("after", help="pairs.csv of the second run (B)")
    ap.add_argument("--method", nargs="+", default=["corx"], help="the rows to compare (default corx)")
    ap.add_argument("--before-method", help="A's rows of this method instead of --method's")
    ap.add_argument("--dataset", default="", help="only the pairs whose dataset contains this text")
    ap.add_argument("--patient", default="", help="only the pairs whose patient contains this text")
    args = ap.parse_args()
    for method in args.method:
        compare(args.before, args.after, method, args.before_method or method, args.dataset, args.patient)


def compare(before, after, method: str, before_method: str, dataset: str = "", patient: str = "") -> None:
    rows = (read_rows(before, before_method, "A", dataset, patient)
            + read_rows(after, method, "B", dataset, patient))
    both = {(r["dataset"], r["patient"], r["moving_h"]) for r in rows if r["method"] == "A"} & \
        {(r["dataset"], r["patient"], r["moving_h"]) for r in rows if r["method"] == "B"}
    rows = [r for r in rows if (r["dataset"], r["patient"], r["moving_h"]) in both]
    print(f"{method}: B = {after} minus A = {before}" + (f" ({before_method})" if before_method != method else "")
          + f", paired over the {len(both)} pairs both ran\n")
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
    for label in ("A", "B"):
        seconds = [float(r["seconds"]) for r in rows if r["method"] == label]
        print(f"\n{label}: median {statistics.median(seconds):.2f} s per pair ({len(seconds)} pairs)", end="")
    print("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

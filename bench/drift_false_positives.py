"""False positives of the drift gate: 20 unshifted windows against one reference, per method.

The reference and every current window are disjoint draws of the same rows (shuffled), so any
flagged column is a false positive. Prints, per method (Evidently's default by size, and PSI): how
many windows pass the gate, the per-column false-positive rate (flagged columns / tested columns
over all draws), its ratio to the nominal level 0.05 (K-S flags at p < 0.05; the distance
thresholds of Wasserstein and PSI have no level, 0.05 is the yardstick) and the columns flagged
most often.

Rows: the demo state's validation days (the last ``VALIDATION_DAYS`` dates of its training set)
with ``--state PATH``, else synthetic rows (independent gamma / lognormal features).

    .venv/bin/python bench/drift_false_positives.py [--state .state] [--draws 20] [--current-rows 2000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import VALIDATION_DAYS
from core.state import StateDir
from monitoring.drift import DEFAULT_MAX_DRIFT_SHARE, false_positive_rate
from monitoring.reference import DEFAULT_SAMPLE_ROWS, monitored_features

NOMINAL_LEVEL = 0.05


def validation_rows(state: StateDir) -> pd.DataFrame:
    """The monitored features of the state's validation days that its training set has (an older
    state lacks newer features; the drift job skips them too).

    Raises:
        FileNotFoundError: the state has no training set.
    """
    from pipelines.training_set import load_training_set

    frame = load_training_set(state)
    days = sorted(pd.unique(frame["date"]))[-VALIDATION_DAYS:]
    return frame.loc[frame["date"].isin(days), [f for f in monitored_features() if f in frame.columns]]


def synthetic_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` rows of independent monitored features (gamma; lognormal durations)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f: rng.gamma(2.0, 1.0, n) for f in monitored_features()})
    frame["post_duration_ms"] = rng.lognormal(10, 0.5, n)
    return frame


def measure(rows: pd.DataFrame, reference_rows: int, current_rows: int, draws: int, method: str | None) -> dict:
    """Gate passes and per-column false positives of ``draws`` unshifted windows.

    Raises:
        ValueError: too few rows for a reference and windows drawn apart from it.
    """
    rows = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
    reference_rows = min(reference_rows, len(rows) // 2)
    reference, pool = rows.iloc[:reference_rows], rows.iloc[reference_rows:]
    if len(pool) < current_rows:
        raise ValueError(f"{len(rows)} rows: too few for a {reference_rows}-row reference and "
                         f"{current_rows}-row windows")
    windows = (pool.iloc[np.random.default_rng(100 + k).choice(len(pool), current_rows, replace=False)]
               for k in range(draws))
    fp = false_positive_rate(reference, windows, method=method, max_drift_share=DEFAULT_MAX_DRIFT_SHARE)
    return {"passed": fp.passed, "rate": fp.rate, "drifted": fp.drifted, "tested": fp.tested,
            "reference_rows": reference_rows, "methods": list(fp.methods), "worst": fp.worst(4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None, help="a demo state folder (default: synthetic rows)")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--reference-rows", type=int, default=DEFAULT_SAMPLE_ROWS)
    ap.add_argument("--current-rows", type=int, default=2000)
    args = ap.parse_args()
    if args.state:
        rows = validation_rows(StateDir(Path(args.state).resolve()))
        source = f"validation rows of {args.state} ({rows.shape[1]} of {len(monitored_features())} monitored features)"
    else:
        rows = synthetic_rows(args.reference_rows + 10 * args.current_rows)
        source = "synthetic rows"
    print(f"{len(rows)} {source}; {args.draws} unshifted windows of {args.current_rows} rows; "
          f"gate {DEFAULT_MAX_DRIFT_SHARE}; nominal level {NOMINAL_LEVEL}")
    print(f"{'method':<8} {'ref rows':>8} {'gate pass':>9} {'FP rate':>8} {'/ nominal':>9} {'s':>5}  tests; most flagged")
    for method in (None, "psi"):
        t0 = time.perf_counter()
        r = measure(rows, args.reference_rows, args.current_rows, args.draws, method)
        print(f"{method or 'default':<8} {r['reference_rows']:>8} {r['passed']:>4}/{args.draws:<4} {r['rate']:8.4f} "
              f"{r['rate'] / NOMINAL_LEVEL:8.2f}x {time.perf_counter() - t0:5.1f}  "
              f"{', '.join(r['methods'])}; {r['worst']}")


if __name__ == "__main__":
    main()

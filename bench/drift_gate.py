"""The drift gate on real days and injected faults: false-positive and detection rates.

Every day of the state's training set from the third on is gated as the drift job gates a window
(``monitoring.drift_eval.evaluate_gate``): against a training reference of every earlier day and
a recent reference of the day before, features in their declared forms
(``monitoring.drift_forms``). Faults of every kind (``FAULT_KINDS``: x 10, / 1000, 20 % nulls,
frozen at the values of 3 days before, 30 % of requests moved to another surface, dropped) are
injected into each day that has 3 earlier days, one feature at a time, over ``FAULT_FEATURES``.
Prints the rates against the targets (false positives <= 5 % of normal days, >= 95 % of faults
detected), the gate as it was (raw features against the training reference, drift share only)
next to it, and each normal day; writes the JSON (``--out``).

    .venv/bin/python bench/drift_gate.py --state .state [--out drift_gate.json] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from core.state import StateDir
from home_mixer.drift_job import served_rows
from monitoring.drift_eval import evaluate_gate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=".state", help="a demo state folder (its training set)")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--fault-days", type=int, default=None, help="inject on the last N evaluated days only")
    ap.add_argument("--seed", type=int, default=0, help="of the reference sample, the tests' samples and the faults")
    args = ap.parse_args()
    rows, origin = served_rows(StateDir(Path(args.state).resolve()))
    days = sorted(pd.unique(rows["date"]))
    print(f"{len(rows)} served rows, days {days[0]}..{days[-1]}; history origin {origin}")
    result = evaluate_gate(rows, origin, fault_days=args.fault_days, seed=args.seed,
                           log=lambda line: print(f"  {line}", flush=True))
    print(result.to_table())
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=1, default=float))
        print(f"json: {args.out}")


if __name__ == "__main__":
    main()

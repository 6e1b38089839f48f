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

    .venv/bin/python bench/drift_gate.py --state .state [--out drift_gate.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from core.state import StateDir
from monitoring.drift_eval import evaluate_gate
from monitoring.drift_forms import history_origin
from monitoring.reference import monitored_features

# what the evaluation reads of a training set besides the features
CONTEXT_COLUMNS = ("date", "request_ts", "user_id", "post_id", "author_id", "tag_id")


def served_rows(state: StateDir) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The state's training set (features as served) with the evaluation's columns, and the
    history origin (the local day of the log's first impression).

    Raises:
        FileNotFoundError: the state has no training set (run ``home-mixer features build``).
    """
    from pipelines.training_set import load_training_set, log_span

    frame = load_training_set(state)
    columns = [c for c in (*CONTEXT_COLUMNS, *monitored_features()) if c in frame.columns]
    return frame[columns], history_origin(pd.Timestamp(log_span(state)[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=".state", help="a demo state folder (its training set)")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--fault-days", type=int, default=None, help="inject on the last N evaluated days only")
    args = ap.parse_args()
    rows, origin = served_rows(StateDir(Path(args.state).resolve()))
    days = sorted(pd.unique(rows["date"]))
    print(f"{len(rows)} served rows, days {days[0]}..{days[-1]}; history origin {origin}")
    result = evaluate_gate(rows, origin, fault_days=args.fault_days, log=lambda line: print(f"  {line}", flush=True))
    print(result.to_table())
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=1, default=float))
        print(f"json: {args.out}")


if __name__ == "__main__":
    main()

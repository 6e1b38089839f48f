"""A state folder built from the first rows of the real log: canonical tables and Spark features."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.state import StateDir
from home_mixer import jobs


def slice_state(root: Path, spark, data_dir: Path, rows: int) -> StateDir:
    """Write the log's first ``rows`` rows to ``root/log_slice.csv``, then build ``root/state``:
    validated canonical tables and the four offline feature tables (Spark)."""
    log = root / "log_slice.csv"
    pd.read_csv(data_dir / "log_standard_20220425_20220504.csv", nrows=rows).to_csv(log, index=False)
    state = StateDir(root / "state").ensure()
    jobs.prepare_data(state, data_dir, log_paths=[log])
    jobs.build_features(spark, state)
    return state

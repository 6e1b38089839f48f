"""The batch jobs on a real Spark standalone cluster (issue 21, must-have 4).

``home-mixer services start spark`` starts a master and a worker from the pyspark wheel; the
offline feature job then runs on it from another process (``--spark-master``: a process has one
Spark session, and the test session's is local) and writes the same feature tables as local mode.
The CLI's status and stop are checked on the way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from core.schema import FEATURE_VIEWS
from core.spark_services import SparkMaster, SparkWorker
from core.state import PROJECT_ROOT, StateDir
from tests.integration._slice_state import slice_state

pytestmark = pytest.mark.integration

SLICE_ROWS = 2000

JOB = """
import sys
from pathlib import Path
from core.state import StateDir
from home_mixer import jobs
from pipelines.spark import spark_session
spark = spark_session("standalone-test")
assert spark.sparkContext.master.startswith("spark://"), spark.sparkContext.master
print(jobs.build_features(spark, StateDir(Path(sys.argv[1]))))
"""


def _cli(state: StateDir, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "home_mixer.cli", "--state", str(state.root), *argv],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)


def test_the_feature_job_on_a_standalone_cluster_writes_what_local_mode_writes(tmp_path, spark, data_dir):
    (tmp_path / "local").mkdir()
    local = slice_state(tmp_path / "local", spark, data_dir, SLICE_ROWS)
    remote = StateDir(tmp_path / "remote").ensure()
    features = {spec.table for spec in FEATURE_VIEWS}
    for src in local.tables.iterdir():  # the canonical tables the feature job reads
        if src.name.removesuffix(".parquet") not in features:
            (shutil.copytree if src.is_dir() else shutil.copy)(src, remote.tables / src.name)
    try:
        started = _cli(remote, "services", "start", "spark", "--workers", "1", "--worker-memory", "1g")
        assert started.returncode == 0, started.stdout + started.stderr
        master = SparkMaster.running(remote)
        assert master is not None and len(master.alive_workers()) == 1
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        job = subprocess.run([sys.executable, "-c", JOB, str(remote.root)], capture_output=True, text=True,
                             cwd=PROJECT_ROOT, timeout=420,
                             env={**env, "HOME_MIXER_SPARK_MASTER": master.url})
        assert job.returncode == 0, job.stderr[-3000:]
        status = _cli(remote, "services", "status", "spark", "--json")
        assert status.returncode == 0 and '"alive_workers": 1' in status.stdout
    finally:
        stopped = _cli(remote, "services", "stop", "spark")
    assert "spark_master" in stopped.stdout and SparkMaster.find(remote) is None
    assert SparkWorker.find(remote, index=0) is None
    for spec in FEATURE_VIEWS:
        key = [*spec.join_keys, "event_timestamp"]
        a = pd.read_parquet(local.table(spec.table)).sort_values(key).reset_index(drop=True)
        b = pd.read_parquet(remote.table(spec.table)).sort_values(key).reset_index(drop=True)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b[a.columns], check_exact=False, rtol=1e-12, obj=spec.table)

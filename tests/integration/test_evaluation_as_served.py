"""Evaluation as served: a per-impression feature that leaks the label order scores well when
impressions are grouped by user with features joined at each impression, and at chance when they
are grouped into requests with the features serving had (frozen at the last materialisation).

The crafted log is run through the real path: canonical tables -> Spark feature jobs -> Feast
apply -> the point-in-time join (Feast's Spark offline store).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from core.state import StateDir
from feature_repo import store as fs
from home_mixer import jobs
from models import metrics as M
from pipelines.training_set import served_feature_rows
from tests.integration.test_spark_features import PRIORS, impression, post_row, user_row, write_canonical

pytestmark = pytest.mark.integration

START = pd.Timestamp("2022-04-26T10:02:00Z")
USERS = 40
PER_USER = 8


@pytest.fixture(scope="module")
def joined(spark, redis_server, tmp_path_factory):
    """Old join (each impression at its own time) and the served join, over one crafted log.

    Every user has one request: 8 impressions a minute apart inside one hour, exactly one liked,
    at a random position. A user's like rate, updated after every impression, is lowest on the
    liked row: the rows after it carry the like.
    """
    rng = np.random.default_rng(11)
    impressions, liked = [], {}
    for u in range(1, USERS + 1):
        liked[u] = int(rng.integers(1, PER_USER - 1))
        for i in range(PER_USER):
            t = START + pd.Timedelta(minutes=i) + pd.Timedelta(seconds=u)
            impressions.append(impression(u, 100 + i, 900 + i % 2, t, click=int(i % 3 == 0),
                                          like=int(i == liked[u])))
    state = StateDir(tmp_path_factory.mktemp("as_served")).ensure()
    write_canonical(state, impressions, [user_row(u) for u in range(1, USERS + 1)],
                    [post_row(100 + i, 900 + i % 2) for i in range(PER_USER)])
    jobs.build_features(spark, state, priors=PRIORS)
    store = fs.open_store(state, redis_server.feast_connection_string)
    fs.apply(store, state.tables)
    imp = spark.read.parquet(str(state.table("impressions")))
    tags = spark.read.parquet(str(state.table("posts"))).selectExpr("post_id", "primary_tag AS tag_id")
    old = fs.historical_features(store, imp.join(tags, "post_id").select(
        "user_id", "post_id", "author_id", "tag_id", imp["event_ts"].alias("event_timestamp"), *HEADS))
    served = served_feature_rows(spark, store, imp, pd.read_parquet(state.table("posts")))
    return old, served


def test_a_leaking_feature_scores_well_by_user_and_at_chance_by_request(joined):
    old, served = joined
    assert len(old) == len(served) == USERS * PER_USER
    # old grouping: per user, features of each impression's own time
    leak_old = -old["user_like_rate"].to_numpy(dtype=float)
    assert M.gauc(old["like"].to_numpy(), leak_old, old["user_id"].to_numpy()) > 0.95
    # new grouping: per request, features as the online store had them at the request's start
    assert served["request_id"].nunique() == USERS
    leak_new = -served["user_like_rate"].to_numpy(dtype=float)
    assert M.gauc(served["like"].to_numpy(), leak_new, served["request_id"].to_numpy()) == pytest.approx(0.5)
    parts = M.group_aucs(served["like"].to_numpy(), leak_new, served["request_id"].to_numpy())
    assert len(parts) == USERS and (parts["auc"] == 0.5).all()


def test_served_rows_freeze_features_at_the_last_materialisation(joined):
    _, served = joined
    assert (served["feature_ts"] == START.floor("h")).all()
    assert (served["request_ts"] <= served["event_timestamp"]).all()
    # one value per request for every user feature, and it is the value before the request
    per_request = served.groupby("request_id")["user_impressions"].nunique(dropna=False)
    assert (per_request == 1).all()
    assert served["user_impressions"].isna().all() or (served["user_impressions"].fillna(0) == 0).all()
    # request-time features are computed at the request's start, as the mixer computes them
    local_hour = (served["request_ts"] + pd.Timedelta(hours=8)).dt.hour
    assert (served["req_hour_of_day"] == local_hour).all()

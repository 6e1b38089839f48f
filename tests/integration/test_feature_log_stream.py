"""Feature logging against a real Redis: the capped stream, read back and labelled by
``pipelines.logged_features``, the empty-stream error, and the stream's cap. (Its CPU per page is
measured by ``bench/feature_log.py``.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import online_layout as keys
from core.schema import ALL_FEATURES, HEADS
from mixer.candidate import Candidate, Query
from mixer.components import TimelineResult
from mixer.side_effects import FeatureLogSideEffect
from pipelines.logged_features import EmptyFeatureLogError, join_engagement_labels, logged_training_set, read_feature_log

pytestmark = pytest.mark.integration

F = len(ALL_FEATURES)
T0 = pd.Timestamp("2022-04-28T10:00:00.123Z")


def _result(user: int, posts: list[int], now: pd.Timestamp, rid: str, rng) -> tuple[TimelineResult, pd.DataFrame]:
    cands = [Candidate(p, "popular", author_id=p + 1000) for p in posts]
    frame = pd.DataFrame(rng.normal(size=(len(posts), F)), columns=list(ALL_FEATURES))
    frame.iloc[0, 2] = np.nan
    q = Query(user_id=user, page_size=len(posts), now_s=now.timestamp(), request_id=rid, surface=0)
    return TimelineResult(q, cands[::-1], None, {}, [], {}, {}, {"light_ranker": "3", "heavy_ranker": "5"},
                          ranked=cands, features=frame), frame


def test_logged_rows_read_back_and_labelled(redis_client):
    rng = np.random.default_rng(5)
    with pytest.raises(EmptyFeatureLogError, match="empty"):
        read_feature_log(redis_client)
    effect = FeatureLogSideEffect(redis_client, maxlen=1000)
    r1, f1 = _result(7, [10, 11, 12], T0, "a" * 32, rng)
    r2, f2 = _result(8, [11, 13], T0 + pd.Timedelta(minutes=5), "b" * 32, rng)
    effect.apply(r1)
    effect.apply(r2)
    logged = read_feature_log(redis_client, batch=2)  # several XRANGE pages
    assert len(logged) == 5 and list(logged["post_id"]) == [12, 11, 10, 13, 11]
    assert (logged["as_of"].iloc[:3] == T0).all() and (logged["surface"] == 0).all()
    np.testing.assert_array_equal(logged[list(ALL_FEATURES)].to_numpy()[:3], f1.to_numpy()[::-1])
    np.testing.assert_array_equal(logged[list(ALL_FEATURES)].to_numpy()[3:], f2.to_numpy()[::-1])

    imp = pd.DataFrame({
        "user_id": [7, 7, 7, 8, 8], "post_id": [10, 11, 12, 13, 11],
        "event_ts": [T0 + pd.Timedelta(seconds=30), T0 - pd.Timedelta(seconds=1),  # before the serve: no label
                     T0 + pd.Timedelta(hours=2),  # after the window
                     T0 + pd.Timedelta(minutes=6), T0 + pd.Timedelta(minutes=5)],  # at the serve: labels
        "date": [20220428] * 5, "tab": [0] * 5, **{h: [1, 0, 1, 0, 1] for h in HEADS}})
    ts = join_engagement_labels(logged, imp, window_s=3600)
    assert list(zip(ts["user_id"], ts["post_id"])) == [(7, 10), (8, 11), (8, 13)]
    assert list(ts["click"]) == [1, 1, 0] and ts["request_id"].nunique() == 2
    np.testing.assert_array_equal(ts.loc[ts.post_id == 10, list(ALL_FEATURES)].to_numpy()[0], f1.to_numpy()[0])
    with pytest.raises(EmptyFeatureLogError, match="none of the 5 logged serves"):
        logged_training_set(redis_client, imp.assign(event_ts=T0 - pd.Timedelta(days=1)))


def test_feature_log_is_capped(redis_client):
    rng = np.random.default_rng(6)
    effect = FeatureLogSideEffect(redis_client, maxlen=200)
    result, _ = _result(9, list(range(100, 120)), T0, "c" * 32, rng)
    for _ in range(220):
        effect.apply(result)
    assert 200 <= redis_client.xlen(keys.SERVED_FEATURES) < 20 * 220  # MAXLEN ~ 200, 4,400 written

"""``served_feature_rows`` passes each request's surface (the log's ``tab``) to the request features,
and reads a log without ``tab`` as all home surface. Spark and Feast are stubbed: the point-in-time
join itself is covered by tests/integration/test_feast_store.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.request_features import surface_indicators
from core.schema import HEADS, HOME_SURFACE, SURFACE_FEATURES
from pipelines import training_set


class FakeSparkFrame:
    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self.columns = list(frame.columns)

    def select(self, *cols):
        return FakeSparkFrame(self.frame[list(cols)])

    def toPandas(self):
        return self.frame.copy()


class FakeSpark:
    def createDataFrame(self, frame):
        return frame


def _impressions(with_tab: bool) -> pd.DataFrame:
    t0 = pd.Timestamp("2022-05-01T03:00:00Z")
    rows = pd.DataFrame({
        "user_id": [1, 1, 1, 2, 2, 3],
        "post_id": [10, 11, 12, 10, 13, 14],
        "author_id": [100, 101, 102, 100, 103, 104],
        "event_ts": [t0, t0 + pd.Timedelta(minutes=1), t0 + pd.Timedelta(minutes=2), t0, t0, t0],
        "date": 20220501,
        **{h: 0 for h in HEADS},
    })
    if with_tab:
        rows["tab"] = [1, 1, 0, 4, 9, 6]
    return rows


# posts 10..15 (the fixture's), one without a tag
POSTS = pd.DataFrame({"post_id": range(10, 16), "primary_tag": [3, 3, 5, -1, 7, 7]})


@pytest.fixture()
def no_feast(monkeypatch):
    def historical_features(store, entity):
        return entity.assign(post_created_ts=1651000000, tmp_last_impression_ts=np.nan)

    monkeypatch.setattr(training_set.fs, "historical_features", historical_features)


def test_each_row_gets_its_requests_surface(no_feast):
    out = training_set.served_feature_rows(FakeSpark(), None, FakeSparkFrame(_impressions(True)), POSTS)
    expected = surface_indicators(out["tab"], len(out))
    for col in SURFACE_FEATURES:
        np.testing.assert_array_equal(out[col].to_numpy(), expected[col], err_msg=col)
    row = out.set_index(["user_id", "post_id"])
    assert row.loc[(1, 12), "req_surface_0"] == 1.0 and row.loc[(2, 13), "req_surface_other"] == 1.0
    assert (out[list(SURFACE_FEATURES)].sum(axis=1) == 1.0).all()


def test_a_log_without_tab_is_the_home_surface(no_feast):
    out = training_set.served_feature_rows(FakeSpark(), None, FakeSparkFrame(_impressions(False)), POSTS)
    assert (out["tab"] == HOME_SURFACE).all()
    assert (out[f"req_surface_{HOME_SURFACE}"] == 1.0).all()
    assert (out[list(SURFACE_FEATURES)].sum(axis=1) == 1.0).all()


def test_rows_get_their_posts_primary_tag_and_id_buckets(no_feast):
    from core.id_features import id_bucket_columns

    out = training_set.served_feature_rows(FakeSpark(), None, FakeSparkFrame(_impressions(True)), POSTS)
    tags = dict(zip(POSTS["post_id"], POSTS["primary_tag"]))
    assert out["tag_id"].tolist() == [tags[p] for p in out["post_id"]]
    assert (out["tag_id"] == -1).sum() == 1  # post 13 has no tag
    expected = id_bucket_columns(out["user_id"].to_numpy(), out["post_id"].to_numpy(), out["author_id"].to_numpy())
    for col, values in expected.items():
        np.testing.assert_array_equal(out[col].to_numpy(), values, err_msg=col)
        assert (values >= 1).all()

"""RealtimeFeatureHydrator on a real redis-server: stream counts written by the real processor
replace the batch content counts, merged by coverage, and the 24 h rates keep the batch prior."""

import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from core import online_layout as keys
from core.schema import ALL_FEATURES, SMOOTHING_M
from mixer.candidate import Candidate, Query
from mixer.feature_hydrators.realtime import (RealtimeFeatureHydrator, StaleStreamError, merge_window,
                                              recover_prior)
from pipelines.streaming.bus import RedisStreamsBus
from pipelines.streaming.events import EngagementEvent
from pipelines.streaming.processor import StreamProcessor

pytestmark = pytest.mark.integration

H = 1_651_406_400.0  # 2022-05-01 12:00:00 UTC, an hour boundary
PRIOR_CLICK, PRIOR_LONG_VIEW = 0.3, 0.2


def _frame(posts: list[int]) -> pd.DataFrame:
    """A batch frame with distinct counts per post and rates smoothed with the known priors."""
    f = pd.DataFrame(np.nan, index=range(len(posts)), columns=list(ALL_FEATURES))
    for i, p in enumerate(posts):
        for j, kind in enumerate(("impressions", "clicks", "long_views", "likes")):
            f.loc[i, f"post_{kind}_1h"] = 10.0 * (i + 1) / (j + 1)
            f.loc[i, f"post_{kind}_24h"] = 100.0 * (i + 1) / (j + 1)
        n = f.loc[i, "post_impressions_24h"]
        f.loc[i, "post_click_rate_24h"] = (f.loc[i, "post_clicks_24h"] + PRIOR_CLICK * SMOOTHING_M) / (n + SMOOTHING_M)
        f.loc[i, "post_long_view_rate_24h"] = ((f.loc[i, "post_long_views_24h"] + PRIOR_LONG_VIEW * SMOOTHING_M)
                                               / (n + SMOOTHING_M))
        f.loc[i, "post_like_rate_7d"] = 0.05
    return f


def _events(post: int, start: float, n: int):
    ts = lambda k: datetime.fromtimestamp(start + 7.0 * k, tz=timezone.utc)  # noqa: E731
    out = []
    for k in range(n):
        out.append(EngagementEvent(event_id=f"{post}:{k}:i", kind="impression", user_id=k, post_id=post,
                                   author_id=1, event_ts=ts(k)))
        if k % 2 == 0:
            out.append(EngagementEvent(event_id=f"{post}:{k}:c", kind="click", user_id=k, post_id=post,
                                       author_id=1, event_ts=ts(k)))
    return out


def test_merge_and_prior_helpers():
    batch = np.array([60.0, np.nan])
    # the stream started 20 min into the window: 20/60 of the batch count stands for [s, T0)
    got = merge_window(np.array([5.0, 2.0]), batch, window_start_s=0.0, window_s=3600.0, coverage_since_s=1200.0)
    assert got == pytest.approx([25.0, 2.0])
    assert merge_window(np.array([5.0]), np.array([60.0]), 0.0, 3600.0, coverage_since_s=-1.0) == pytest.approx([5.0])
    assert merge_window(np.array([5.0]), np.array([60.0]), 0.0, 3600.0, coverage_since_s=9e9) == pytest.approx([65.0])
    k, n = np.array([3.0, 40.0, np.nan]), np.array([10.0, 100.0, 5.0])
    assert recover_prior((k + 0.25 * SMOOTHING_M) / (n + SMOOTHING_M), k, n) == pytest.approx(0.25)
    assert np.isnan(recover_prior(np.array([np.nan]), np.array([1.0]), np.array([2.0])))


def test_stream_counts_replace_batch_counts_merged_by_coverage(redis_client):
    bus = RedisStreamsBus(redis_client)
    t0 = H - 1800.0  # the stream covers the last 30 min of the hour before H
    events = _events(10, t0, 200) + _events(11, H - 600.0, 20)  # post 12: no stream data
    for e in events:
        bus.publish("engagements", e)
    StreamProcessor(redis_client, bus, clock=lambda: H).run_once(count=1000)

    posts = [10, 11, 12, 10]
    cands = [Candidate(post_id=p, source="x", author_id=1) for p in posts]
    query = Query(user_id=5, page_size=10, now_s=H, request_id="r")
    batch = _frame(posts)
    hydrator = RealtimeFeatureHydrator(redis_client)
    out = hydrator.hydrate(query, cands, batch)

    def stream_count(post, kind, window_s):
        return sum(1 for e in events if e.post_id == post and e.kind == kind
                   and H - window_s <= e.event_ts.timestamp() < H)

    for i, p in enumerate(posts):
        for name, kind in (("impressions", "impression"), ("clicks", "click")):
            # 1 h window [H-1h, H): the stream covers its second half, the batch stands for the first
            want_1h = stream_count(p, kind, 3600) + batch.loc[i, f"post_{name}_1h"] * 0.5
            want_24h = stream_count(p, kind, 86400) + batch.loc[i, f"post_{name}_24h"] * (1 - 1800 / 86400)
            assert out.loc[i, f"post_{name}_1h"] == pytest.approx(want_1h), (p, name)
            assert out.loc[i, f"post_{name}_24h"] == pytest.approx(want_24h), (p, name)
        n = out.loc[i, "post_impressions_24h"]
        assert out.loc[i, "post_click_rate_24h"] == pytest.approx(
            (out.loc[i, "post_clicks_24h"] + PRIOR_CLICK * SMOOTHING_M) / (n + SMOOTHING_M))
        assert out.loc[i, "post_long_view_rate_24h"] == pytest.approx(
            (out.loc[i, "post_long_views_24h"] + PRIOR_LONG_VIEW * SMOOTHING_M) / (n + SMOOTHING_M))
    assert stream_count(10, "click", 3600) == 100  # the case is not trivial
    assert out.loc[0, "post_click_rate_24h"] > batch.loc[0, "post_click_rate_24h"]
    # untouched features and the input frame
    pd.testing.assert_series_equal(out["post_like_rate_7d"], batch["post_like_rate_7d"])
    assert batch.loc[0, "post_clicks_1h"] == 10.0 / 2

    # once the stream covers the whole window, the batch value no longer counts
    late = Query(user_id=5, page_size=10, now_s=t0 + 3600.0 + 1.0, request_id="r")
    out = hydrator.hydrate(late, cands[:1], _frame([10]))
    assert out.loc[0, "post_impressions_1h"] == sum(
        1 for e in events if e.post_id == 10 and e.kind == "impression" and e.event_ts.timestamp() >= t0 + 300)


def test_no_stream_data_leaves_the_frame_unchanged(redis_client):
    cands = [Candidate(post_id=3, source="x", author_id=1)]
    batch = _frame([3])
    out = RealtimeFeatureHydrator(redis_client).hydrate(Query(user_id=5, page_size=10, now_s=H, request_id="r"),
                                                        cands, batch)
    pd.testing.assert_frame_equal(out, batch)


def test_a_processor_that_stopped_catching_up_leaves_the_batch_values(redis_client):
    """A stopped processor's counts are short of the truth: past max_staleness_s (Redis clock) the
    hydrator refuses them (the pipeline then keeps the batch values, degraded "realtime_features").
    The request clock plays no part: it is 2022 here, years behind the stamps."""
    bus = RedisStreamsBus(redis_client)
    for e in _events(10, H - 3 * 3600.0, 30):  # engagements 3 h before the request time
        bus.publish("engagements", e)
    processor = StreamProcessor(redis_client, bus, clock=lambda: H, stamp_every_s=0.0)
    processor.run_once(count=1000)
    processor.run_once(count=1000)  # an empty read: stamped with the server time
    cands = [Candidate(post_id=10, source="x", author_id=1)]
    query = Query(user_id=5, page_size=10, now_s=H, request_id="r")
    hydrator = RealtimeFeatureHydrator(redis_client, max_staleness_s=2.0)
    # live: the 1 h count is the stream's (no events in the last hour), no longer the batch's
    assert hydrator.hydrate(query, cands, _frame([10])).loc[0, "post_impressions_1h"] == 0.0
    # the processor stops while producers go on
    bus.publish("engagements", _events(11, H - 60.0, 1)[0])
    time.sleep(2.5)
    with pytest.raises(StaleStreamError, match=r"last caught up [\d.]+ s ago \(limit 2 s\)"):
        hydrator.hydrate(query, cands, _frame([10]))
    processor.run_once(count=1000)  # back: it applies the waiting event (stamped up to it) ...
    processor.run_once(count=1000)  # ... and its next read, empty, stamps the server time
    assert hydrator.hydrate(query, cands, _frame([10])).loc[0, "post_impressions_1h"] == 0.0
    # a stamp ahead of the Redis clock (the clock stepped back) proves nothing; the next stamp fixes it
    secs, _ = redis_client.time()
    redis_client.hset(keys.RT_COVERAGE, "caught_up", secs + 3600)
    with pytest.raises(StaleStreamError, match="ahead of the Redis clock"):
        hydrator.hydrate(query, cands, _frame([10]))
    processor.run_once(count=1000)
    assert hydrator.hydrate(query, cands, _frame([10])).loc[0, "post_impressions_1h"] == 0.0
    with pytest.raises(ValueError, match="max_staleness_s"):
        RealtimeFeatureHydrator(redis_client, max_staleness_s=0)

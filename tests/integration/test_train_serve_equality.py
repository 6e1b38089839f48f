"""Train as served, checked end to end: the features the mixer logs for a replayed request equal the
training-set row of that request (real Spark feature jobs, real Feast offline join and
``feast materialize`` into a real Redis, the mixer pipeline in-process with feature logging on).

On a slice of the real KuaiRand log: the online store is materialised up to the hour H, a logged
request that starts in [H, H + 1 h) is replayed (the mixer clock at the request's start, its
surface, real-time features off), a test candidate source puts the request's logged posts among
the candidates (next to the real sources), and every served post of that request is read back from
the feature-log stream and compared with ``served_feature_rows`` for the same impression: every
column of ``ALL_FEATURES``, NaN == NaN, floats within 1e-9 relative. Then ``logged_training_set``
turns the same log entries into labelled training rows equal to the offline ones.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import redis

from core import online_layout as keys
from core.schema import ALL_FEATURES, HEADS
from feature_repo import store as fs
from home_mixer import jobs
from mixer.candidate import Candidate
from mixer.components import CandidateSource
from mixer.config import load_config, parse_config
from mixer.metrics import MixerMetrics
from mixer.pipeline import build_pipeline, home_timeline, HomeTimelinePipeline, RankerSet
from pipelines.logged_features import logged_training_set, read_feature_log

from tests.integration._slice_state import slice_state

pytestmark = pytest.mark.integration

SLICE_ROWS = 8000
DB = 6  # own Redis database: other modules flush db 0


@dataclasses.dataclass
class ConstantRanker:
    """A ranker handle scoring every row alike: this test checks features, not scores."""

    feature_names: tuple
    heads: tuple
    version: str = "1"

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return np.full((len(frame), len(self.heads)), 0.5, dtype=np.float32)


class LoggedPosts(CandidateSource):
    """The posts the log shows this request served (test source, first in priority order)."""

    name, timeout_ms = "logged_request", 5000.0

    def __init__(self, user_id: int, post_ids: list[int]):
        self.user_id, self.post_ids = user_id, post_ids

    def fetch(self, query):
        if query.user_id != self.user_id:
            return []
        return [Candidate(post_id=int(p), source=self.name) for p in self.post_ids]


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark, redis_server, data_dir):
    state = slice_state(tmp_path_factory.mktemp("train_serve"), spark, data_dir, SLICE_ROWS)
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = fs.open_store(state, f"{redis_server.feast_connection_string},db={DB}")
    fs.apply(store, state.tables)
    ts = jobs.training_set(spark, store, state)
    yield state, store, ts, url, client
    client.close()


def _pick_requests(ts: pd.DataFrame, imp: pd.DataFrame, n: int = 6) -> tuple[pd.Timestamp, list[pd.DataFrame]]:
    """The hour H and up to ``n`` requests starting in [H, H+1h), of distinct users with history
    before H: those with the most distinct posts the user had not seen before H (the
    previously-seen filter would rightly drop the others)."""
    ts = ts.assign(hour=ts["request_ts"].dt.floor("h"))
    first_seen = imp.groupby(["user_id", "post_id"])["event_ts"].min().rename("first_seen").reset_index()
    first_seen["first_seen"] = pd.to_datetime(first_seen["first_seen"], utc=True)
    ts = ts.merge(first_seen, on=["user_id", "post_id"], how="left")
    fresh = ts[(ts["first_seen"] >= ts["hour"]) & ts["user_impressions"].notna() & (ts["user_impressions"] > 0)]
    hours = sorted(fresh["hour"].unique())
    assert len(hours) >= 3
    hour = hours[len(hours) // 2]  # a middle hour: users have history, the index has posts
    in_hour = fresh[fresh["hour"] == hour]
    sizes = in_hour.groupby(["request_id", "user_id"])["post_id"].nunique().reset_index()
    sizes = sizes.sort_values("post_id", ascending=False, kind="stable").drop_duplicates("user_id").head(n)
    return pd.Timestamp(hour), [ts[ts["request_id"] == r].drop(columns=["hour", "first_seen"])
                                for r in sizes["request_id"]]


def test_logged_features_of_replayed_requests_equal_their_training_rows(built, spark):
    state, store, ts, url, client = built
    imp = pd.read_parquet(state.table("impressions"))
    hour, requests = _pick_requests(ts, imp)
    assert len(requests) >= 3

    from pipelines.candidate_index import CanonicalTables, build_candidate_index, build_coengagement
    from pipelines.features.common import BASE_ROW_TS

    fs.materialize(store, min(BASE_ROW_TS.to_pydatetime(), jobs.log_span(state)[0]), hour.to_pydatetime())
    # the index holds the co-engagement neighbours of the day's build (training rows read the same)
    tables = CanonicalTables.load(state)
    neighbours = build_coengagement(spark, tables, hour.floor("D"), log=None)
    build_candidate_index(state, url, hour, tables=tables, coengagement=neighbours)
    compared = 0
    for request in requests:
        compared += _replay_and_compare(client, url, hour, request, imp)
    print(f"train/serve equality at H = {hour}: {len(requests)} requests, {compared} served posts x "
          f"{len(ALL_FEATURES)} features = {compared * len(ALL_FEATURES)} values equal")
    assert compared >= 10

    # training from the log: the same serves labelled by their impressions equal the offline rows
    # (the pages also served the real sources' posts: only the replayed requests' posts are compared;
    # the first impression after the serve is the request's own, inside its request)
    labelled = logged_training_set(client, imp, window_s=6 * 3600)
    offline = pd.concat(requests).sort_values("event_timestamp", kind="stable").drop_duplicates(["user_id", "post_id"])
    both = labelled.merge(offline, on=["user_id", "post_id"], suffixes=("", "_offline"))
    assert len(both) == compared and both["serve_request_id"].nunique() == len(requests)
    assert (both["event_timestamp"] == both["event_timestamp_offline"]).all()
    for h in HEADS:
        assert (both[h].to_numpy() == both[f"{h}_offline"].to_numpy()).all(), h
    np.testing.assert_allclose(both[list(ALL_FEATURES)].to_numpy(),
                               both[[f"{f}_offline" for f in ALL_FEATURES]].to_numpy(), rtol=1e-9, atol=0,
                               equal_nan=True)
    assert client.type(keys.SERVED_FEATURES) == b"stream"


def _stream_engagements(client, imp: pd.DataFrame, user: int, since: pd.Timestamp, until: pd.Timestamp) -> int:
    """What the stream processor would have applied for ``user`` between the index build and the
    request (the user action sequence grows with live engagements): the real processor applies the
    user's engagements in [since, until). Returns how many events it applied."""
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.events import EngagementEvent
    from pipelines.streaming.processor import StreamProcessor

    ts = pd.to_datetime(imp["event_ts"], utc=True)
    rows = imp[(imp["user_id"] == user) & (ts >= since) & (ts < until)]
    bus = RedisStreamsBus(client)
    n = 0
    for r in rows.itertuples(index=False):
        for kind in ("click", "long_view", "like", "follow", "comment", "forward"):
            if getattr(r, kind):
                at = pd.Timestamp(r.event_ts).tz_convert("UTC")
                bus.publish("engagements", EngagementEvent(
                    event_id=f"{user}-{r.post_id}-{at.value}-{kind}", kind=kind, user_id=user, post_id=int(r.post_id),
                    author_id=int(r.author_id), event_ts=at.to_pydatetime()))
                n += 1
    if n:
        proc = StreamProcessor(client, bus, clock=lambda: until.timestamp())
        while proc.run_once(count=100, block_ms=10):
            pass
        assert proc.stats["applied"] == n
    return n


def _replay_and_compare(client, url: str, hour: pd.Timestamp, request: pd.DataFrame, imp: pd.DataFrame) -> int:
    """Serve ``request``'s user at its start and surface, after the stream processor applied the
    user's engagements since the index build; compare its logged served rows with the training
    rows. Returns the number of posts compared (asserts every feature equal)."""
    from core.online_layout import FeastRedisLayout
    from core.schema import LIGHT_RANKER_FEATURES
    from mixer.feature_hydrators import FeastLayoutFeatureHydrator

    user = int(request["user_id"].iloc[0])
    start = request["request_ts"].iloc[0]
    surface = int(request["tab"].iloc[0])
    assert (request["feature_ts"] == hour).all() and hour <= start < hour + pd.Timedelta(hours=1)
    _stream_engagements(client, imp, user, hour, start)
    data = load_config().model_dump()
    data.update(redis_url=url, clock={"now": start.isoformat()}, realtime={"enabled": False},
                page={"default_size": 100, "max_size": 100},
                filters={**data["filters"], "max_posts_per_author": 100})
    for name in ("in_network", "tag_interest", "popular"):
        data["candidate_sources"][name]["max_candidates"] = 20
    config = parse_config(data)
    light = ConstantRanker(tuple(LIGHT_RANKER_FEATURES), ("engaged",))
    heavy = ConstantRanker(tuple(ALL_FEATURES), tuple(HEADS), "2")
    posts = list(dict.fromkeys(request["post_id"].astype(int)))
    hydrator = FeastLayoutFeatureHydrator(client, FeastRedisLayout("home_mixer"))
    metrics = MixerMetrics()

    def declare(rankers: RankerSet):
        p = home_timeline(config, rankers, client=client, feature_hydrator=hydrator, metrics=metrics)
        return dataclasses.replace(p, candidate_sources=[LoggedPosts(user, posts), *p.candidate_sources])

    with ThreadPoolExecutor(4) as pool:
        base = build_pipeline(config, client=client, light=light, heavy=heavy, feature_hydrator=hydrator,
                              executor=pool, metrics=metrics)
        pipeline = HomeTimelinePipeline(config=config, declare=declare, rankers=base.rankers, executor=pool,
                                        metrics=metrics)
        result = pipeline.run(user, 100, surface=surface)
    assert not result.degraded
    served = {c.post_id for c in result.items}
    compared_posts = [p for p in posts if p in served]
    # the request's first logged post must be served (the test source put it there; no filter may drop it)
    assert posts[0] in served, (posts[0], result.filtered)

    logged = read_feature_log(client)
    logged = logged[logged["serve_request_id"] == result.query.request_id]
    assert len(logged) == len(result.items) and set(logged["post_id"]) == served
    assert (logged["as_of"] == start).all() and (logged["surface"] == surface).all()

    offline = request.drop_duplicates("post_id").set_index("post_id")
    online = logged.set_index("post_id")
    mismatches = []
    for p in compared_posts:
        for f in ALL_FEATURES:
            want, have = float(offline.at[p, f]), float(online.at[p, f])
            if np.isnan(want) and np.isnan(have):
                continue
            if np.isnan(want) or np.isnan(have) or not np.isclose(have, want, rtol=1e-9, atol=0.0):
                mismatches.append((p, f, have, want))
    print(f"  user {user}, request at {start}, surface {surface}: {len(compared_posts)} of its {len(posts)} posts "
          f"served (filtered: {result.filtered}), {len(mismatches)} mismatching values")
    assert not mismatches, mismatches[:10]
    # the values are not trivially equal: the user's history and the posts' counts are there
    assert offline.loc[compared_posts, "user_impressions"].gt(0).all()
    assert offline.loc[compared_posts, "post_impressions_24h"].notna().any()
    assert offline.loc[compared_posts, "hist_len"].gt(0).all()  # and the user's action sequence
    # only the logged request's posts are compared; the page also served the real sources' posts
    return len(compared_posts)

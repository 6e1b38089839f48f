"""Train/serve equality of the history features on the real log: the mixer's
``HistoryFeatureHydrator`` (action sequence and co-engagement lists read from a real Redis holding
the candidate index built as of a daily cutoff, neighbours from the real Spark job) gives exactly
the values ``pipelines.history_features`` puts in training rows of a request at that cutoff."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import redis

from core.history_features import HISTORY_FEATURES, SEQUENCE_ID_FEATURES
from core.schema import ALL_FEATURES
from mixer.candidate import Candidate, Query
from mixer.caches import CacheSettings, MixerCaches
from mixer.feature_hydrators.history import HistoryFeatureHydrator
from mixer.query_hydrators import UserActionSequenceQueryHydrator

pytestmark = pytest.mark.integration

DB = 8  # own Redis database
CUTOFF = pd.Timestamp("2022-04-30T00:00:00Z")  # a daily index build inside the log
USER_MOD = 25  # a slice of the users keeps the Spark job short; features are per user anyway


@pytest.fixture(scope="module")
def served(data_dir, redis_server, spark):
    from pipelines import canonical
    from pipelines.candidate_index import CanonicalTables, build_coengagement, compute_candidate_index, write_candidate_index
    from pipelines.raw import load_raw

    raw = load_raw(data_dir)
    log, _ = canonical.deduplicate_log(raw.log)
    impressions, _ = canonical.impressions_table(log, raw.videos)
    posts = canonical.posts_table(raw.videos)
    prelog = canonical.prelog_events_table(raw.sequences, posts)
    tables = CanonicalTables(impressions=impressions[impressions.user_id % USER_MOD == 0], posts=posts,
                             social_edges=canonical.social_edges_table(impressions.iloc[:0]),
                             prelog_events=prelog[prelog.user_id % USER_MOD == 0])
    neighbours = build_coengagement(spark, tables, CUTOFF, log=None)
    client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{DB}")
    client.flushdb()
    content = compute_candidate_index(tables, CUTOFF, neighbours)
    write_candidate_index(client, content)
    yield tables, neighbours, content, client
    client.flushdb()
    client.close()


def test_mixer_history_features_equal_the_training_rows(served, spark):
    from pipelines.history_features import add_history_features

    tables, neighbours, content, client = served
    rng = np.random.default_rng(5)
    users = rng.choice(content.sequences["user_id"].unique(), size=12, replace=False)
    posts = tables.posts.drop_duplicates("post_id").set_index("post_id")
    caches = MixerCaches(CacheSettings())
    seq_hydrator = UserActionSequenceQueryHydrator(client)
    hydrator = HistoryFeatureHydrator(client, caches=caches)
    served_rows, offline_rows = [], []
    nonzero = 0
    for uid in users:
        query = seq_hydrator.hydrate(Query(user_id=int(uid), page_size=20, now_s=CUTOFF.timestamp(), request_id="r"))
        assert query.action_sequence, "a user of the index's sequences has a sequence"
        # candidates: the seeds' neighbours (history overlap) and random posts (mostly none)
        near = neighbours.loc[neighbours.post_id.isin([a.post_id for a in query.action_sequence[:5]]), "neighbour_id"]
        ids = list(dict.fromkeys([*near.head(30).tolist(), *rng.choice(posts.index, size=30).tolist()]))
        cands = [Candidate(post_id=int(p), source="t", author_id=int(posts.at[p, "author_id"]),
                           tag_id=int(posts.at[p, "primary_tag"])) for p in ids]
        frame = pd.DataFrame(np.full((len(cands), len(ALL_FEATURES)), np.nan), columns=list(ALL_FEATURES))
        online = hydrator.hydrate(query, cands, frame)[list(HISTORY_FEATURES + SEQUENCE_ID_FEATURES)]
        served_rows.append(online)
        offline_rows.append(pd.DataFrame({"user_id": int(uid), "post_id": [c.post_id for c in cands],
                                          "author_id": [c.author_id for c in cands],
                                          "tag_id": [c.tag_id for c in cands], "request_ts": CUTOFF}))
        nonzero += int((online["hist_coeng_sum"] > 0).sum())
    online = pd.concat(served_rows, ignore_index=True)
    rows = pd.concat(offline_rows, ignore_index=True)
    asked = []
    offline = add_history_features(spark, rows, tables, log=None,
                                   neighbours_for=lambda c: asked.append(c) or neighbours)
    assert asked == [CUTOFF]
    assert nonzero > 50, "the comparison must cover candidates with co-engagement"
    assert (online["hist_author_engagements"] > 0).any() and (online["hist_tag_engagements"] > 0).any()
    assert (online[SEQUENCE_ID_FEATURES[0]] > 0).all(), "every user here has a sequence: position 0 is set"
    np.testing.assert_allclose(online.to_numpy(), offline[list(HISTORY_FEATURES + SEQUENCE_ID_FEATURES)].to_numpy(),
                               rtol=1e-12, atol=0)
    print(f"history features: {len(online)} candidates of {len(users)} requests x {len(HISTORY_FEATURES)} "
          f"features equal; {nonzero} with co-engagement")

"""Candidate index built from real KuaiRand data into a real Redis, read by the query hydrator,
the candidate sources and the candidate hydrator."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import redis

from core import online_layout as keys
from mixer.candidate import Candidate, Query
from mixer.candidate_hydrators import PostMetadataCandidateHydrator
from mixer.candidate_sources import (
    InNetworkCandidateSource,
    ParallelSourceRunner,
    PopularCandidateSource,
    TagInterestCandidateSource,
)
from mixer.query_hydrators import UserContextQueryHydrator
from pipelines import canonical
from pipelines.candidate_index import CanonicalTables, build_candidate_index
from pipelines.raw import load_raw

pytestmark = pytest.mark.integration

AS_OF = pd.Timestamp("2022-05-02T16:00:00Z")  # mid-log: two days of the log lie after the cutoff


@pytest.fixture(scope="module")
def tables(data_dir) -> CanonicalTables:
    raw = load_raw(data_dir)
    log, _ = canonical.deduplicate_log(raw.log)
    impressions, _ = canonical.impressions_table(log, raw.videos)
    return CanonicalTables(impressions=impressions, posts=canonical.posts_table(raw.videos),
                           social_edges=canonical.social_edges_table(impressions))


@pytest.fixture(scope="module")
def index(tables, redis_server, session_state):
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    counts = build_candidate_index(session_state, redis_server.url, AS_OF, tables=tables)
    yield client, counts
    client.close()


def _before(frame: pd.DataFrame, col: str = "event_ts") -> pd.DataFrame:
    return frame[frame[col] < AS_OF]


def _query(user_id: int) -> Query:
    return Query(user_id=user_id, page_size=20, now_s=AS_OF.timestamp(), request_id="t")


def _hydrate(client, user_id):
    return UserContextQueryHydrator(client, served_ttl_s=3600).hydrate(_query(user_id))


def test_counts_reflect_the_cutoff(index, tables):
    _, counts = index
    imp = _before(tables.impressions)
    assert counts["seen_edges"] == len(imp.drop_duplicates(["user_id", "post_id"]))
    assert counts["seen_edges"] < len(tables.impressions.drop_duplicates(["user_id", "post_id"]))
    assert counts["posts"] == len(tables.posts)  # every post was uploaded before May
    assert 0 < counts["popular_24h"] < counts["popular_7d"] <= counts["posts"]


def test_query_hydration_matches_the_tables(index, tables):
    client, _ = index
    edges = _before(tables.social_edges)
    follower = int(edges.loc[edges.edge_type == "follow", "user_id"].iloc[0])
    q = _hydrate(client, follower)
    assert q.follows == frozenset(edges.loc[(edges.edge_type == "follow") & (edges.user_id == follower),
                                            "author_id"].astype(int))
    seen = _before(tables.impressions)
    assert q.seen_posts == frozenset(seen.loc[seen.user_id == follower, "post_id"].astype(int))
    eng = edges[(edges.edge_type == "engagement") & (edges.user_id == follower)].groupby("author_id").weight.sum()
    assert q.engaged_authors == pytest.approx({int(a): float(w) for a, w in eng.items()})
    assert list(q.engaged_authors.values()) == sorted(q.engaged_authors.values(), reverse=True)
    hater = int(seen.loc[seen.hate > 0, "user_id"].iloc[0])
    assert _hydrate(client, hater).hated_authors >= frozenset(
        seen.loc[(seen.user_id == hater) & (seen.hate > 0), "author_id"].astype(int))
    assert _hydrate(client, 10**12).is_cold_start


def test_sources_give_hundreds_of_candidates_with_correct_provenance(index, tables):
    client, _ = index
    imp = _before(tables.impressions)
    active = int(imp.groupby("user_id").size().idxmax())
    q = _hydrate(client, active)
    sources = [InNetworkCandidateSource(client), PopularCandidateSource(client), TagInterestCandidateSource(client)]
    with ThreadPoolExecutor(4) as pool:
        cands, results = ParallelSourceRunner(sources, pool).run(q)
    assert all(r.status == "ok" for r in results), results
    by_source = {r.name: r.candidates for r in results}
    assert len({c.post_id for c in cands}) >= 500
    posts = tables.posts.set_index("post_id")
    for c in by_source["in_network"]:
        assert c.in_network and c.author_id in q.in_network_authors
        assert posts.loc[c.post_id, "author_id"] == c.author_id and c.created_ts <= q.now_s
    top_tags = set(sorted(q.tag_interests, key=q.tag_interests.get, reverse=True)[:5])
    for c in by_source["tag_interest"][:50]:
        assert top_tags & {int(t) for t in posts.loc[c.post_id, "tags"].split(",") if t}
    window = imp[imp.event_ts >= AS_OF - pd.Timedelta(days=7)]
    assert by_source["popular"][0].post_id in set(window.post_id)

    hydrated, dropped = PostMetadataCandidateHydrator(client).hydrate(q, cands + [Candidate(10**9, "popular")])
    assert dropped == 1 and len(hydrated) == len(cands)
    sample = hydrated[::50]
    assert all(posts.loc[c.post_id, "author_id"] == c.author_id for c in sample)
    # tag_id: the post's primary tag (the canonical posts' primary_tag, -1 when it has no tag)
    assert all(c.tag_id == posts.loc[c.post_id, "primary_tag"] for c in hydrated)
    assert {c.tag_id for c in hydrated} - {-1}
    assert all(c.in_network == (c.author_id in q.in_network_authors) for c in hydrated)


def test_cold_start_user_gets_only_popular(index):
    client, _ = index
    q = _hydrate(client, 10**12)
    sources = [InNetworkCandidateSource(client), PopularCandidateSource(client), TagInterestCandidateSource(client)]
    with ThreadPoolExecutor(4) as pool:
        cands, _ = ParallelSourceRunner(sources, pool).run(q)
    assert cands and {c.source for c in cands} == {"popular"}


def test_rebuild_replaces_and_keeps_served_records(index, tables, redis_server, session_state):
    client, counts = index
    size = client.dbsize()
    client.sadd(keys.hated_authors(10**12), 1)  # stale index key: a rebuild must remove it
    client.zadd(keys.served_posts(5), {"42": 1.0})  # the mixer's record: a rebuild must keep it
    again = build_candidate_index(session_state, redis_server.url, AS_OF, tables=tables)
    assert again == counts
    assert not client.exists(keys.hated_authors(10**12))
    assert client.zscore(keys.served_posts(5), "42") == 1.0
    assert client.dbsize() == size + 1
    assert client.hget(keys.INDEX_META, "as_of").decode() == AS_OF.isoformat()


def test_post_metadata_sets_the_primary_tag(redis_client):
    redis_client.hset(keys.POST_META, mapping={
        "1": keys.encode_post_meta(7, 100, [3, 5]), "2": keys.encode_post_meta(8, 200, [])})
    cands = [Candidate(1, "popular"), Candidate(2, "popular"), Candidate(1, "tag_interest")]
    hydrated, dropped = PostMetadataCandidateHydrator(redis_client).hydrate(_query(1), cands)
    assert dropped == 0
    assert [(c.author_id, c.created_ts, c.tag_id) for c in hydrated] == [(7, 100.0, 3), (8, 200.0, -1), (7, 100.0, 3)]

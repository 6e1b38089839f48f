"""The timeline's safety property, by hypothesis, through the real pipeline on real Redis.

For random worlds (authors and their posts, the viewer's follows / engaged authors / tag interests,
hated authors in the candidate index, follow / block / mute / hate events applied by the stream
processor in a shuffled arrival order, popular posts, a log history and a served history with serve
times inside and outside the served TTL), no page of the viewer's timeline, over several pages
through the cursor, ever holds:

- a post by an author the viewer blocked, muted or hated (index or event), or
- a post served to the viewer within the TTL (or seen in the log, or on an earlier page).

Every key is written by the project's own writer: ``write_candidate_index`` (posts, graph,
history), ``StreamProcessor.apply`` (social and hate events), ``ServedPostsSideEffect`` (served
history, with its wall clock set to each serve time). The pipeline is ``build_pipeline`` over the
real Redis with the Feast-layout feature hydrator (no features written: NaN rows); only the rankers
are small deterministic stand-ins (the property does not depend on scores), the candidate sources get
generous timeouts and the real-time feature hydrator is off (no stream-processor liveness stamp is
written). Each example runs on a
flushed, dedicated Redis database. Examples are derandomized (the same ones on every run) and
hypothesis keeps no database, so CI is reproducible.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import redis
from hypothesis import HealthCheck, given, settings, strategies as st

from core import online_layout as keys
from core.schema import ALL_FEATURES, HEADS, LIGHT_RANKER_FEATURES

pytestmark = pytest.mark.integration

DB = 12  # own Redis database: other test modules flush db 0 (and 3, 6, 7)
VIEWER = 1
NOW = pd.Timestamp("2022-05-04T16:00:00Z")  # the request clock (fixed); served times are wall time
TTL_S = 3600
PAGE_SIZE, MAX_PAGES = 3, 8
TAGS = (1, 2, 3, 4)


@dataclass
class ScoreHandle:
    """A deterministic ranker stand-in: per-row pseudo-random scores (varied orders, no model)."""

    feature_names: tuple
    heads: tuple
    version: str = "1"

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        rng = np.random.default_rng(len(frame))
        return rng.uniform(0.01, 0.99, size=(len(frame), len(self.heads))).astype(np.float32)


@dataclass(frozen=True)
class World:
    """One generated example (author ids >= 100, post ids >= 1000; times relative to NOW / wall)."""

    posts: tuple  # (post_id, author_id, age_s, tags)
    follows: frozenset  # index follow edges of the viewer
    engaged: dict  # author -> weight
    tag_interest: dict  # tag -> weight
    index_hated: frozenset
    events: tuple  # (action, author_id, event offset s), in arrival order; action follow/unfollow/block/mute/hate
    popular: dict  # post_id -> score
    seen: frozenset  # log impressions before the index cutoff
    served: dict  # post_id -> seconds before the request (wall clock) it was served

    @property
    def blocked(self) -> frozenset:
        return frozenset(a for act, a, _ in self.events if act == "block")  # a block is never undone

    @property
    def muted(self) -> frozenset:
        return frozenset(a for act, a, _ in self.events if act == "mute")

    @property
    def hated(self) -> frozenset:
        return self.index_hated | frozenset(a for act, a, _ in self.events if act == "hate")

    @property
    def hidden_authors(self) -> frozenset:
        return self.blocked | self.muted | self.hated

    @property
    def served_within_ttl(self) -> frozenset:
        return frozenset(p for p, ago in self.served.items() if ago < TTL_S)


@st.composite
def worlds(draw) -> World:
    authors = list(range(100, 100 + draw(st.integers(2, 8))))
    posts, pid = [], 1000
    for a in authors:
        for _ in range(draw(st.integers(0, 5))):
            age = draw(st.integers(60, 10 * 86400))
            posts.append((pid, a, age, tuple(draw(st.lists(st.sampled_from(TAGS), max_size=2, unique=True)))))
            pid += 1
    post_ids = [p[0] for p in posts]
    some_authors = st.frozensets(st.sampled_from(authors))
    few_authors = st.frozensets(st.sampled_from(authors), max_size=2)
    few_posts = st.frozensets(st.sampled_from(post_ids), max_size=3) if post_ids else st.just(frozenset())
    # a block may arrive before or after a (later or earlier) follow of the same author
    events = draw(st.lists(st.tuples(st.sampled_from(("follow", "unfollow", "block", "mute", "hate")),
                                     st.sampled_from(authors), st.integers(-3600, 0)), max_size=8))
    # served: inside the TTL (well inside) or outside it (well outside), never near the boundary
    served_ago = st.one_of(st.integers(1, int(TTL_S * 0.8)), st.integers(int(TTL_S * 1.2), 5 * TTL_S))
    served = draw(st.dictionaries(st.sampled_from(post_ids), served_ago, max_size=8)) if post_ids else {}
    return World(
        posts=tuple(posts),
        follows=draw(some_authors),
        engaged=draw(st.dictionaries(st.sampled_from(authors), st.floats(0.5, 10), max_size=3)),
        tag_interest=draw(st.dictionaries(st.sampled_from(TAGS), st.floats(0.5, 10), max_size=3)),
        index_hated=draw(few_authors),
        events=tuple(events),
        popular=draw(st.dictionaries(st.sampled_from(post_ids), st.floats(0.1, 100), max_size=15))
        if post_ids else {},
        seen=draw(few_posts),
        served=served,
    )


def _frame(rows: list, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns).astype({c: "int64" for c in columns if c not in ("tags", "weight",
                                                                                                 "score")})


def write_world(client: redis.Redis, world: World) -> None:
    """Write ``world`` with the project's writers (module docstring)."""
    from mixer.side_effects import ServedPostsSideEffect
    from pipelines.candidate_index import CandidateIndexContent, write_candidate_index
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.events import EngagementEvent, SocialGraphEvent
    from pipelines.streaming.processor import StreamProcessor

    now_s = int(NOW.timestamp())
    authors = {p: a for p, a, _, _ in world.posts}
    popular = pd.Series(world.popular, dtype="float64")
    popular.index = popular.index.astype("int64")
    tag_posts = [(t, p, 1.0) for p, _, _, tags in world.posts for t in tags]
    write_candidate_index(client, CandidateIndexContent(
        as_of=NOW,
        posts=_frame([(p, a, now_s - age, tags) for p, a, age, tags in world.posts],
                     ["post_id", "author_id", "created_ts", "tags"]),
        popular={"24h": popular, "7d": popular},
        tag_posts=_frame(tag_posts, ["tag", "post_id", "score"]),
        follows=_frame([(VIEWER, a) for a in sorted(world.follows)], ["user_id", "author_id"]),
        engaged_authors=_frame([(VIEWER, a, w) for a, w in world.engaged.items()], ["user_id", "author_id", "weight"]),
        tag_interest=_frame([(VIEWER, t, w) for t, w in world.tag_interest.items()], ["user_id", "tag", "weight"]),
        hated_authors=_frame([(VIEWER, a) for a in sorted(world.index_hated)], ["user_id", "author_id"]),
        seen=_frame([(VIEWER, p, now_s - 86400) for p in sorted(world.seen)], ["user_id", "post_id", "ts"]),
        # the viewer engaged every seen post, each a co-engagement neighbour of every post: the
        # co-engagement source offers every post, hidden authors' and served ones included
        sequences=pd.DataFrame({"user_id": VIEWER, "post_id": sorted(world.seen),
                                "author_id": [authors.get(p, 0) for p in sorted(world.seen)], "action": "like",
                                "ts": [float(now_s - 86400 + i) for i in range(len(world.seen))]}).astype(
            {"user_id": "int64", "post_id": "int64", "author_id": "int64"}),
        coengagement=_frame([(s, p, 1.0) for s in sorted(world.seen) for p, _, _, _ in world.posts if p != s],
                            ["post_id", "neighbour_id", "score"]),
    ))

    processor = StreamProcessor(client, RedisStreamsBus(client))
    post_of = {a: p for p, a, _, _ in world.posts}
    for action, author, offset in world.events:
        ts = datetime.fromtimestamp(now_s + offset, tz=timezone.utc)
        if action == "hate":
            event = EngagementEvent(event_id=uuid.uuid4().hex, event_ts=ts, kind="hate", user_id=VIEWER,
                                    post_id=post_of.get(author, 999_999), author_id=author)
        else:
            event = SocialGraphEvent(event_id=uuid.uuid4().hex, event_ts=ts, action=action, user_id=VIEWER,
                                     author_id=author)
        processor.apply(event)

    wall = time.time()
    for post_id, ago in sorted(world.served.items(), key=lambda kv: -kv[1]):  # oldest first, as served
        effect = ServedPostsSideEffect(client, TTL_S, 2000, wall_clock=lambda t=wall - ago: t)
        effect.apply(SimpleNamespace(query=SimpleNamespace(user_id=VIEWER), items=[SimpleNamespace(post_id=post_id)]))


def _smembers(client: redis.Redis, key: str) -> frozenset[int]:
    return frozenset(int(v) for v in client.smembers(key))


@pytest.fixture(scope="module")
def db(redis_server):
    client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{DB}")
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def config():
    from mixer.config import load_config, parse_config

    data = load_config().model_dump()
    data.update(clock={"now": NOW.isoformat().replace("+00:00", "Z")},
                served={**data["served"], "ttl_seconds": TTL_S},
                page={"default_size": PAGE_SIZE, "max_size": 100},
                # no stream-processor liveness stamp here: its features would only log "stale"
                realtime={**data["realtime"], "enabled": False})
    for source in data["candidate_sources"].values():
        source["timeout_ms"] = 5000  # a source timing out on a busy CI machine would make pages vacuous
    return parse_config(data)


def _pipeline(config, client, executor):
    from core.online_layout import FeastRedisLayout
    from mixer.feature_hydrators import FeastLayoutFeatureHydrator
    from mixer.metrics import MixerMetrics
    from mixer.pipeline import build_pipeline

    return build_pipeline(config, client=client,
                          light=ScoreHandle(tuple(LIGHT_RANKER_FEATURES), ("engaged",)),
                          heavy=ScoreHandle(tuple(ALL_FEATURES), tuple(HEADS)),
                          feature_hydrator=FeastLayoutFeatureHydrator(client, FeastRedisLayout("home_mixer")),
                          executor=executor, metrics=MixerMetrics())


def test_no_page_holds_a_hidden_author_or_a_recently_served_post(db, config):
    stats: Counter = Counter()
    started = time.monotonic()
    with ThreadPoolExecutor(4) as executor:

        @settings(max_examples=100, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(world=worlds())
        def check(world: World) -> None:
            db.flushdb()
            write_world(db, world)
            # the writers hold what the model says (else the property below would test nothing)
            assert _smembers(db, keys.blocked_authors(VIEWER)) == world.blocked
            assert _smembers(db, keys.muted_authors(VIEWER)) == world.muted
            assert _smembers(db, keys.hated_authors(VIEWER)) == world.hated
            pipeline = _pipeline(config, db, executor)  # per example: no state across flushes
            hidden, recent = world.hidden_authors, world.served_within_ttl
            author_of = {p: a for p, a, _, _ in world.posts}
            shown: list[int] = []
            cursor = None
            for page in range(MAX_PAGES):
                result = pipeline.run(VIEWER, PAGE_SIZE, cursor=cursor)
                for item in result.items:
                    where = f"page {page}, post {item.post_id} by {item.author_id}, source {item.source}"
                    assert item.author_id == author_of[item.post_id], where
                    assert item.author_id not in world.blocked, f"blocked author on {where}"
                    assert item.author_id not in world.muted, f"muted author on {where}"
                    assert item.author_id not in world.hated, f"hated author on {where}"
                    assert item.post_id not in recent, f"post served {world.served[item.post_id]} s ago on {where}"
                    assert item.post_id not in world.seen, f"post seen in the log on {where}"
                    assert item.post_id not in shown, f"post shown on an earlier page, again on {where}"
                    shown.append(item.post_id)
                stats["pages"] += 1
                stats["items"] += len(result.items)
                for name in ("previously_seen", "hated_author", "blocked_muted_author"):
                    stats[name] += result.filtered.get(name, 0)
                cursor = result.next_cursor
                if cursor is None:
                    break
            stats["examples"] += 1
            stats["hidden_posts"] += sum(1 for a in author_of.values() if a in hidden)
            stats["recent_posts"] += len(recent)

        check()
    print(f"\nsafety property: {dict(stats)} in {time.monotonic() - started:.1f} s")
    # not vacuous: posts were served, and each filter of the property removed candidates
    assert stats["examples"] >= 90 and stats["items"] > 150
    assert stats["previously_seen"] > 0 and stats["hated_author"] > 0 and stats["blocked_muted_author"] > 0

"""The stream processor's real-time state, recomputed in plain python straight from a list of events
and read back from Redis, both as one flat ``{(section, id, name): float}`` dict so a reliability
test compares "what Redis holds" with "what these events mean" in one assertion.

Sections (``id`` is a post, author or user id; ``name`` is ``""`` where there is one value):

- ``("window", post, "rt_{kind}s_{w}")``: events of ``kind`` on ``post`` in the window ``w`` ending at
  ``now``: the 5-minute buckets ``b`` with ``c - w <= b < c``, ``c = ceil(now / 300) * 300``
  (the bucket-grid definition in ``core.realtime.window_buckets``; recomputed here, not called).
- ``("post_score", post, "")`` / ``("author_score", author, "")``: ``sum_i w_i 2 ** (-(now - t_i) / 6 h)``
  with ``w = ENGAGEMENT_EDGE_WEIGHTS`` (0 for impression and hate), the closed form of the
  forward-decayed score (``core.realtime`` docstring).
- ``("trending_post", post, "")``: the same sum with the 1 h trending half-life, posts with weight > 0.
- ``("recent_post", user, post)`` / ``("recent_author", user, author)``: newest positive engagement
  time (epoch s) of the ``RECENT_CAP`` most recent posts / authors.
- ``("follow", user, author)`` / ``("hated", user, author)``: 1.0 per member of the user's follow /
  hated-author set (no unfollow / block in a replayed log: a follow head or follow edge adds).
- ``("coverage", 0, "")``: the earliest event time applied that is within 24 h of the newest one
  seen before it and at most ``OUT_OF_ORDER_S`` before the first one (events in stream order).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import pytest
import redis

from core import online_layout as keys
from core import realtime as rt
from core.schema import ENGAGEMENT_EDGE_WEIGHTS, POSITIVE_HEADS
from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader
from pipelines.streaming.events import ENGAGEMENT_KINDS, EngagementEvent, SocialGraphEvent

Key = tuple[str, int, str]
BUCKET_S = 300


def _weight(kind: str) -> float:
    return float(ENGAGEMENT_EDGE_WEIGHTS.get(kind, 0.0))


@dataclass(frozen=True)
class EntityIds:
    """The post, user and author ids whose state is compared."""

    posts: frozenset[int]
    users: frozenset[int]
    authors: frozenset[int]


def entity_ids(events: Iterable) -> EntityIds:
    """The ids ``events`` mention."""
    posts, users, authors = set(), set(), set()
    for e in events:
        users.add(e.user_id)
        authors.add(e.author_id)
        if isinstance(e, EngagementEvent):
            posts.add(e.post_id)
    return EntityIds(frozenset(posts), frozenset(users), frozenset(authors))


def expected_state(events: list, now: float, ids: EntityIds) -> dict[Key, float]:
    """The state ``events`` (each applied once, in any order) must leave, evaluated at ``now``
    (epoch s) for ``ids``; see the module docstring for the sections."""
    posts, users, authors = ids.posts, ids.users, ids.authors
    engagements = [e for e in events if isinstance(e, EngagementEvent)]
    out: dict[Key, float] = {}
    end = math.ceil(now / BUCKET_S) * BUCKET_S
    for p in posts:
        for kind in ENGAGEMENT_KINDS:
            for w, secs in rt.WINDOWS_S.items():
                out[("window", p, f"rt_{kind}s_{w}")] = 0.0
        out[("post_score", p, "")] = 0.0
    for a in authors:
        out[("author_score", a, "")] = 0.0
    trending: dict[int, float] = defaultdict(float)
    newest_post: dict[int, dict[int, float]] = defaultdict(dict)
    newest_author: dict[int, dict[int, float]] = defaultdict(dict)
    for e in engagements:
        t = e.event_ts.timestamp()
        b = math.floor(t / BUCKET_S) * BUCKET_S
        for w, secs in rt.WINDOWS_S.items():
            if e.post_id in posts and end - secs <= b < end:
                out[("window", e.post_id, f"rt_{e.kind}s_{w}")] += 1.0
        w = _weight(e.kind)
        if w > 0:
            if e.post_id in posts:
                out[("post_score", e.post_id, "")] += w * 2.0 ** (-(now - t) / rt.HALF_LIFE_S)
            if e.author_id in authors:
                out[("author_score", e.author_id, "")] += w * 2.0 ** (-(now - t) / rt.HALF_LIFE_S)
            trending[e.post_id] += w * 2.0 ** (-(now - t) / rt.TRENDING_HALF_LIFE_S)
        if e.kind in POSITIVE_HEADS and e.user_id in users:
            for newest, member in ((newest_post, e.post_id), (newest_author, e.author_id)):
                newest[e.user_id][member] = max(newest[e.user_id].get(member, -math.inf), t)
        if e.user_id in users and e.kind == "follow":
            out[("follow", e.user_id, str(e.author_id))] = 1.0
        if e.user_id in users and e.kind == "hate":
            out[("hated", e.user_id, str(e.author_id))] = 1.0
    for e in events:
        if isinstance(e, SocialGraphEvent) and e.user_id in users:
            assert e.action == "follow", "a replayed log only has follow edges; extend the recompute first"
            out[("follow", e.user_id, str(e.author_id))] = 1.0
    for section, newest in (("recent_post", newest_post), ("recent_author", newest_author)):
        for u, members in newest.items():
            keep = sorted(members.items(), key=lambda kv: kv[1], reverse=True)[:rt.RECENT_CAP]
            out.update({(section, u, str(m)): t for m, t in keep})
    out.update({("trending_post", p, ""): v for p, v in trending.items() if p in posts})
    if engagements:
        times = [e.event_ts.timestamp() for e in engagements]
        since, newest = math.inf, -math.inf
        for t in times:
            newest = max(newest, t)
            if t > newest - rt.RETENTION_S and t >= times[0] - rt.OUT_OF_ORDER_S:
                since = min(since, t)
        out[("coverage", 0, "")] = since
    return out


def observed_state(client: redis.Redis, now: float, ids: EntityIds) -> dict[Key, float]:
    """The same dict read from Redis at ``now``: ``RealtimeFeatureReader`` for windows, scores,
    trending and coverage, the documented keys (``core.online_layout``) for the per-user zsets and sets."""
    posts, users, authors = sorted(ids.posts), sorted(ids.users), sorted(ids.authors)
    reader = RealtimeFeatureReader(client)
    out: dict[Key, float] = {}
    for p, feats in reader.post_window_counts(posts, now).items():
        out.update({("window", p, name): v for name, v in feats.items()})
    out.update({("post_score", p, ""): v for p, v in reader.decayed_scores(posts, now).items()})
    out.update({("author_score", a, ""): v
                for a, v in reader.decayed_scores(authors, now, entity="author").items()})
    wanted = set(posts)
    out.update({("trending_post", p, ""): v for p, v in reader.trending(now, k=rt.TRENDING_CAP) if p in wanted})
    pipe = client.pipeline(transaction=False)
    for u in users:
        pipe.zrange(keys.rt_user_recent_posts(u), 0, -1, withscores=True)
        pipe.zrange(keys.rt_user_recent_authors(u), 0, -1, withscores=True)
        pipe.smembers(keys.follows(u))
        pipe.smembers(keys.hated_authors(u))
    res = pipe.execute()
    for i, u in enumerate(users):
        rposts, rauthors, follows, hated = res[4 * i: 4 * i + 4]
        out.update({("recent_post", u, str(int(m))): float(s) for m, s in rposts})
        out.update({("recent_author", u, str(int(m))): float(s) for m, s in rauthors})
        out.update({("follow", u, str(int(m))): 1.0 for m in follows})
        out.update({("hated", u, str(int(m))): 1.0 for m in hated})
    since = reader.coverage_since()
    if since is not None:
        out[("coverage", 0, "")] = since
    return out


# The trending zset stores log2 of the forward-decayed sum, x ~ t / 1 h ~ 4.6e5, summed by log-sum-exp:
# each add rounds x to ~6e-11 (its ulp), so the relative error of 2 ** x grows ~1e-10 per event.
REL_TOLERANCE = {"trending_post": 1e-7}


def state_diff(observed: dict[Key, float], expected: dict[Key, float], rel: float = 1e-9) -> list[str]:
    """Human-readable differences: missing / unexpected keys and values further apart than ``rel``
    (relative; ``REL_TOLERANCE`` per section) or 1e-9 absolute. Empty when the states agree."""
    diffs = [f"missing {k} (expected {expected[k]})" for k in expected.keys() - observed.keys()]
    diffs += [f"unexpected {k} = {observed[k]}" for k in observed.keys() - expected.keys()]
    diffs += [f"{k}: observed {observed[k]!r}, expected {expected[k]!r}" for k in expected.keys() & observed.keys()
              if observed[k] != pytest.approx(expected[k], rel=REL_TOLERANCE.get(k[0], rel), abs=1e-9)]
    return sorted(diffs)


def seen_event_ids(client: redis.Redis) -> set[str]:
    """Event ids marked applied: an engagement's id in its hour's idempotency set (the global part's,
    ``online_layout.rt_seen_set``) or a social event's marker, which ``social.lua`` keeps under its
    user's hash tag (``online_layout.rt_user_seen_event``)."""
    out = set()
    for k in client.scan_iter(match=keys.rt_seen_set(0).rsplit(":", 1)[0] + ":*", count=1000):
        out |= {m.decode() for m in client.smembers(k)}
    user_marker = keys.rt_user_seen_event(0, "").split("}", 1)[1]  # ":rt:seen:" after the user's tag
    for k in client.scan_iter(match=keys.rt_user_seen_event("*", "*"), count=1000):
        out.add(k.decode().split(user_marker, 1)[1])
    return out

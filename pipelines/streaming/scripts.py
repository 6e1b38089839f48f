"""The streaming seam's Lua scripts (``pipelines/streaming/lua/*.lua``) and their named KEYS / ARGV.

One spec per script: two ``NamedTuple`` records name its KEYS and ARGV in the order of the
script's ``unpack(KEYS)`` / ``unpack(ARGV)`` lines (checked when it is registered, ``core.lua``),
and build them from an event; ``SPEC.register(client)`` loads it at start-up and returns a callable
``script(keys, args, client=pipe)``. Keys come from ``core.online_layout``, constants from
``core.realtime``.

| script | prelude | run by | KEYS / ARGV |
| --- | --- | --- | --- |
| ``engagement_batch.lua`` | | ``StreamProcessor`` (a run of ``EngagementEvent``, one call) via ``EngagementBatchScript`` | ``EngagementBatchKeys`` / ``EngagementBatchArgs`` (the fixed heads) |
| ``social.lua`` | ``guard.lua`` | ``StreamProcessor`` (one ``SocialGraphEvent``) | ``SocialKeys`` / ``SocialArgs`` |
| ``graph_edge.lua`` | ``guard.lua`` | ``StreamProcessor`` via ``pipelines.graph.SocialGraphWriter`` (one half of a ``SocialGraphEvent``) | ``GraphEdgeKeys`` / ``GraphEdgeArgs`` |
| ``coverage_stamp.lua`` | | ``StreamProcessor`` (liveness stamp) | ``CoverageStampKeys`` / ``CoverageStampArgs`` |
| ``skip_trimmed.lua`` | ``stream_helpers.lua`` | ``RedisStreamsBus.skip_trimmed`` / ``poll`` | ``SkipTrimmedKeys`` / ``SkipTrimmedArgs`` |
| ``applied_until.lua`` | ``stream_helpers.lua`` | ``RedisStreamsBus.applied_until`` | ``AppliedUntilKeys`` / ``AppliedUntilArgs`` |
"""

from __future__ import annotations

import collections
from typing import NamedTuple

from core import online_layout as keys
from core import realtime
from core.lua import LuaScriptSpec, queue_evalsha
from core.history_features import SEQUENCE_LENGTH
from core.realtime import seen_hour
from core.schema import POSITIVE_HEADS
from pipelines.sequences import ENGAGED_HEADS

_PACKAGE = "pipelines.streaming"


# ---------------------------------------------------------------- engagement_batch.lua
class EngagementBatchKeys(NamedTuple):
    """The fixed head of ``engagement_batch.lua``'s KEYS (the global keys; per-event, per-post,
    per-author and per-user keys follow, laid out by ``EngagementBatchScript.layout``)."""

    index_post_meta: str = keys.POST_META        # hash: the candidate index's post metadata (read: tags)
    trending_posts: str = keys.RT_TRENDING_POSTS  # zset
    trending_tags: str = keys.RT_TRENDING_TAGS    # zset
    coverage: str = keys.RT_COVERAGE              # hash: stream coverage


def _kind_table() -> str:
    """``"name weight positive engaged ..."`` for every ``core.realtime.ENGAGEMENT_KINDS`` kind: its
    score weight (``repr(kind_weight)``), 1 if a positive head (recent engagements), 1 if an
    engagement of the user action sequence (``ENGAGED_HEADS``)."""
    return " ".join(f"{k} {realtime.kind_weight(k)!r} {int(k in POSITIVE_HEADS)} {int(k in ENGAGED_HEADS)}"
                    for k in realtime.ENGAGEMENT_KINDS)


class EngagementBatchArgs(NamedTuple):
    """The fixed head of ``engagement_batch.lua``'s ARGV: the batch's sizes, the kinds and the
    ``core.realtime`` constants (defaults), as the strings / numbers Redis receives (times ``%.6f``,
    floats ``repr``)."""

    seen_ttl: int                   # s, lifetime of the idempotency markers
    write_ts: str                   # processor clock at the write, "%.6f"
    n_events: int
    n_posts: int                    # distinct posts of the events
    n_authors: int                  # distinct authors
    n_users: int                    # distinct users of the events that touch a user key (not impressions)
    n_seen: int                     # idempotency sets: distinct event hours (core.realtime.seen_hour)
    n_acks: int = 0                 # stream entries to XACK at the end (0, or one per event)
    kinds: str = _kind_table()
    half_life: str = repr(realtime.HALF_LIFE_S)
    counts_ttl: int = realtime.COUNTS_TTL_S
    score_ttl: int = realtime.SCORE_TTL_S
    recent_cap: int = realtime.RECENT_CAP
    retention_s: int = realtime.RETENTION_S
    bucket_s: int = realtime.BUCKET_S
    trending_half_life: str = repr(realtime.TRENDING_HALF_LIFE_S)
    trending_cap: int = realtime.TRENDING_CAP
    out_of_order_s: int = realtime.OUT_OF_ORDER_S
    # members kept in the user action sequence: one per (post, action), so 2N leave room for N posts
    # (the mixer reads 2N members and keeps one per post; pipelines.history_features does the same)
    sequence_cap: int = 2 * SEQUENCE_LENGTH
    parts: str = "gpau"             # what this call writes (engagement_batch.lua's header): all, or one part


ENGAGEMENT_BATCH = LuaScriptSpec(_PACKAGE, "engagement_batch.lua", EngagementBatchKeys, EngagementBatchArgs)

# kinds whose event touches the user's keys (recent engagements, action sequence, hated, follows)
_USER_KINDS = frozenset(k for k in realtime.ENGAGEMENT_KINDS
                        if k in POSITIVE_HEADS or k in ENGAGED_HEADS or k in ("hate", "follow"))
# kinds whose event touches the author's key (a decayed score adds only weights > 0)
_AUTHOR_KINDS = frozenset(k for k in realtime.ENGAGEMENT_KINDS if realtime.kind_weight(k) > 0)
_HEAD_KEYS = tuple(EngagementBatchKeys())
ALL_PARTS = "gpau"


def _global_seen(e, hour: int) -> str:
    return keys.rt_seen_set(hour)


class EngagementBatchScript:
    """``engagement_batch.lua`` loaded on a client: applies a list of ``EngagementEvent`` in one
    atomic call (the script's header comment says what it writes and how).

    KEYS = ``EngagementBatchKeys`` + one idempotency set per distinct event hour + per distinct post
    (its counts hash, which holds the newest-event fields and the score) + per distinct author
    (score) + per distinct user of a non-impression event (recent posts, recent authors, hated,
    follows, social_ts, action sequence) [+ the events' stream]; ARGV = ``EngagementBatchArgs`` +
    the post ids + the author ids + per event (kind, event time ``%.6f``, post / author / user
    index, 1-based, user 0 for an impression, event id, idempotency set index) [+ the consumer
    group and one entry id per event]. This class is the one place that lays them out.

    With ``ack`` the script ends with the XACK of the events' stream entries: the writes and the
    acknowledgement are one atomic step (the bus must be Redis Streams on the same server; the
    processor checks).

    The call is ``EVALSHA`` queued directly (not redis-py's ``Script``, whose pipeline sends a
    ``SCRIPT EXISTS`` round trip first): a ``NoScriptError`` reply (Redis restarted or flushed its
    scripts) means nothing was applied; ``load`` and call again.

    On a Redis Cluster (``core.online_store.is_cluster``) a batch is one call per hash tag
    (:meth:`split`, :meth:`queue`), read back with :meth:`take`: the same writes as one call, each
    part atomic and idempotent on its own (the script's header).
    """

    def __init__(self, client):
        from core.online_store import is_cluster

        self.client = client
        self.cluster = is_cluster(client)
        self.source = ENGAGEMENT_BATCH.check()
        self.sha = client.script_load(self.source)  # a RedisCluster loads it on every primary
        self._plans: collections.deque = collections.deque()  # cluster: per queued batch, its parts

    def load(self) -> None:
        """``SCRIPT LOAD`` again (after a ``NoScriptError``: the server lost its script cache)."""
        self.sha = self.client.script_load(self.source)

    @staticmethod
    def layout(events: list, write_s: float, seen_ttl: int, ack: tuple[str, str, list[str]] | None = None,
               parts: str = ALL_PARTS, seen_key=_global_seen) -> tuple[list, list, list[float]]:
        """``(keys, args, event_s)`` of one call for ``events`` (``EngagementEvent``) written at
        ``write_s`` (epoch s); ``event_s`` is each event's time (epoch s), which the caller needs
        for the event-to-online lag. ``ack``: ``(stream key, group, one entry id per event)`` to
        acknowledge in the same call. ``parts`` (letters of ``"gpau"``) and ``seen_key`` ((event,
        its event hour) -> the part's idempotency set) lay out one part of a cluster-mode batch
        (:meth:`split`): keys of the parts not named are left out.

        Raises:
            ValueError: ``ack`` has another number of entry ids than there are events.
        """
        with_post, with_author, with_user = "p" in parts, "a" in parts, "u" in parts
        ev, ets = [], []
        seen: dict[str, int] = {}  # idempotency set -> its index
        seen_of_hour: dict[int, int] = {}  # one entity per call (or the global part): the hour decides
        posts: dict[int, int] = {}
        authors: dict[int, int] = {}
        users: dict[int, int] = {}
        post_ids, post_keys, author_ids, author_keys, user_keys = [], [], [], [], []
        counts_key = keys.rt_post_counts
        for e in events:
            p, a, kind = e.post_id, e.author_id, e.kind
            pj = posts.get(p)
            if pj is None:
                pj = posts[p] = len(posts) + 1
                post_ids.append(p)
                if with_post:
                    post_keys.append(counts_key(p))
            aj = authors.get(a)
            if aj is None:
                aj = authors[a] = len(authors) + 1
                author_ids.append(a)
                if with_author:
                    author_keys.append(keys.rt_author_score(a))
            uj = 0
            if with_user and kind in _USER_KINDS:
                u = e.user_id
                uj = users.get(u)
                if uj is None:
                    uj = users[u] = len(users) + 1
                    user_keys += (keys.rt_user_recent_posts(u), keys.rt_user_recent_authors(u), keys.hated_authors(u),
                                  keys.follows(u), keys.rt_social_ts(u), keys.action_sequence(u))
            t = e.event_ts.timestamp()
            ets.append(t)
            h = seen_hour(t)
            sj = seen_of_hour.get(h)
            if sj is None:
                sj = seen_of_hour[h] = seen[seen_key(e, h)] = len(seen) + 1
            ev += (kind, f"{t:.6f}", pj, aj, uj, e.event_id, sj)
        head_keys = _HEAD_KEYS if "g" in parts else ()
        if ack is None:
            head = EngagementBatchArgs(seen_ttl, f"{write_s:.6f}", len(events), len(posts), len(authors), len(users),
                                       len(seen), parts=parts)
            return [*head_keys, *seen.keys(), *post_keys, *author_keys, *user_keys], [*head, *post_ids, *author_ids, *ev], ets
        stream, group, ids = ack
        if len(ids) != len(events):
            raise ValueError(f"{len(ids)} entry ids to acknowledge for {len(events)} events")
        head = EngagementBatchArgs(seen_ttl, f"{write_s:.6f}", len(events), len(posts), len(authors), len(users),
                                   len(seen), len(ids), parts=parts)
        return ([*head_keys, *seen.keys(), *post_keys, *author_keys, *user_keys, stream],
                [*head, *post_ids, *author_ids, *ev, group, *ids], ets)

    @staticmethod
    def split(events: list) -> list[tuple[str, list[int], object]]:
        """A cluster-mode batch's parts, one per hash tag (``engagement_batch.lua``'s header):
        ``(parts, event indexes in batch order, seen_key)`` for the global part (every event; slot
        ``{rt}``), one per post (its events; ``{p:<id>}``), one per author (its weighted events;
        ``{a:<id>}``) and one per user (its events that touch a user key; ``{u:<id>}``). Each part
        keeps its own idempotency sets in its own slot, so each is applied once per event id."""
        by_post: dict[int, list[int]] = {}
        by_author: dict[int, list[int]] = {}
        by_user: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            by_post.setdefault(e.post_id, []).append(i)
            if e.kind in _AUTHOR_KINDS:
                by_author.setdefault(e.author_id, []).append(i)
            if e.kind in _USER_KINDS:
                by_user.setdefault(e.user_id, []).append(i)
        out: list[tuple[str, list[int], object]] = [("g", list(range(len(events))), _global_seen)]
        out += [("p", idx, lambda e, h: keys.rt_post_seen_set(e.post_id, h)) for idx in by_post.values()]
        out += [("a", idx, lambda e, h: keys.rt_author_seen_set(e.author_id, h)) for idx in by_author.values()]
        out += [("u", idx, lambda e, h: keys.rt_user_seen_set(e.user_id, h)) for idx in by_user.values()]
        return out

    def queue(self, pipe, events: list, write_s: float, seen_ttl: int,
              ack: tuple[str, str, list[str]] | None = None) -> list[float]:
        """Queue the call for ``events`` on ``pipe`` and, with ``ack``, their XACK (``layout``);
        returns the events' times (epoch s). :meth:`take` reads its reply: per event 1 applied now,
        0 applied before.

        On a Redis Cluster the batch is queued as one call per part (:meth:`split`: each keeps to
        one slot; a ``ClusterPipeline`` sends each node its calls) and the XACK cannot join them
        (the stream has its own slot): ``ack`` must be None, the caller acknowledges after the
        writes.

        Raises:
            ValueError: ``ack`` on a cluster, or with another number of ids than events.
        """
        if not self.cluster:
            k, a, ets = self.layout(events, write_s, seen_ttl, ack)
            pipe.execute_command("EVALSHA", self.sha, len(k), *k, *a)
            return ets
        if ack is not None:
            raise ValueError("engagement_batch.lua cannot acknowledge in a cluster: the stream has its own slot")
        plan = self.split(events)
        for parts, idx, seen_key in plan:
            k, a, _ = self.layout([events[i] for i in idx], write_s, seen_ttl, parts=parts, seen_key=seen_key)
            queue_evalsha(pipe, self.sha, k, a)
        self._plans.append((len(events), plan))
        return [e.event_ts.timestamp() for e in events]

    def take(self, replies):
        """The reply of the next batch :meth:`queue`\ d, from the pipeline's ``replies`` iterator:
        per event 1 (applied now) or 0 (applied before), or the exception a call raised (cluster:
        the first of its parts' errors; the parts that succeeded stay applied and their markers
        make a retry skip them). On a cluster an event counts as applied now if any part applied it."""
        reply = next(replies)
        if not self.cluster:
            return reply
        n, plan = self._plans.popleft()
        out, error = [0] * n, None
        for j, (_, idx, _) in enumerate(plan):
            if j:
                reply = next(replies)
            if isinstance(reply, Exception):
                error = error or reply
                continue
            for i, r in zip(idx, reply):
                if r:
                    out[i] = 1
        return error if error is not None else out

    def discard(self) -> None:
        """Forget the plans of batches queued but not taken (a pipeline that failed as a whole)."""
        self._plans.clear()


# ---------------------------------------------------------------- social.lua
class SocialKeys(NamedTuple):
    """KEYS of ``social.lua`` (types checked by its guard, in this order)."""

    seen: str       # string: the event's idempotency marker
    social_ts: str  # hash: the user's last social action times
    follows: str    # set
    blocked: str    # set
    muted: str      # set

    @classmethod
    def of(cls, event_id: str, user_id: int) -> "SocialKeys":
        return cls(seen=keys.rt_user_seen_event(user_id, event_id), social_ts=keys.rt_social_ts(user_id),
                   follows=keys.follows(user_id), blocked=keys.blocked_authors(user_id),
                   muted=keys.muted_authors(user_id))


class SocialArgs(NamedTuple):
    """ARGV of ``social.lua``."""

    seen_ttl: int
    action: str     # follow | unfollow | block | mute
    author_id: int
    event_ts: str   # "%.6f"


SOCIAL = LuaScriptSpec(_PACKAGE, "social.lua", SocialKeys, SocialArgs, helpers=("guard.lua",))


# ---------------------------------------------------------------- graph_edge.lua
class GraphEdgeKeys(NamedTuple):
    """KEYS of ``graph_edge.lua``: all of one user (hash tag ``{u:user_id}``: one slot)."""

    seen: str       # string: this half's idempotency marker
    edge_ts: str    # hash: last edge action times of the user's pairs
    followees: str  # set
    followers: str  # set

    @classmethod
    def of(cls, event_id: str, user_id: int) -> "GraphEdgeKeys":
        return cls(seen=keys.graph_seen_event(user_id, event_id), edge_ts=keys.graph_edge_ts(user_id),
                   followees=keys.graph_followees(user_id), followers=keys.graph_followers(user_id))


class GraphEdgeArgs(NamedTuple):
    """ARGV of ``graph_edge.lua``."""

    seen_ttl: int
    side: str       # "out": the keys' user acted; "in": the keys' user was acted on
    action: str     # follow | unfollow | block
    other_id: int   # the other user of the pair
    event_ts: str   # "%.6f"


GRAPH_EDGE = LuaScriptSpec(_PACKAGE, "graph_edge.lua", GraphEdgeKeys, GraphEdgeArgs, helpers=("guard.lua",))


# ---------------------------------------------------------------- coverage_stamp.lua
class CoverageStampKeys(NamedTuple):
    coverage: str = keys.RT_COVERAGE


class CoverageStampArgs(NamedTuple):
    caught_up: str  # seconds, "%.3f" (EventBus.applied_until)


COVERAGE_STAMP = LuaScriptSpec(_PACKAGE, "coverage_stamp.lua", CoverageStampKeys, CoverageStampArgs)


# ---------------------------------------------------------------- the bus's scripts
class SkipTrimmedKeys(NamedTuple):
    stream: str         # the topic's stream
    dead_letters: str   # its dead-letter stream

    @classmethod
    def of(cls, topic: str) -> "SkipTrimmedKeys":
        return cls(stream=keys.event_stream(topic), dead_letters=keys.dead_letter_stream(topic))


class SkipTrimmedArgs(NamedTuple):
    group: str
    topic: str


SKIP_TRIMMED = LuaScriptSpec(_PACKAGE, "skip_trimmed.lua", SkipTrimmedKeys, SkipTrimmedArgs,
                             helpers=("stream_helpers.lua",))


class AppliedUntilKeys(NamedTuple):
    stream: str         # the topic's stream


class AppliedUntilArgs(NamedTuple):
    group: str


APPLIED_UNTIL = LuaScriptSpec(_PACKAGE, "applied_until.lua", AppliedUntilKeys, AppliedUntilArgs,
                              helpers=("stream_helpers.lua",))

ALL_SPECS: tuple[LuaScriptSpec, ...] = (ENGAGEMENT_BATCH, SOCIAL, GRAPH_EDGE, COVERAGE_STAMP, SKIP_TRIMMED, APPLIED_UNTIL)

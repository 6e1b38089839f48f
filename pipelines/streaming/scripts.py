"""The streaming seam's Lua scripts (``pipelines/streaming/lua/*.lua``) and their named KEYS / ARGV.

One spec per script: two ``NamedTuple`` records name its KEYS and ARGV in the order of the
script's ``unpack(KEYS)`` / ``unpack(ARGV)`` lines (checked when it is registered, ``core.lua``),
and build them from an event; ``SPEC.register(client)`` loads it at start-up and returns a callable
``script(keys, args, client=pipe)``. Keys come from ``core.online_layout``, constants from
``core.realtime``.

| script | prelude | run by | KEYS / ARGV |
| --- | --- | --- | --- |
| ``engagement.lua`` | ``guard.lua`` | ``StreamProcessor`` (one ``EngagementEvent``) | ``EngagementKeys`` / ``EngagementArgs`` |
| ``social.lua`` | ``guard.lua`` | ``StreamProcessor`` (one ``SocialGraphEvent``) | ``SocialKeys`` / ``SocialArgs`` |
| ``graph_edge.lua`` | ``guard.lua`` | ``StreamProcessor`` via ``pipelines.graph.SocialGraphWriter`` (one half of a ``SocialGraphEvent``) | ``GraphEdgeKeys`` / ``GraphEdgeArgs`` |
| ``coverage_stamp.lua`` | | ``StreamProcessor`` (liveness stamp) | ``CoverageStampKeys`` / ``CoverageStampArgs`` |
| ``skip_trimmed.lua`` | ``stream_helpers.lua`` | ``RedisStreamsBus.skip_trimmed`` | ``SkipTrimmedKeys`` / ``SkipTrimmedArgs`` |
| ``applied_until.lua`` | ``stream_helpers.lua`` | ``RedisStreamsBus.applied_until`` | ``AppliedUntilKeys`` / ``AppliedUntilArgs`` |
"""

from __future__ import annotations

from typing import NamedTuple

from core import online_layout as keys
from core import realtime
from core.lua import LuaScriptSpec
from core.history_features import SEQUENCE_LENGTH
from core.schema import POSITIVE_HEADS
from pipelines.sequences import ENGAGED_HEADS

_PACKAGE = "pipelines.streaming"


# ---------------------------------------------------------------- engagement.lua
class EngagementKeys(NamedTuple):
    """KEYS of ``engagement.lua`` (types checked by its guard, in this order)."""

    seen: str               # string: the event's idempotency marker
    counts: str             # hash: the post's 5-min bucket counts
    rt_meta: str            # hash: the post's last event / write times
    post_score: str         # hash: the post's decayed score
    author_score: str       # hash: the author's decayed score
    recent_posts: str       # zset: the user's recent engaged posts
    recent_authors: str     # zset: their authors
    hated: str              # set: the user's hated authors
    follows: str            # set: the user's follows
    social_ts: str          # hash: the user's last social action times
    index_post_meta: str    # hash: the candidate index's post metadata (read: tags)
    trending_posts: str     # zset
    trending_tags: str      # zset
    coverage: str           # hash: stream coverage
    action_sequence: str    # zset: the user action sequence (engaged posts)

    @classmethod
    def of(cls, event_id: str, user_id: int, post_id: int, author_id: int) -> "EngagementKeys":
        """The keys one engagement event touches. (Positional, in the field order above: it runs
        once per event and keywords cost ~1 us more; tests/unit/test_stream_scripts.py checks it
        against the keyword form.)"""
        return cls(keys.rt_seen_event(event_id), keys.rt_post_counts(post_id), keys.rt_post_meta(post_id),
                   keys.rt_post_score(post_id), keys.rt_author_score(author_id), keys.rt_user_recent_posts(user_id),
                   keys.rt_user_recent_authors(user_id), keys.hated_authors(user_id), keys.follows(user_id),
                   keys.rt_social_ts(user_id), keys.POST_META, keys.RT_TRENDING_POSTS, keys.RT_TRENDING_TAGS,
                   keys.RT_COVERAGE, keys.action_sequence(user_id))


class EngagementArgs(NamedTuple):
    """ARGV of ``engagement.lua``: the event's values and the ``core.realtime`` constants
    (defaults), as the strings / numbers Redis receives (times ``%.6f``, floats ``repr``)."""

    seen_ttl: int
    kind: str
    bucket_start: int               # start (s) of the event's bucket
    event_ts: str                   # event time, "%.6f"
    write_ts: str                   # processor clock at the write, "%.6f"
    weight: str                     # repr(kind_weight(kind))
    post_id: int
    author_id: int
    positive: int                   # 1 if kind is a positive head (recent engagements)
    engaged: int                    # 1 if kind is an engagement of the user action sequence (ENGAGED_HEADS)
    # the constants (core.realtime), last so they can default
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

    @classmethod
    def of(cls, kind: str, event_s: float, write_s: float, post_id: int, author_id: int,
           seen_ttl: int) -> "EngagementArgs":
        """Args of one engagement of ``kind`` at ``event_s`` written at ``write_s`` (epoch s).

        Positional like ``EngagementKeys.of`` (checked against the keyword form by the same test).

        Raises:
            ValueError: unknown ``kind``.
        """
        return cls(seen_ttl, kind, realtime.bucket_start(event_s), f"{event_s:.6f}", f"{write_s:.6f}",
                   repr(realtime.kind_weight(kind)), post_id, author_id, int(kind in POSITIVE_HEADS),
                   int(kind in ENGAGED_HEADS))


ENGAGEMENT = LuaScriptSpec(_PACKAGE, "engagement.lua", EngagementKeys, EngagementArgs, helpers=("guard.lua",))


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
        return cls(seen=keys.rt_seen_event(event_id), social_ts=keys.rt_social_ts(user_id),
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

ALL_SPECS: tuple[LuaScriptSpec, ...] = (ENGAGEMENT, SOCIAL, GRAPH_EDGE, COVERAGE_STAMP, SKIP_TRIMMED, APPLIED_UNTIL)

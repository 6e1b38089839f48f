"""The online store's layout: every Redis key home-mixer writes or reads is built here, and only here.

The writer and the readers of a key import its builder from this module, so they cannot disagree;
a unit test (``tests/unit/test_online_layout.py``) checks that every key built here is in the table
below and that no other module spells an ``hm:`` key. Ids are decimal strings, times epoch seconds
UTC. Keys of home-mixer start with ``PREFIX`` (``hm:``); Feast's keys never do (they start with a
little-endian key count, ``FeastRedisLayout``).

Hash tags (Redis Cluster). Redis Cluster puts a key in slot CRC16(tag) mod 16384, where the tag is
the part inside the key's first ``{...}`` (the whole key if it has none), and a Lua script or a
``MULTI`` may only touch keys of one slot (Redis Cluster specification, "Keys hash tags"). So every
key of one entity carries the entity's tag: ``{u:<user_id>}`` (a user's sets, sequences, timelines,
real-time zsets), ``{p:<post_id>}`` (a post's real-time counts (with its newest-event fields and score), fan-out progress,
co-engagement neighbours), ``{a:<author_id>}`` (an author's score and posts), ``{<topic>}`` (a
topic's stream and its dead letters), and the global real-time keys share ``{rt}`` (trending,
coverage, the post metadata that trending reads, the markers of a batch's global part). Keys without
a tag (the popular lists, tag posts, index meta, the mixer's streams, the global graph keys) are read
and written alone. A script that spans entities is run once per tag in cluster mode
(``pipelines.streaming.scripts.EngagementBatchScript``), each part idempotent by its own marker;
with one Redis the same keys serve, and the script runs once per batch.

Candidate index (``pipelines.candidate_index.build_candidate_index``, rebuilt as a whole: the keys of
``INDEX_KEY_PATTERNS`` and ``INDEX_SINGLE_KEYS`` are deleted first):

| builder | key | type | content | writer | readers |
| --- | --- | --- | --- | --- | --- |
| ``POST_META`` | ``hm:{rt}:post_meta`` | hash | post_id -> ``"author_id|created_ts|tag,tag"`` (``encode_post_meta``) | candidate index | ``PostMetadataHydrator``; ``engagement_batch.lua`` (a post's tags for trending) |
| ``INDEX_META`` | ``hm:index_meta`` | hash | ``as_of``, ``built_at``, one count per family | candidate index | mixer API (``as_of``), operators |
| ``author_posts(author_id)`` | ``hm:{a:{author_id}}:author_posts`` | zset | post_id -> created_ts | candidate index | ``InNetworkCandidateSource`` |
| ``popular(window)`` | ``hm:popular:{window}`` (``24h``, ``7d``) | zset | post_id -> weighted engagements in the window | candidate index | ``PopularCandidateSource`` |
| ``tag_posts(tag)`` | ``hm:tag_posts:{tag}`` | zset | post_id -> weighted engagements in the last 7 d (0 if none) | candidate index | ``TagInterestCandidateSource`` |
| ``engaged_authors(user_id)`` | ``hm:{u:{user_id}}:engaged_authors`` | zset | author_id -> summed engagement edge weight | candidate index | ``UserContextHydrator`` |
| ``tag_interest(user_id)`` | ``hm:{u:{user_id}}:tag_interest`` | zset | tag -> summed engagement weight of engaged posts with the tag | candidate index | ``UserContextHydrator`` |
| ``seen_posts(user_id)`` | ``hm:{u:{user_id}}:seen_posts`` | zset | post_id -> last impression time in the log | candidate index | ``UserContextHydrator`` (previously-seen filter) |
| ``action_sequence(user_id)`` | ``hm:{u:{user_id}}:seq`` | zset | ``"post_id|author_id|action"`` (``encode_action``) -> engagement time (epoch s, float): the user's last N engaged posts (``pipelines.sequences``) | candidate index (history before its cutoff); ``engagement_batch.lua`` (live engagements, capped at N) | ``UserActionSequenceQueryHydrator`` |
| ``coengagement(post_id)`` | ``hm:{p:{post_id}}:coeng`` | string | the top N neighbours (``pipelines.coengagement``) packed best first: (post_id int64, co-engagement cosine float64) little-endian records (``encode_neighbours``) | candidate index | ``CoEngagementCandidateSource``, ``HistoryFeatureHydrator`` |

Graph sets (author_ids; the index writes them from the log, the stream processor keeps them current):

| builder | key | type | writers | readers |
| --- | --- | --- | --- | --- |
| ``follows(user_id)`` | ``hm:{u:{user_id}}:follows`` | set | candidate index; ``social.lua`` (follow / unfollow / block), ``engagement_batch.lua`` (kind ``follow``) | ``UserContextHydrator`` |
| ``hated_authors(user_id)`` | ``hm:{u:{user_id}}:hated_authors`` | set | candidate index; ``engagement_batch.lua`` (kind ``hate``) | ``UserContextHydrator`` |
| ``blocked_authors(user_id)`` | ``hm:{u:{user_id}}:blocked_authors`` | set | ``social.lua`` (block) | ``UserContextHydrator`` |
| ``muted_authors(user_id)`` | ``hm:{u:{user_id}}:muted_authors`` | set | ``social.lua`` (mute) | ``UserContextHydrator`` |

The mixer's own records (a rebuild of the index leaves them alone):

| builder | key | type | content | writer | readers |
| --- | --- | --- | --- | --- | --- |
| ``served_posts(user_id)`` | ``hm:{u:{user_id}}:served`` | zset (TTL) | post_id -> wall-clock serve time | ``ServedPostsSideEffect`` | ``UserContextHydrator`` |
| ``SERVED_IMPRESSIONS`` | ``hm:served_impressions`` | stream (capped) | one entry per served post (fields in ``ImpressionLogSideEffect``) | ``ImpressionLogSideEffect`` | training-data / drift jobs |
| ``SERVED_FEATURES`` | ``hm:served_features`` | stream (capped, ``MAXLEN ~ feature_logging.stream_maxlen``) | one entry per served post: ids, request clock, model versions and the feature row the rankers saw (float64 bytes in ``ALL_FEATURES`` order; ``core.feature_log``) | ``FeatureLogSideEffect`` | ``pipelines.logged_features`` (``home-mixer train --from-logged``) |
| ``EXPLORATION_LOG`` | ``hm:exploration`` | stream (capped, ``MAXLEN ~ served.exploration_stream_maxlen``) | one entry per request of an exploring arm: the pool (ids, blended / light scores, heads) and the drawn slots with their propensities | ``ExplorationLogSideEffect`` | off-policy evaluation (``models.ope``) |
| ``SHADOW_LOG`` | ``hm:shadow`` | stream (capped, ``MAXLEN ~ experiment.shadow.stream_maxlen``) | one entry per shadow-scored request: the heavy-ranked posts with the served and the challenger heavy ranker's blended scores and ranks, the page positions | ``ShadowScoringSideEffect`` | ``monitoring.shadow`` (``home-mixer experiment shadow``) |
| ``DRIFT_SAMPLE`` | ``hm:drift_sample`` | stream (capped, ``MAXLEN ~ drift_sample.stream_maxlen``) | for a sampled share of requests, up to ``drift_sample.per_request`` heavy-ranked candidates each: ids, surface, arm, source, model versions, light / per-head / blended scores and the feature row | ``DriftSampleSideEffect`` | ``monitoring.production`` (``home-mixer monitor drift --window 1h``) |

Real-time features (stream processor, ``pipelines/streaming/lua/{engagement_batch,social}.lua``; the math
is in ``core.realtime``):

| builder | key | type | content | writer | readers |
| --- | --- | --- | --- | --- | --- |
| ``rt_seen_set(hour)`` | ``hm:{rt}:seen_h:{hour}`` | set (TTL) | ids of the applied events whose event time falls in the hour starting at ``hour`` (epoch s; ``core.realtime.seen_hour``): idempotency; in a cluster, the global part's (trending, coverage) | ``engagement_batch.lua`` | the same script |
| ``rt_post_seen_set(post_id, hour)`` | ``hm:{p:{post_id}}:rt:seen_h:{hour}`` | set (TTL) | the same for the events' post part (cluster mode) | ``engagement_batch.lua`` | the same script |
| ``rt_author_seen_set(author_id, hour)`` | ``hm:{a:{author_id}}:rt:seen_h:{hour}`` | set (TTL) | the same for the author part (cluster mode) | ``engagement_batch.lua`` | the same script |
| ``rt_user_seen_set(user_id, hour)`` | ``hm:{u:{user_id}}:rt:seen_h:{hour}`` | set (TTL) | the same for the user part (cluster mode) | ``engagement_batch.lua`` | the same script |
| ``rt_user_seen_event(user_id, event_id)`` | ``hm:{u:{user_id}}:rt:seen:{event_id}`` | string (TTL) | ``1``: the social event was applied | ``social.lua`` | the same script |
| ``rt_post_counts(post_id)`` | ``hm:{p:{post_id}}:rt:counts`` | hash (TTL) | ``{kind}:{bucket_start_s}`` -> count in that 5-min bucket; ``last_event_ts`` (newest event), ``last_write_ts``, ``score_v`` (decayed engagement score at time ``score_t``) (one hash, so a batch reads, writes and expires one key per post) | ``engagement_batch.lua`` | ``RealtimeFeatureReader`` (``window_sums.lua``, ``post_meta``, ``decayed_scores``); ``engagement_batch.lua`` |
| ``rt_author_score(author_id)`` | ``hm:{a:{author_id}}:rt:score`` | hash (TTL) | ``v`` decayed engagement score over the author's posts at time ``t`` (a post's own is in its counts hash) | ``engagement_batch.lua`` | ``RealtimeFeatureReader.decayed_scores`` |
| ``rt_user_recent_posts(user_id)`` | ``hm:{u:{user_id}}:rt:posts`` | zset | last 50 positively engaged posts -> event ts | ``engagement_batch.lua`` | ``RealtimeFeatureReader.user_recent`` |
| ``rt_user_recent_authors(user_id)`` | ``hm:{u:{user_id}}:rt:authors`` | zset | their authors -> event ts | ``engagement_batch.lua`` | ``RealtimeFeatureReader.user_recent`` |
| ``rt_social_ts(user_id)`` | ``hm:{u:{user_id}}:rt:social_ts`` | hash | ``{follow|block|mute}:{author_id}`` -> ts of the last applied action | ``engagement_batch.lua``, ``social.lua`` | the same scripts (stale actions are dropped) |
| ``RT_TRENDING_POSTS`` | ``hm:{rt}:trending:posts`` | zset | post -> log2 forward-decayed score | ``engagement_batch.lua`` | ``RealtimeFeatureReader.trending`` (``TrendingCandidateSource``) |
| ``RT_TRENDING_TAGS`` | ``hm:{rt}:trending:tags`` | zset | tag -> the same | ``engagement_batch.lua`` | ``RealtimeFeatureReader.trending`` |
| ``RT_COVERAGE`` | ``hm:{rt}:coverage`` | hash | ``newest``, ``first``, ``since`` event times; ``caught_up``: Redis server time before which the processors' group applied every entry (liveness) | ``engagement_batch.lua`` (event times), ``StreamProcessor`` (``HDEL`` after lost entries), ``coverage_stamp.lua`` (``caught_up``) | ``RealtimeFeatureReader.coverage`` (``RealtimeFeatureHydrator``) |

Social graph and home timelines (``pipelines.graph``). Every key carries a Redis Cluster hash tag
``{u:<user_id>}`` (``{p:<post_id>}`` for a post's fan-out progress), so the keys of one user share a
slot and every script touches one slot. A follow edge joins two users, so it is applied as two
single-slot halves (``graph_edge.lua`` on the follower, then on the followee), each idempotent by its
own seen marker; fan-out and the follow backfill write one user's timeline per command (a pipeline
spans slots, a command does not). The two global keys are ``DELETED_POSTS`` and
``FANOUT_CELEBRITIES`` (one slot each, read once per request with ``ZMSCORE``). Counts are ``SCARD`` of the sets (O(1) in Redis: a separate counter could
drift from its set, ``SCARD`` cannot). Timeline members are ``"post_id|author_id"``
(``encode_timeline_entry``), as Twitter's timeline service keeps (tweet id, author id) pairs, so the
read path filters unfollowed / blocked / muted authors without another lookup.

| builder | key | type | content | writer | readers |
| --- | --- | --- | --- | --- | --- |
| ``graph_followees(user_id)`` | ``hm:{u:{user_id}}:followees`` | set | author_ids the user follows | ``graph_edge.lua`` (``SocialGraphWriter``), ``SocialGraphStore.load_edges`` | ``HomeTimelineReader`` (unfollows at read), the read path |
| ``graph_followers(user_id)`` | ``hm:{u:{user_id}}:followers`` | set | user_ids following the user | ``graph_edge.lua``, ``SocialGraphStore.load_edges`` | ``FanoutWorker`` (``SSCAN`` pages, ``SCARD`` for the celebrity threshold) |
| ``graph_edge_ts(user_id)`` | ``hm:{u:{user_id}}:edge_ts`` | hash | ``out:{author_id}`` / ``in:{follower_id}`` -> ts of the last applied edge action (drops stale events) | ``graph_edge.lua`` | ``graph_edge.lua`` |
| ``graph_seen_event(user_id, event_id)`` | ``hm:{u:{user_id}}:seen:{event_id}`` | string (TTL) | ``1``: this half of the event was applied (idempotency) | ``graph_edge.lua`` | ``graph_edge.lua`` |
| ``home_timeline(user_id)`` | ``hm:{u:{user_id}}:timeline`` | zset (capped, ``fanout.timeline_length``) | ``"post_id|author_id"`` -> created time (epoch s) of the followees' posts | ``FanoutWorker``, follow backfill (``SocialGraphWriter``) | ``HomeTimelineReader`` (lazy cleanup: ``ZREM``) |
| ``user_posts(user_id)`` | ``hm:{u:{user_id}}:posts`` | zset (capped) | ``"post_id|author_id"`` -> created time: the author's own timeline | ``FanoutWorker`` | follow backfill, celebrity pulls (read path) |
| ``fanout_progress(post_id)`` | ``hm:{p:{post_id}}:fanout`` | hash (TTL) | ``cursor`` (``SSCAN`` cursor of the next page), ``pages`` written, ``done`` (``celebrity``: skipped) | ``FanoutWorker`` | ``FanoutWorker`` (a restarted worker resumes at ``cursor``) |
| ``FANOUT_CELEBRITIES`` | ``hm:fanout:celebrities`` | zset | author_id -> followers when the fan-out last skipped the author's post: the authors whose posts are pulled at read | ``FanoutWorker`` (``ZADD`` on a skip, ``ZREM`` on a push) | ``HomeTimelineReader`` (celebrity pulls) |
| ``DELETED_POSTS`` | ``hm:deleted_posts`` | zset | post_id -> deletion time (epoch s): tombstones honoured at read | ``SocialGraphStore.delete_post`` | ``HomeTimelineReader`` |

Event bus (``pipelines.streaming.bus.RedisStreamsBus``; stream ids ``"<ms>-<seq>"``, Redis server time):

| builder | key | type | content | writer | readers |
| --- | --- | --- | --- | --- | --- |
| ``event_stream(topic)`` | ``hm:events:{{topic}}`` | stream (``MAXLEN ~``), consumer groups | one event per entry (``events.encode_event``) | ``RedisStreamsBus.publish`` (``LogReplayer``, producers) | consumer groups (``StreamProcessor``); ``applied_until.lua``, ``skip_trimmed.lua`` |
| ``dead_letter_stream(topic)`` | ``hm:events:{{topic}}:dead`` | stream (never trimmed) | reason, original topic / id / group, ``orig:*`` fields | ``RedisStreamsBus`` (dead letters), ``skip_trimmed.lua`` | ``RedisStreamsBus.dead_letters``, ``backlog`` |

Feast online store (``feast materialize`` / push writes it; ``FeastLayoutFeatureHydrator`` reads it):

| builder | key | type | content | writer | readers |
| --- | --- | --- | --- | --- | --- |
| ``FEATURE_VERSION`` | ``hm:feature_version`` | string | wall-clock time (epoch s) of the last ``materialize``: the version that keys the mixer's feature cache | ``feature_repo.store.materialize`` | ``mixer.redis_health.read_versions`` (``StoreWatcher``) |
| ``FeastRedisLayout.key(view, **join_values)`` | ``<entity key v3><project>`` (bytes) | hash | field ``FeastRedisLayout.fields[view]`` (mmh3 of ``view:feature``) -> ``feast.types.Value``; ``_ts:{view}`` -> event time | Feast | ``FeastLayoutFeatureHydrator``, ``FeastSdkFeatureHydrator`` |
"""

from __future__ import annotations

import re
import struct

import numpy as np

from core.schema import FEATURE_VIEWS, FeatureViewSpec

PREFIX = "hm:"


# Redis Cluster hashes only the part inside a key's first {...} (its hash tag): every key of one
# user, post or author shares a slot, so each script and transaction touches one slot. An id of
# "*" gives the SCAN pattern of the family (e.g. ``action_sequence("*")``).
def _id(value) -> str:
    return "*" if value == "*" else str(int(value))


def _user_tag(user_id: int) -> str:
    return f"hm:{{u:{_id(user_id)}}}"


def _post_tag(post_id: int) -> str:
    return f"hm:{{p:{_id(post_id)}}}"


def _author_tag(author_id: int) -> str:
    return f"hm:{{a:{_id(author_id)}}}"

# ---------------------------------------------------------------- candidate index
POST_META = "hm:{rt}:post_meta"  # in the real-time slot: engagement_batch.lua reads tags with trending
INDEX_META = "hm:index_meta"


def author_posts(author_id: int) -> str:
    """zset post_id -> created time (epoch s)."""
    return f"{_author_tag(author_id)}:author_posts"


def popular(window: str) -> str:
    """zset post_id -> weighted engagements in the trailing window ("24h" or "7d")."""
    return f"hm:popular:{window}"


def tag_posts(tag: int) -> str:
    """zset post_id -> weighted engagements in the trailing 7 days (0 if none)."""
    return f"hm:tag_posts:{tag}"


def engaged_authors(user_id: int) -> str:
    """zset author_id -> summed RealGraph-style engagement weight."""
    return f"{_user_tag(user_id)}:engaged_authors"


def tag_interest(user_id: int) -> str:
    """zset tag -> summed engagement weight of the user's engaged posts carrying the tag."""
    return f"{_user_tag(user_id)}:tag_interest"


def seen_posts(user_id: int) -> str:
    """zset post_id -> last impression time (epoch s) in the log."""
    return f"{_user_tag(user_id)}:seen_posts"


def action_sequence(user_id: int) -> str:
    """zset ``encode_action(post, author, action)`` -> engagement time (epoch s): the user action sequence."""
    return f"{_user_tag(user_id)}:seq"


def coengagement(post_id: int) -> str:
    """string: the post's top N co-engagement neighbours, packed (``encode_neighbours``)."""
    return f"{_post_tag(post_id)}:coeng"


# One neighbour of a packed list: 16 bytes, so the top n of a list are its first 16 n bytes (one
# GETRANGE). A zset of 200 members cost 6 ms per 32 lists to read and parse in redis-py (each pair
# a Python tuple); the packed form 0.55 ms, in 60 % of the memory (bench numbers: README).
NEIGHBOUR_DTYPE = np.dtype([("post_id", "<i8"), ("similarity", "<f8")])


def encode_neighbours(post_ids, similarities) -> bytes:
    """The value of ``coengagement(post)``: the neighbours as ``NEIGHBOUR_DTYPE`` records, best
    first (similarity descending, ties by post id ascending).

    Args:
        post_ids: int array-like [n]; similarities: float array-like [n] (finite).

    Raises:
        ValueError: the arrays differ in length, or a similarity is not finite.
    """
    ids = np.asarray(post_ids, dtype="int64")
    sims = np.asarray(similarities, dtype="float64")
    if ids.shape != sims.shape or ids.ndim != 1:
        raise ValueError(f"post_ids {ids.shape} and similarities {sims.shape} must be aligned 1-d arrays")
    if not np.isfinite(sims).all():
        raise ValueError("co-engagement similarities must be finite")
    order = np.lexsort((ids, -sims))
    out = np.empty(len(ids), dtype=NEIGHBOUR_DTYPE)
    out["post_id"], out["similarity"] = ids[order], sims[order]
    return out.tobytes()


def decode_neighbours(raw: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``encode_neighbours`` (or its first records, read with GETRANGE): ``(post ids
    int64 [n], similarities float64 [n])``, best first; empty arrays for None or b"".

    Raises:
        ValueError: the length is not a whole number of records (written by another version:
            rebuild the candidate index).
    """
    if not raw:
        return np.zeros(0, dtype="int64"), np.zeros(0, dtype="float64")
    if len(raw) % NEIGHBOUR_DTYPE.itemsize:
        raise ValueError(f"a co-engagement list of {len(raw)} bytes is not whole {NEIGHBOUR_DTYPE.itemsize}-byte "
                         "records: the candidate index was written by another version; rebuild it "
                         "(`home-mixer index build`)")
    rec = np.frombuffer(raw, dtype=NEIGHBOUR_DTYPE)
    return rec["post_id"].copy(), rec["similarity"].copy()


def encode_action(post_id: int, author_id: int, action: str) -> str:
    """``"post_id|author_id|action"``: one member of ``action_sequence``."""
    return f"{int(post_id)}|{int(author_id)}|{action}"


def decode_action(value: bytes | str) -> tuple[int, int, str]:
    """Inverse of ``encode_action``: ``(post_id, author_id, action)``.

    Raises:
        ValueError: not in the ``post|author|action`` form (rebuild the index).
    """
    text = value.decode() if isinstance(value, bytes) else value
    parts = text.split("|")
    if len(parts) != 3:
        raise ValueError(f"bad action sequence member {text!r}: expected 'post|author|action'; rebuild the index")
    return int(parts[0]), int(parts[1]), parts[2]


# ---------------------------------------------------------------- graph sets
def follows(user_id: int) -> str:
    """set of author_ids the user follows (index; kept current by the stream processor)."""
    return f"{_user_tag(user_id)}:follows"


def hated_authors(user_id: int) -> str:
    """set of author_ids whose posts the user marked with hate (index; stream processor)."""
    return f"{_user_tag(user_id)}:hated_authors"


def blocked_authors(user_id: int) -> str:
    """set of author_ids the user blocked (written by the stream processor)."""
    return f"{_user_tag(user_id)}:blocked_authors"


def muted_authors(user_id: int) -> str:
    """set of author_ids the user muted (written by the stream processor)."""
    return f"{_user_tag(user_id)}:muted_authors"


# ---------------------------------------------------------------- the mixer's records
SERVED_IMPRESSIONS = "hm:served_impressions"
SERVED_FEATURES = "hm:served_features"  # feature logging: core.feature_log encodes the entries
EXPLORATION_LOG = "hm:exploration"  # exploring requests' pools (off-policy evaluation)
SHADOW_LOG = "hm:shadow"  # shadow-scored requests: the challenger's scores and ranks beside the served ones
DRIFT_SAMPLE = "hm:drift_sample"  # the production sample of drift monitoring


def served_posts(user_id: int) -> str:
    """zset post_id -> wall-clock time (epoch s) the mixer served it (written by the mixer, TTL)."""
    return f"{_user_tag(user_id)}:served"


# Patterns of every key the index builder owns (a rebuild deletes them first). Served records and
# the impression stream belong to the mixer and survive a rebuild.
INDEX_KEY_PATTERNS: tuple[str, ...] = (
    "hm:{a:*}:author_posts", "hm:popular:*", "hm:tag_posts:*", "hm:{u:*}:follows", "hm:{u:*}:engaged_authors",
    "hm:{u:*}:tag_interest", "hm:{u:*}:hated_authors", "hm:{u:*}:seen_posts", "hm:{u:*}:seq", "hm:{p:*}:coeng",
)
INDEX_SINGLE_KEYS: tuple[str, ...] = (POST_META, INDEX_META)


def encode_post_meta(author_id: int, created_ts: int, tags: list[int] | tuple[int, ...]) -> str:
    """``"author_id|created_ts|t1,t2"`` (created_ts in epoch seconds)."""
    return f"{int(author_id)}|{int(created_ts)}|{','.join(str(int(t)) for t in tags)}"


def decode_post_meta(value: bytes | str) -> tuple[int, int, tuple[int, ...]]:
    """Inverse of ``encode_post_meta``: ``(author_id, created_ts, tags)``.

    Raises:
        ValueError: the value is not in the ``author|created|tags`` form (index written by another
            version: rebuild it with ``pipelines.candidate_index.build_candidate_index``).
    """
    text = value.decode() if isinstance(value, bytes) else value
    parts = text.split("|")
    if len(parts) != 3:
        raise ValueError(f"bad {POST_META} value {text!r}: expected 'author|created_ts|tags'; rebuild the index")
    tags = tuple(int(t) for t in parts[2].split(",") if t)
    return int(parts[0]), int(parts[1]), tags


# ---------------------------------------------------------------- real-time features
_RT_TAG = "hm:{rt}"  # the real-time slot: trending, coverage, post metadata, the global part's markers
RT_TRENDING_POSTS = f"{_RT_TAG}:trending:posts"
RT_TRENDING_TAGS = f"{_RT_TAG}:trending:tags"
RT_COVERAGE = f"{_RT_TAG}:coverage"
# Every key family the stream processor writes (a bench or a test resets the real-time state with these).
RT_KEY_PATTERNS: tuple[str, ...] = (
    "hm:{rt}:trending:*", "hm:{rt}:coverage", "hm:{rt}:seen:*", "hm:{rt}:seen_h:*", "hm:{p:*}:rt:*", "hm:{a:*}:rt:*", "hm:{u:*}:rt:*",
    "hm:{u:*}:follows", "hm:{u:*}:hated_authors", "hm:{u:*}:blocked_authors", "hm:{u:*}:muted_authors",
)


def rt_seen_set(hour: int) -> str:
    """set (TTL): ids of the applied engagement events whose event time lies in the hour starting at
    ``hour`` (epoch s, ``core.realtime.seen_hour``); a batch's global part in a cluster.

    One set per event hour instead of one key per event: a batch checks its ids with one
    ``SMISMEMBER`` and marks them with one ``SADD`` per hour, where a key per event cost a write
    command per event. A redelivery carries its event's time, so it meets its id in the same set."""
    return f"{_RT_TAG}:seen_h:{hour}"


def rt_post_seen_set(post_id: int, hour: int) -> str:
    """set (TTL): the events of ``hour`` whose post part was applied (cluster mode: one set per
    slot's part)."""
    return f"{_post_tag(post_id)}:rt:seen_h:{hour}"


def rt_author_seen_set(author_id: int, hour: int) -> str:
    """set (TTL): the events of ``hour`` whose author part was applied (cluster mode)."""
    return f"{_author_tag(author_id)}:rt:seen_h:{hour}"


def rt_user_seen_set(user_id: int, hour: int) -> str:
    """set (TTL): the events of ``hour`` whose user part was applied (cluster mode)."""
    return f"{_user_tag(user_id)}:rt:seen_h:{hour}"


def rt_user_seen_event(user_id: int, event_id: str) -> str:
    """string (TTL): idempotency marker of one applied social event (``social.lua``)."""
    return f"{_user_tag(user_id)}:rt:seen:{event_id}"


def rt_post_counts(post_id: int) -> str:
    """hash ``{kind}:{bucket_start_s}`` -> count, ``last_event_ts`` / ``last_write_ts`` (epoch s: the
    post's newest event and the last write) and ``score_v`` / ``score_t`` (the decayed engagement
    score at ``score_t``, epoch s); the fields without a bucket are skipped by the window readers."""
    return f"{_post_tag(post_id)}:rt:counts"


def rt_author_score(author_id: int) -> str:
    """hash ``v`` (decayed engagement score at ``t``), ``t`` (epoch s), over all of the author's
    posts (a post's own score: ``score_v`` / ``score_t`` of ``rt_post_counts``)."""
    return f"{_author_tag(author_id)}:rt:score"


def rt_user_recent_posts(user_id: int) -> str:
    """zset post_id -> newest positive engagement ts, capped at ``core.realtime.RECENT_CAP``."""
    return f"{_user_tag(user_id)}:rt:posts"


def rt_user_recent_authors(user_id: int) -> str:
    """zset author_id -> newest positive engagement ts, capped at ``core.realtime.RECENT_CAP``."""
    return f"{_user_tag(user_id)}:rt:authors"


def rt_social_ts(user_id: int) -> str:
    """hash ``{follow|block|mute}:{author_id}`` -> ts of the last applied action (drops stale events)."""
    return f"{_user_tag(user_id)}:rt:social_ts"


# ---------------------------------------------------------------- social graph and home timelines
DELETED_POSTS = "hm:deleted_posts"
FANOUT_CELEBRITIES = "hm:fanout:celebrities"
# Every key family of the graph and timelines (a bench or a test resets them with these).
GRAPH_KEY_PATTERNS: tuple[str, ...] = ("hm:{u:*}:followees", "hm:{u:*}:followers", "hm:{u:*}:edge_ts",
                                        "hm:{u:*}:seen:*", "hm:{u:*}:timeline", "hm:{u:*}:posts",
                                        "hm:{p:*}:fanout", DELETED_POSTS, FANOUT_CELEBRITIES)
# SCAN pattern of every user's followee set (``SocialGraphStore.snapshot``); ``graph_key_user`` parses one.
GRAPH_FOLLOWEES_PATTERN = "hm:{u:*}:followees"


def graph_key_user(key: bytes | str) -> int:
    """The user id of a graph key (``hm:{u:123}:...`` -> 123).

    Raises:
        ValueError: not a key of ``_user_tag``'s form.
    """
    text = key.decode() if isinstance(key, bytes) else key
    head, sep, rest = text.partition("{u:")
    uid, close, _ = rest.partition("}")
    if head != PREFIX or not sep or not close or not uid.isdigit():
        raise ValueError(f"{text!r} is not a graph key of the form hm:{{u:<id>}}:...")
    return int(uid)




def graph_followees(user_id: int) -> str:
    """set of author_ids the user follows (the graph service; hash tag ``{u:user_id}``)."""
    return f"{_user_tag(user_id)}:followees"


def graph_followers(user_id: int) -> str:
    """set of user_ids that follow the user (hash tag ``{u:user_id}``)."""
    return f"{_user_tag(user_id)}:followers"


def graph_edge_ts(user_id: int) -> str:
    """hash ``out:{author}`` / ``in:{follower}`` -> ts (epoch s) of the last applied edge action."""
    return f"{_user_tag(user_id)}:edge_ts"


def graph_seen_event(user_id: int, event_id: str) -> str:
    """string (TTL): this user's half of a social event was applied (idempotency)."""
    return f"{_user_tag(user_id)}:seen:{event_id}"


def home_timeline(user_id: int) -> str:
    """zset ``"post|author"`` -> created time (epoch s): the pushed home timeline, capped."""
    return f"{_user_tag(user_id)}:timeline"


def user_posts(user_id: int) -> str:
    """zset ``"post|author"`` -> created time (epoch s): the author's own timeline, capped."""
    return f"{_user_tag(user_id)}:posts"


def fanout_progress(post_id: int) -> str:
    """hash (TTL) ``cursor``, ``pages``, ``done``: a post's fan-out checkpoint."""
    return f"{_post_tag(post_id)}:fanout"


def encode_timeline_entry(post_id: int, author_id: int) -> str:
    """``"post_id|author_id"``: one member of ``home_timeline`` / ``user_posts``."""
    return f"{int(post_id)}|{int(author_id)}"


def decode_timeline_entry(value: bytes | str) -> tuple[int, int]:
    """Inverse of ``encode_timeline_entry``: ``(post_id, author_id)``.

    Raises:
        ValueError: not in the ``post|author`` form (written by another version: clear the timelines).
    """
    text = value.decode() if isinstance(value, bytes) else value
    post, sep, author = text.partition("|")
    if not sep:
        raise ValueError(f"bad timeline entry {text!r}: expected 'post|author'")
    return int(post), int(author)


# ---------------------------------------------------------------- event bus
EVENT_STREAM_PREFIX = "hm:events:"
DEAD_LETTER_SUFFIX = ":dead"
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def event_stream(topic: str) -> str:
    """Redis key of a topic's stream: ``hm:events:{<topic>}``.

    Raises:
        ValueError: the topic is empty, longer than 100 characters or has characters other than
            letters, digits, ``_ . -`` (a ``:`` would collide with the dead-letter suffix).
    """
    if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
        raise ValueError(f"bad topic {topic!r}: use 1-100 letters, digits, '_', '.', '-' (e.g. 'engagements')")
    return f"{EVENT_STREAM_PREFIX}{{{topic}}}"  # the topic as hash tag: the stream and its dead letters share a slot


def dead_letter_stream(topic: str) -> str:
    """Redis key of a topic's dead-letter stream: ``hm:events:{<topic>}:dead``."""
    return event_stream(topic) + DEAD_LETTER_SUFFIX


# ---------------------------------------------------------------- Feast's online store
FEATURE_VERSION = "hm:feature_version"  # bumped by every materialize; keys the mixer's feature cache
_STRING, _INT64 = 2, 4  # feast ValueType enum values used in key serialisation


class FeastRedisLayout:
    """Keys and fields of Feast's Redis online store for the feature views of ``core.schema``.

    Layout (feast 0.67, ``feast/infra/online_stores/redis.py`` + ``helpers.py``), one Redis hash per entity:
    - key = ``serialize_entity_key(EntityKeyProto, v3) + project.encode()`` (``helpers._redis_key``).
      v3 serialisation: ``<I n_keys>``, then per join key *sorted by name* ``<I STRING=2><I len><utf8>``,
      then per value in the same order ``<I INT64=4><I 8><q value>`` (all little-endian). So the
      social view (user_id, author_id) is keyed author_id first. A view's join keys are the same for
      every view sharing them: the user view and the temporal view share one hash per user.
    - field = ``helpers._mmh3(f"{view}:{feature}")`` (4 bytes, murmur3 32-bit little-endian);
      ``_ts:{view}`` holds the row's event time as a protobuf Timestamp.
    - value = ``feast.types.Value`` protobuf (decoded by ``mixer.feature_hydrators.feast_layout``).

    Keys are built from a per-view byte header (fast), checked at construction against Feast's
    own ``_redis_key`` so a Feast upgrade that changes the layout fails loudly at start-up.

    Args:
        project: Feast project name (``feature_store.yaml``), e.g. ``"home_mixer"``.
        entity_key_serialization_version: must be 3 (the only version this layout supports).

    Raises:
        ValueError: another serialisation version, or Feast builds different keys than the template.
    """

    def __init__(self, project: str = "home_mixer", entity_key_serialization_version: int = 3,
                 views: tuple[FeatureViewSpec, ...] = FEATURE_VIEWS):
        if entity_key_serialization_version != 3:
            raise ValueError(
                f"only entity_key_serialization_version 3 is supported, got {entity_key_serialization_version}; "
                "set it to 3 in feature_store.yaml"
            )
        from feast.infra.online_stores.helpers import _mmh3

        self.project = project
        self._project_bytes = project.encode("utf-8")
        self.views = {v.name: v for v in views}
        self.fields: dict[str, list[bytes]] = {
            v.name: [_mmh3(f"{v.name}:{f}") for f in v.features] for v in views
        }
        self._sorted_keys: dict[str, tuple[str, ...]] = {}
        self._headers: dict[str, bytes] = {}
        for v in views:
            ordered = tuple(sorted(v.join_keys))
            header = [struct.pack("<I", len(ordered))]
            for k in ordered:
                kb = k.encode("utf8")
                header.append(struct.pack("<II", _STRING, len(kb)) + kb)
            self._sorted_keys[v.name] = ordered
            self._headers[v.name] = b"".join(header)
        self._check_against_feast()

    def key(self, view: str, **join_values: int) -> bytes:
        """Redis key of one entity row of ``view`` (join key name -> int64 value)."""
        parts = [self._headers[view]]
        for k in self._sorted_keys[view]:
            parts.append(struct.pack("<IIq", _INT64, 8, int(join_values[k])))
        parts.append(self._project_bytes)
        return b"".join(parts)

    def keys(self, view: str, name: str, values, **fixed: int) -> list[bytes]:
        """Redis keys of ``view`` for every value of join key ``name``, the other join keys
        ``fixed``: the bytes of :meth:`key`, packed at once with numpy (a request reads ~1,000 rows;
        one ``key`` call per row cost about 1.2 µs, a tenth of that here).

        Args:
            values: int64-like ``[N]``; fixed: the other join keys' values.

        Raises:
            KeyError: a join key of ``view`` is neither ``name`` nor in ``fixed``.
        """
        vals = np.asarray(values, dtype=np.int64).reshape(-1)
        columns = {k: (vals if k == name else np.full(len(vals), int(fixed[k]), dtype=np.int64))
                   for k in self._sorted_keys[view]}
        return self.keys_of(view, columns)

    def keys_of(self, view: str, columns: dict[str, np.ndarray]) -> list[bytes]:
        """Redis keys of ``view`` for ``N`` entity rows given column-wise (join key name -> int64
        ``[N]``), packed at once with numpy (materialisation writes a million keys).

        Raises:
            KeyError: a join key of ``view`` is missing from ``columns``.
        """
        ordered = self._sorted_keys[view]
        n = len(np.asarray(columns[ordered[0]]).reshape(-1))
        body = np.empty((n, len(ordered), 2), dtype="<u4")
        body[:, :, 0], body[:, :, 1] = _INT64, 8
        ints = np.empty((n, len(ordered)), dtype="<i8")
        for j, k in enumerate(ordered):
            ints[:, j] = np.asarray(columns[k], dtype=np.int64).reshape(-1)
        rows = np.concatenate([body, ints.view("<u4").reshape(n, len(ordered), 2)], axis=2)
        buf, width = rows.tobytes(), 16 * len(ordered)
        head, tail = self._headers[view], self._project_bytes
        return [head + buf[i:i + width] + tail for i in range(0, len(buf), width)]

    def feast_key(self, view: str, **join_values: int) -> bytes:
        """The same key built by Feast (``helpers._redis_key``); slower, for checks."""
        from feast.infra.online_stores.helpers import _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        names = list(self.views[view].join_keys)
        proto = EntityKey(join_keys=names, entity_values=[Value(int64_val=int(join_values[n])) for n in names])
        return _redis_key(self.project, proto, entity_key_serialization_version=3)

    def _check_against_feast(self) -> None:
        for name, spec in self.views.items():
            sample = {k: (-(7 ** (i + 3)) if i % 2 else 2 ** 40 + i) for i, k in enumerate(spec.join_keys)}
            if self.key(name, **sample) != self.feast_key(name, **sample):
                raise ValueError(f"Feast's Redis key layout for view {name} differs from this layout's; "
                                 "the installed feast version is not supported by core.online_layout")

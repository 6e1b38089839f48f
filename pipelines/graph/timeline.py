"""The read side of pushed home timelines: read, filter what must not be shown, clean up lazily.

Fan-out writes a post into every follower's timeline when it is created; what happens after that
(the post is deleted, the follower unfollows or blocks the author) is honoured here, at read, and
not by another fan-out: ``filter_timeline`` drops entries whose post has a tombstone
(``DELETED_POSTS``), whose author the user no longer follows (``graph_followees``) or has blocked,
and hides muted authors. The dropped entries that can never come back (deleted, unfollowed,
blocked) are removed from the timeline by the same read (lazy cleanup, one ``ZREM``): a re-follow
backfills the author's recent posts again (``SocialGraphWriter.backfill``). Muted entries stay
(hidden, not deleted). The in-network candidate source calls ``HomeTimelineReader.read``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import redis

from core import online_layout as keys


@dataclass(frozen=True)
class TimelineEntry:
    """One post of a home timeline: ``post_id``, ``author_id`` (int64) and ``created_ts`` (epoch s)."""

    post_id: int
    author_id: int
    created_ts: float


@dataclass(frozen=True)
class TimelineFilterResult:
    """``kept``: entries to show, newest first; ``stale``: raw members to remove from the timeline
    (deleted / unfollowed / blocked); ``hidden``: how many muted entries were skipped (kept stored)."""

    kept: list[TimelineEntry]
    stale: list[bytes | str]
    hidden: int


def filter_timeline(members: list[tuple[bytes | str, float]], followed: Collection[int], deleted: Collection[int],
                    blocked: Collection[int] = (), muted: Collection[int] = (),
                    always_follow: Collection[int] = ()) -> TimelineFilterResult:
    """Apply deletes, unfollows, blocks and mutes to raw timeline members (pure; no Redis).

    Args:
        members: ``(member, created_ts)`` as ``ZREVRANGE ... WITHSCORES`` returns them
            (``encode_timeline_entry`` members), newest first.
        followed: author ids the user follows now (those among the members' authors suffice).
        deleted: post ids with a tombstone.
        blocked, muted: the user's blocked / muted author ids (query hydration has them).
        always_follow: authors exempt from the follow check (e.g. the user's own posts).

    Raises:
        ValueError: a member not in the ``post|author`` form.
    """
    kept, stale, hidden = [], [], 0
    for member, score in members:
        post, author = keys.decode_timeline_entry(member)
        if post in deleted or author in blocked or (author not in followed and author not in always_follow):
            stale.append(member)
        elif author in muted:
            hidden += 1
        else:
            kept.append(TimelineEntry(post, author, float(score)))
    return TimelineFilterResult(kept, stale, hidden)


class HomeTimelineReader:
    """Reads a user's pushed home timeline with ``filter_timeline`` applied, in two round trips
    (the timeline; then the authors' follow flags and the posts' tombstones), and removes stale
    entries (module docstring) in a third, fire-and-forget one only when there are any.

    Args:
        client: ``redis.Redis`` of the online store.
        overscan: read this many times ``limit`` entries, so filtered ones leave ``limit`` to show.
    """

    def __init__(self, client: redis.Redis, overscan: float = 1.5):
        if overscan < 1:
            raise ValueError(f"overscan must be >= 1, got {overscan}")
        self.client = client
        self.overscan = overscan

    def read(self, user_id: int, limit: int, blocked: Collection[int] = (), muted: Collection[int] = (),
             cleanup: bool = True, max_rounds: int = 4) -> TimelineFilterResult:
        """The newest ``limit`` showable entries of ``user_id``'s home timeline (fewer if it has fewer).

        Reads ``limit * overscan`` entries; when the filter leaves fewer than ``limit``, reads the
        next window too, at most ``max_rounds`` windows (a timeline of mostly stale entries costs
        a bounded number of round trips; the cleanup shrinks it for the next read).

        Raises:
            redis.RedisError: the store is unreachable (the candidate source fails open on it).
        """
        if limit < 1:
            return TimelineFilterResult([], [], 0)
        key = keys.home_timeline(user_id)
        window = max(int(limit * self.overscan), limit + 1)
        kept, stale, hidden = [], [], 0
        for start in range(0, window * max_rounds, window):
            members = self.client.zrevrange(key, start, start + window - 1, withscores=True)
            if members:
                res = self._filter(user_id, members, blocked, muted)
                kept += res.kept
                stale += res.stale
                hidden += res.hidden
            if len(kept) >= limit or len(members) < window:
                break
        if cleanup and stale:
            self.client.zrem(key, *stale)
        return TimelineFilterResult(kept[:limit], stale, hidden)

    def _filter(self, user_id: int, members: list, blocked: Collection[int],
                muted: Collection[int]) -> TimelineFilterResult:
        """One window: the authors' follow flags and the posts' tombstones in one round trip, then
        ``filter_timeline``."""
        decoded = [keys.decode_timeline_entry(m) for m, _ in members]
        authors = sorted({a for _, a in decoded})
        pipe = self.client.pipeline(transaction=False)
        pipe.smismember(keys.graph_followees(user_id), authors)
        pipe.zmscore(keys.DELETED_POSTS, [str(p) for p, _ in decoded])
        follow_flags, tombstones = pipe.execute()
        followed = {a for a, f in zip(authors, follow_flags) if f}
        deleted = {p for (p, _), t in zip(decoded, tombstones) if t is not None}
        return filter_timeline(members, followed, deleted, blocked, muted)

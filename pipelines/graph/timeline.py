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

import heapq
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
                    always_follow: Collection[int] = (),
                    decoded: list[tuple[int, int]] | None = None) -> TimelineFilterResult:
    """Apply deletes, unfollows, blocks and mutes to raw timeline members (pure; no Redis).

    Args:
        members: ``(member, created_ts)`` as ``ZREVRANGE ... WITHSCORES`` returns them
            (``encode_timeline_entry`` members), newest first.
        followed: author ids the user follows now (those among the members' authors suffice).
        deleted: post ids with a tombstone.
        blocked, muted: the user's blocked / muted author ids (query hydration has them).
        always_follow: authors exempt from the follow check (e.g. the user's own posts).
        decoded: ``(post_id, author_id)`` of each member when the caller has decoded them already.

    Raises:
        ValueError: a member not in the ``post|author`` form.
    """
    kept, stale, hidden = [], [], 0
    if decoded is None:
        decoded = [keys.decode_timeline_entry(m) for m, _ in members]
    for (member, score), (post, author) in zip(members, decoded):
        if post in deleted or author in blocked or (author not in followed and author not in always_follow):
            stale.append(member)
        elif author in muted:
            hidden += 1
        else:
            kept.append(TimelineEntry(post, author, float(score)))
    return TimelineFilterResult(kept, stale, hidden)


@dataclass(frozen=True)
class HomeTimelineRead:
    """What ``HomeTimelineReader.read`` returns.

    Attributes:
        entries: the showable posts, newest first, at most ``limit``: pushed ones and those pulled
            from followed celebrities, one per post id.
        pulled: post ids among ``entries`` that came from celebrity pulls.
        celebrities: the followed celebrities pulled, strongest edge first.
        stale: members removed from the pushed timeline (deleted / unfollowed / blocked).
        hidden: muted entries skipped.
    """

    entries: list[TimelineEntry]
    pulled: frozenset[int]
    celebrities: list[int]
    stale: list[bytes | str]
    hidden: int


class HomeTimelineReader:
    """A user's home timeline as the in-network source serves it: the pushed timeline with
    ``filter_timeline`` applied, merged with the latest posts of the followed celebrities (the
    authors the fan-out skipped, ``FANOUT_CELEBRITIES``), pulled at read (Twitter's hybrid).

    Round trips: (1) the newest pushed entries created at or before ``until`` and the user's
    followees; (2) the entries' tombstones and which followees are celebrities; (3) the strongest
    ``max_celebrity_pulls`` celebrities' latest posts (only when there are any). A window whose
    entries are mostly filtered out reads the next one (at most ``max_rounds``). Stale entries are
    removed in one more, fire-and-forget ``ZREM`` (a failure there only delays the cleanup).

    Args:
        client: ``redis.Redis`` of the online store.
        overscan: read this many times ``limit`` pushed entries, so filtered ones leave ``limit``.
        max_rounds: pushed windows read at most per call.
    """

    def __init__(self, client: redis.Redis, overscan: float = 1.5, max_rounds: int = 4):
        if overscan < 1 or max_rounds < 1:
            raise ValueError(f"need overscan >= 1 and max_rounds >= 1, got {overscan}, {max_rounds}")
        self.client = client
        self.overscan = overscan
        self.max_rounds = max_rounds

    def read(self, user_id: int, limit: int, *, until: float | str = "+inf", blocked: Collection[int] = (),
             muted: Collection[int] = (), strength: dict[int, float] | None = None, max_celebrity_pulls: int = 0,
             posts_per_celebrity: int = 20, cleanup: bool = True) -> HomeTimelineRead:
        """The newest ``limit`` showable posts of ``user_id``'s home timeline created at or before
        ``until`` (epoch s; a replayed request time sees only older posts).

        Args:
            blocked, muted: the user's blocked / muted authors (query hydration has them).
            strength: author -> edge strength (e.g. RealGraph engagement weight); celebrities are
                pulled strongest first, then by follower count.
            max_celebrity_pulls: followed celebrities pulled at most (0: pushed timeline only).
            posts_per_celebrity: latest posts pulled per celebrity.

        Raises:
            redis.RedisError: the store is unreachable (the candidate source fails open on it).
        """
        if limit < 1:
            return HomeTimelineRead([], frozenset(), [], [], 0)
        key, window = keys.home_timeline(user_id), max(int(limit * self.overscan), limit + 1)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrangebyscore(key, until, "-inf", start=0, num=window, withscores=True)
        pipe.smembers(keys.graph_followees(user_id))
        members, followees = pipe.execute()
        followed = {int(a) for a in followees}
        pulls = sorted(followed) if max_celebrity_pulls > 0 else []
        kept, stale, hidden, celeb_counts = [], [], 0, None
        for start in range(0, window * self.max_rounds, window):
            if start:
                members = self.client.zrevrangebyscore(key, until, "-inf", start=start, num=window, withscores=True)
            decoded = [keys.decode_timeline_entry(m) for m, _ in members]
            pipe = self.client.pipeline(transaction=False)
            if decoded:
                pipe.zmscore(keys.DELETED_POSTS, [str(p) for p, _ in decoded])
            if celeb_counts is None and pulls:
                pipe.zmscore(keys.FANOUT_CELEBRITIES, [str(a) for a in pulls])
            got = pipe.execute() if len(pipe) else []
            tombstones = got.pop(0) if decoded else []
            if celeb_counts is None:
                celeb_counts = {a: c for a, c in zip(pulls, got[0])} if pulls else {}
            deleted = {p for (p, _), t in zip(decoded, tombstones) if t is not None}
            res = filter_timeline(members, followed, deleted, blocked, muted, decoded=decoded)
            kept += res.kept
            stale += res.stale
            hidden += res.hidden
            if len(kept) >= limit or len(members) < window:
                break
        strength = strength or {}
        celebrities = sorted((a for a, c in celeb_counts.items() if c is not None and a not in blocked
                              and a not in muted), key=lambda a: (-strength.get(a, 0.0), -celeb_counts[a], a))
        celebrities = celebrities[:max_celebrity_pulls]
        pulled: set[int] = set()
        if celebrities:
            pipe = self.client.pipeline(transaction=False)
            for a in celebrities:
                pipe.zrevrangebyscore(keys.user_posts(a), until, "-inf", start=0, num=posts_per_celebrity,
                                      withscores=True)
            pulled = self._merge_pulled(kept, pipe.execute(), limit)
        kept.sort(key=lambda e: (-e.created_ts, -e.post_id))
        kept = kept[:limit]
        if cleanup and stale:
            try:
                self.client.zrem(key, *stale)
            except redis.RedisError:
                pass  # the next read removes them
        shown = {e.post_id for e in kept}
        return HomeTimelineRead(kept, frozenset(pulled & shown), celebrities, stale, hidden)

    @staticmethod
    def _merge_pulled(kept: list[TimelineEntry], lists: list[list[tuple[bytes, float]]], limit: int) -> set[int]:
        """Append to ``kept`` the pulled entries that can still be among the newest ``limit``; returns
        their post ids. ``lists`` are the celebrities' posts, each newest first: a lazy k-way merge
        stops at the first entry older than the ``limit``-th one already certain, so 50 celebrities x
        20 posts decode about ``limit`` entries, not 1,000 (most of the read's CPU was decoding)."""
        have = {e.post_id for e in kept}
        pushed = sorted((e.created_ts for e in kept), reverse=True)
        floor = pushed[limit - 1] if len(pushed) >= limit else -float("inf")
        pulled: set[int] = set()
        newer = 0  # pulled entries appended, all at or after the current merge position
        for member, score in heapq.merge(*lists, key=lambda ms: -ms[1]):
            # everything from here on is at most this old: the newest ``limit`` are settled
            if score < floor or newer >= limit and score < last:
                break
            post, author = keys.decode_timeline_entry(member)
            if post not in have:  # an author who crossed the threshold: pushed and pulled
                have.add(post)
                pulled.add(post)
                kept.append(TimelineEntry(post, author, float(score)))
                newer += 1
                last = score
        return pulled

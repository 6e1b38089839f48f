"""Redis key names of the candidate index and of the mixer's own records (prefix ``hm:``).

The layout is documented in ``pipelines/candidate_index.py`` (which writes the index); this module
is the one place that spells the names, so the writer and the readers cannot disagree.
Feast's online-store keys never start with ``hm:`` (they start with a little-endian key count).
"""

from __future__ import annotations

PREFIX = "hm:"

POST_META = "hm:post_meta"             # hash post_id -> "author_id|created_ts|tag,tag"
INDEX_META = "hm:index_meta"           # hash: as_of, built_at, counts
SERVED_IMPRESSIONS = "hm:served_impressions"  # stream written by the mixer


def author_posts(author_id: int) -> str:
    """zset post_id -> created time (epoch s)."""
    return f"hm:author_posts:{author_id}"


def popular(window: str) -> str:
    """zset post_id -> weighted engagements in the trailing window ("24h" or "7d")."""
    return f"hm:popular:{window}"


def tag_posts(tag: int) -> str:
    """zset post_id -> weighted engagements in the trailing 7 days (0 if none)."""
    return f"hm:tag_posts:{tag}"


def follows(user_id: int) -> str:
    """set of author_ids the user followed."""
    return f"hm:follows:{user_id}"


def engaged_authors(user_id: int) -> str:
    """zset author_id -> summed RealGraph-style engagement weight."""
    return f"hm:engaged_authors:{user_id}"


def tag_interest(user_id: int) -> str:
    """zset tag -> summed engagement weight of the user's engaged posts carrying the tag."""
    return f"hm:tag_interest:{user_id}"


def hated_authors(user_id: int) -> str:
    """set of author_ids whose posts the user marked with hate."""
    return f"hm:hated_authors:{user_id}"


def blocked_authors(user_id: int) -> str:
    """set of author_ids the user blocked (written by the stream processor)."""
    return f"hm:blocked_authors:{user_id}"


def muted_authors(user_id: int) -> str:
    """set of author_ids the user muted (written by the stream processor)."""
    return f"hm:muted_authors:{user_id}"


def seen_posts(user_id: int) -> str:
    """zset post_id -> last impression time (epoch s) in the log."""
    return f"hm:seen:{user_id}"


def served_posts(user_id: int) -> str:
    """zset post_id -> wall-clock time (epoch s) the mixer served it (written by the mixer, TTL)."""
    return f"hm:served:{user_id}"


# Patterns of every key the index builder owns (a rebuild deletes them first). Served records and
# the impression stream belong to the mixer and survive a rebuild.
INDEX_KEY_PATTERNS: tuple[str, ...] = (
    "hm:author_posts:*", "hm:popular:*", "hm:tag_posts:*", "hm:follows:*", "hm:engaged_authors:*",
    "hm:tag_interest:*", "hm:hated_authors:*", "hm:seen:*",
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

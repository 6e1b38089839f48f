"""The objects a home-timeline request passes between components: Query and Candidate.

``Query`` is the request plus what query hydrators add (user context, experiment arm); it is
immutable: each hydrator returns a copy (``dataclasses.replace``). ``Candidate`` is one post
moving through the pipeline; sources create it, later stages fill their own fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, NamedTuple

import numpy as np

from core.schema import HOME_SURFACE

if TYPE_CHECKING:  # annotation only (mixer.selectors imports this module)
    from mixer.selectors.page_cursor import PageCursor


class EngagedAction(NamedTuple):
    """One entry of the user action sequence (x-algorithm's user action sequence).

    Attributes:
        post_id: the engaged post (int64 id).
        author_id: its author.
        action: one of ``pipelines.sequences.ACTION_STRENGTH``.
        ts: engagement time, epoch seconds UTC.
    """

    post_id: int
    author_id: int
    action: str
    ts: float


@dataclass(frozen=True)
class Query:
    """One home-timeline request.

    Attributes:
        user_id: the viewer (int64 id).
        page_size: posts to return (1..page.max_size).
        now_s: request time in epoch seconds UTC (the configured clock: wall time or a fixed instant).
        request_id: unique id of this request (hex), logged with every served impression.
        excluded_posts: post ids served on earlier pages of this timeline (from the cursor).
        page_index: 0 for the first page, n for the page after n cursors.
        cursor: the cursor this request continues (None for the first page); ``excluded_posts``
            and ``page_index`` are derived from it, the page selector extends it.
        surface: the product surface the timeline is for (KuaiRand ``tab`` id, int >= 0; default
            ``core.schema.HOME_SURFACE``): request context, as the product / client context on
            Twitter's home-mixer query; the feature hydrators turn it into the ``req_surface_*``
            request features.
        arm: experiment arm name (set by ExperimentArmQueryHydrator).
        source_limits: candidate source name -> the arm's own ``max_candidates`` for it
            (``mixer.candidate_sources.base.source_limit``; set by ExperimentArmQueryHydrator).
        disabled_sources: candidate sources the arm switches off (set by ExperimentArmQueryHydrator).
        follows: author ids the user followed.
        engaged_authors: author id -> engagement weight (RealGraph-style), strongest first.
        tag_interests: tag -> weight, strongest first.
        hated_authors: author ids whose posts the user marked with hate.
        blocked_authors, muted_authors: author ids the user blocked / muted (stream processor).
        seen_posts: post ids with an impression in the log before the index cutoff.
        served_posts: post ids the mixer served within the served TTL.
        action_sequence: the user's last engaged posts, newest first (``EngagedAction``; set by
            ``UserActionSequenceQueryHydrator``; empty for a user without history; None when it
            could not be read: the history features are then missing, not "no history").
        user_embedding: the two-tower user vector of ``action_sequence`` (float32 ``[D]``; set by
            ``UserEmbeddingQueryHydrator``; None without a served two-tower or a known sequence).
        quality_factor: share of the full work this request gets, in (0, 1]
            (``mixer.quality_factor``): candidate source limits and heavy_ranker_top_k are scaled by it.
    """

    user_id: int
    page_size: int
    now_s: float
    request_id: str
    excluded_posts: frozenset[int] = frozenset()
    page_index: int = 0
    cursor: PageCursor | None = None
    surface: int = HOME_SURFACE
    arm: str | None = None
    source_limits: Mapping[str, int] = field(default_factory=dict)
    disabled_sources: frozenset[str] = frozenset()
    follows: frozenset[int] = frozenset()
    engaged_authors: dict[int, float] = field(default_factory=dict)
    tag_interests: dict[int, float] = field(default_factory=dict)
    hated_authors: frozenset[int] = frozenset()
    blocked_authors: frozenset[int] = frozenset()
    muted_authors: frozenset[int] = frozenset()
    seen_posts: frozenset[int] = frozenset()
    served_posts: frozenset[int] = frozenset()
    action_sequence: tuple[EngagedAction, ...] | None = ()
    user_embedding: np.ndarray | None = field(default=None, compare=False)  # arrays do not compare as bools
    quality_factor: float = 1.0

    @property
    def in_network_authors(self) -> frozenset[int]:
        """Authors whose posts count as in-network: followed or engaged with (RealGraph edges)."""
        return self.follows | frozenset(self.engaged_authors)

    @property
    def is_cold_start(self) -> bool:
        """True when the index knows nothing about the user (no follows, engagement or history)."""
        return not (self.follows or self.engaged_authors or self.tag_interests or self.seen_posts)


@dataclass(slots=True)
class Candidate:
    """One post in the pipeline.

    Attributes:
        post_id: int64 id.
        source: name of the candidate source that produced it (first source wins on duplicates).
        author_id: int64 id (-1 until the candidate hydrator fills it).
        created_ts: creation time, epoch seconds (NaN until hydrated).
        tag_id: the post's primary tag (the first id of its tag list, the canonical posts table's
            ``primary_tag``): the ``tag_id`` join key of the user x tag feature view; -1 until the
            candidate hydrator fills it and for posts without tags (no user x tag features).
        in_network: the author is in the user's follow/engagement graph.
        source_score: the source's own ordering score (engagement weight, recency...).
        source_detail: how the source found it, when it has several ways (in_network's timeline
            read: ``pushed`` = fanned out into the home timeline, ``pulled`` = a followed
            celebrity's post merged at read); empty otherwise.
        light_score: light ranker output (NaN until scored).
        heads: head name -> heavy ranker probability (empty until scored).
        score: blended score used for ranking (NaN until blended).
        propensity: the probability the serving policy had of putting this post in its slot,
            given the slots above it (1 for a deterministic page; ``ExplorationSelector`` sets
            it when the arm explores).
        pool_index: the post's place in the exploration pool (0 = best ranked), -1 when it was
            not in one.
        team_scores: interleaving arms only: team arm -> the post's blended score under that
            arm's weights (empty otherwise).
        team: interleaving arms only: the team arm whose ranking placed the post on the page.
    """

    post_id: int
    source: str
    author_id: int = -1
    created_ts: float = math.nan
    tag_id: int = -1
    in_network: bool = False
    source_score: float = 0.0
    source_detail: str = ""
    light_score: float = math.nan
    heads: dict[str, float] = field(default_factory=dict)
    score: float = math.nan
    propensity: float = 1.0
    pool_index: int = -1
    team_scores: dict[str, float] = field(default_factory=dict)
    team: str = ""

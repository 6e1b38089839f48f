"""The contract every part of home-mixer shares: labels (heads), canonical tables, feature views.

One place names every column, so the Spark jobs that write features, the Feast definitions that
register them, the trainers that read training sets and the mixer that hydrates candidates cannot
drift apart (training/serving skew starts with two spellings of one feature).

Conventions
- Ids are int64. Timestamps in tables are ``timestamp[us, tz=UTC]`` (Spark rejects nanoseconds).
- Feature rows carry ``event_timestamp``: the first instant at which the row's values are known.
  A value at time t only aggregates events strictly before t (rows are stamped 1 ms after the
  last event they include, or at the end of the hour bucket they summarise).
- Feature names are unique across views (prefixes ``user_``, ``user_lt_``, ``post_``, ``author_``,
  ``ua_``, ``ut_``, ``tmp_``, ``req_``, ``id_``) so a training set can use ``full_feature_names=False``.

Freshness contract (what serving has, so what training sets join: ``pipelines.training_set``):
- batch views are materialised hourly: a request at t sees rows stamped at or before the last
  hour boundary <= t (``core.requests.served_feature_ts``);
- long-window user propensities (``user_longterm_features``) change once a day: a row per user per
  local day, stamped at local midnight, over everything before it, plus the pre-log history;
- request features (``REQUEST_FEATURES``) and id buckets (``ID_FEATURES``) are computed at the
  request's start from the request and the hydrated values, by the same code offline and online;
- the stream processor's real-time windows (``core.realtime``) replace some post counts online
  only when a processor is live; training sets hold the batch values (the batch-only mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.history_features import HISTORY_FEATURES as _HISTORY_FEATURES
from core.history_features import SEQUENCE_ID_FEATURES as _SEQUENCE_ID_FEATURES

# Engagement heads, in the order of the heavy ranker's output columns. Twitter's heavy ranker
# (the-algorithm, `home-mixer/.../HomeFeatures` + `ScoredTweetsParam`) predicts one probability per
# engagement; KuaiRand labels map one to one.
HEADS: tuple[str, ...] = ("click", "long_view", "like", "follow", "comment", "forward", "hate")

# Raw KuaiRand log column -> canonical label column.
RAW_LABEL_COLUMNS: dict[str, str] = {
    "is_click": "click",
    "long_view": "long_view",
    "is_like": "like",
    "is_follow": "follow",
    "is_comment": "comment",
    "is_forward": "forward",
    "is_hate": "hate",
}

# Positive engagements (hate is negative feedback) used for engagement counts and affinity.
POSITIVE_HEADS: tuple[str, ...] = ("click", "long_view", "like", "follow", "comment", "forward")

# ---- canonical tables (parquet, written by pipelines/canonical.py) ----
# impressions.date is the log's local calendar day (yyyymmdd, China time) used for day splits.
IMPRESSIONS_COLUMNS: tuple[str, ...] = (
    "user_id", "post_id", "author_id", "event_ts", "date", *HEADS, "play_time_ms", "duration_ms", "tab",
)
POSTS_COLUMNS: tuple[str, ...] = (
    "post_id", "author_id", "created_ts", "duration_ms", "video_type", "tags", "primary_tag",
)
USERS_COLUMNS: tuple[str, ...] = (
    "user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num", "fans_user_num", "friend_user_num", "register_days",
    *(f"onehot_feat{i}" for i in range(18)),
)
# The user's history before the log (KuaiRand ``user_sequences_upto_20220424.parquet``): one row per
# video id of each sequence; kind "watch" (watch_seq), "long_view" (long_watch_seq) or "like"
# (like_seq). event_ts is when the history is known: the user's last_time_ms + 1 ms.
# tag_id = the post's primary tag (-1 none); position = index in its sequence (0 = oldest).
PRELOG_EVENTS_COLUMNS: tuple[str, ...] = ("user_id", "post_id", "author_id", "tag_id", "event_ts", "kind",
                                          "position")
PRELOG_KINDS: tuple[str, ...] = ("watch", "long_view", "like")

# edge_type: "follow" (explicit is_follow event, weight 1) or "engagement" (one per impression with
# any positive engagement, weight = RealGraph-style sum of per-head weights below).
SOCIAL_EDGES_COLUMNS: tuple[str, ...] = ("user_id", "author_id", "event_ts", "edge_type", "weight")
# Per-head weights of an engagement edge (RealGraph idea, Kamath et al. 2014: heavier interactions
# count more); values chosen by rank of effort, not fitted.
ENGAGEMENT_EDGE_WEIGHTS: dict[str, float] = {
    "click": 1.0, "long_view": 1.0, "like": 3.0, "comment": 4.0, "forward": 4.0, "follow": 5.0,
}

# user_active_degree categories, encoded as their index (unknown -> -1).
ACTIVE_DEGREES: tuple[str, ...] = (
    "full_active", "high_active", "middle_active", "low_active", "single_low_active",
    "2_14_day_new", "30day_retention", "day_new", "UNKNOWN",
)


@dataclass(frozen=True)
class FeatureViewSpec:
    """One Feast feature view: its name, entity join keys, source table and features.

    ``features`` maps feature name -> dtype, one of ``"int64"`` or ``"float64"`` (Feast Int64 /
    Float64). ``ttl_days`` bounds how old a row may be for the point-in-time join.
    """

    name: str
    join_keys: tuple[str, ...]
    table: str
    features: dict[str, str]
    ttl_days: int


WINDOWS_HOURS: dict[str, int] = {"1h": 1, "24h": 24, "7d": 168}

# Pseudo-impressions of the Bayesian-smoothed rates: rate = (k + prior * m) / (n + m), the
# posterior mean of a rate under a Beta(prior * m, (1 - prior) * m) prior (pipelines/features/common.py).
SMOOTHING_M = 10.0


def post_prior_rate(head: str) -> str:
    """Name of the post's smoothed prior rate of ``head`` over all its earlier impressions: the
    popularity lookup of evaluation and the logit offset of the heavy ranker's head."""
    return f"post_{head}_rate_total"

USER_VIEW = FeatureViewSpec(
    name="user_features",
    join_keys=("user_id",),
    table="user_features",
    features={
        "user_active_degree_code": "int64",
        "user_is_video_author": "int64",
        "user_follow_num": "float64",
        "user_fans_num": "float64",
        "user_friend_num": "float64",
        "user_register_days": "float64",
        # rolling over all of the user's impressions strictly before the row time
        "user_impressions": "float64",
        # rates are Bayesian-smoothed: (k + prior_rate * m) / (n + m), m = 10 (see pipelines)
        "user_click_rate": "float64",
        "user_long_view_rate": "float64",
        "user_like_rate": "float64",
        "user_follow_rate": "float64",
        "user_hate_rate": "float64",
    },
    ttl_days=365,
)

CONTENT_VIEW = FeatureViewSpec(
    name="content_features",
    join_keys=("post_id",),
    table="content_features",
    features={
        "post_duration_ms": "float64",
        "post_created_ts": "int64",  # epoch seconds; age is computed at request time
        "post_is_ad": "int64",
        **{f"post_{kind}_{w}": "float64"
           for w in WINDOWS_HOURS for kind in ("impressions", "clicks", "long_views", "likes")},
        "post_click_rate_24h": "float64",
        "post_long_view_rate_24h": "float64",
        "post_like_rate_7d": "float64",
        "post_impressions_total": "float64",
        "post_engagement_rate_total": "float64",
        # the post's smoothed prior rate of every head over all its impressions so far (the
        # popularity lookup of offline evaluation)
        **{post_prior_rate(h): "float64" for h in HEADS},
        # the same over all impressions of all the post's author's posts so far (joined onto the
        # post's hourly row: no author entity needed at hydration)
        "author_impressions_total": "float64",
        **{f"author_{h}_rate_total": "float64" for h in HEADS},
    },
    ttl_days=30,
)

SOCIAL_VIEW = FeatureViewSpec(
    name="social_features",
    join_keys=("user_id", "author_id"),
    table="social_features",
    features={
        "ua_impressions": "float64",       # user's past impressions of this author's posts
        "ua_engagements": "float64",       # weighted engagement sum (ENGAGEMENT_EDGE_WEIGHTS)
        "ua_clicks": "float64",
        "ua_follows": "int64",             # 1 if the user followed the author before
        "ua_engagement_rate": "float64",   # smoothed share of impressions with any positive engagement
        "ua_long_views": "float64",
        # the pair in the user's pre-log history (watches / long views of the author's posts)
        "ua_prelog_watches": "float64",
        "ua_prelog_long_views": "float64",
    },
    ttl_days=365,
)

TEMPORAL_VIEW = FeatureViewSpec(
    name="temporal_features",
    join_keys=("user_id",),
    table="temporal_features",
    features={
        "tmp_last_impression_ts": "int64",  # epoch seconds of the user's previous impression
        "tmp_impressions_1h": "float64",    # user's impressions in the hour before (session depth)
        "tmp_impressions_24h": "float64",
    },
    ttl_days=365,
)

# Long-window propensities per head: what a user does over weeks, not after the last impression.
# Daily snapshots (rows at local midnight over all earlier days of the log) plus the pre-log
# history; a per-impression rate, by contrast, moves after every label (see core.requests).
USER_LONGTERM_VIEW = FeatureViewSpec(
    name="user_longterm_features",
    join_keys=("user_id",),
    table="user_longterm_features",
    features={
        "user_lt_prelog_watches": "float64",        # videos in the pre-log watch sequence (<= 50)
        "user_lt_prelog_long_view_rate": "float64",  # smoothed long views / watches of the pre-log sequences
        "user_lt_prelog_like_rate": "float64",
        "user_lt_impressions": "float64",           # log impressions on earlier days
        "user_lt_active_days": "float64",           # earlier days with impressions
        **{f"user_lt_{h}_rate": "float64" for h in HEADS},
    },
    ttl_days=365,
)

# User x tag affinity (the post's primary tag), event-stamped like the social view, plus the
# pre-log history. tag_id is the join key (Feast entity "tag").
USER_TAG_VIEW = FeatureViewSpec(
    name="user_tag_features",
    join_keys=("user_id", "tag_id"),
    table="user_tag_features",
    features={
        "ut_impressions": "float64",
        "ut_click_rate": "float64",
        "ut_long_view_rate": "float64",
        "ut_like_rate": "float64",
        "ut_prelog_watches": "float64",
        "ut_prelog_long_views": "float64",
    },
    ttl_days=365,
)

FEATURE_VIEWS: tuple[FeatureViewSpec, ...] = (
    USER_VIEW, CONTENT_VIEW, SOCIAL_VIEW, TEMPORAL_VIEW, USER_LONGTERM_VIEW, USER_TAG_VIEW,
)

# Hashed id buckets (core.id_features): the heavy ranker embeds them; bucket 0 is "no id".
ID_FEATURES: tuple[str, ...] = ("id_user_bucket", "id_post_bucket", "id_author_bucket")

# ---- request context: the surface (product tab) a request is for ----
# Twitter's home-mixer carries the request's product surface and client context on its query
# (product-mixer's ``Product`` / ``ClientContext``: which timeline/tab, which client asked), and its
# rankers see it as request context. KuaiRand logs it as ``tab`` (the log's surface id); the mixer API
# calls it ``surface``. Click rates differ ~5x between surfaces, so the surface is a feature.
# Surface of a request that names none: tab 1, the log's main feed (~76 % of impressions).
HOME_SURFACE = 1
# Surfaces with >= 1 % of the impressions of KuaiRand-Pure's log (log_standard_20220425_20220504,
# 171,671 rows: tab 1 75.6 %, 0 8.9 %, 4 5.9 %, 6 5.3 %, 2 2.8 %; tabs 3, 5, 7..14 together 1.5 %).
# Each gets a one-hot request feature; every other surface id maps to ``req_surface_other``.
KNOWN_SURFACES: tuple[int, ...] = (0, 1, 2, 4, 6)
SURFACE_FEATURES: tuple[str, ...] = tuple(f"req_surface_{s}" for s in KNOWN_SURFACES) + ("req_surface_other",)

# Computed at request time from the request timestamp, the request's surface and hydrated values
# (same code offline and online: core/request_features.py).
REQUEST_FEATURES: tuple[str, ...] = (
    "req_hour_of_day", "req_day_of_week", "req_secs_since_last_impression", "req_post_age_hours",
) + SURFACE_FEATURES

# Raw timestamps are inputs to request features, not model inputs.
_NOT_MODEL_INPUTS = {"post_created_ts", "tmp_last_impression_ts"}

# How each candidate relates to the user action sequence (co-engagement with the latest engaged
# posts, same author / tag counts, history depth): core/history_features.py, the same code offline
# (pipelines/history_features.py) and online (mixer/feature_hydrators/history.py).
HISTORY_FEATURES: tuple[str, ...] = _HISTORY_FEATURES

# The sequence itself, for the heavy ranker's target attention (DIN): hashed post and author buckets
# of the newest sequence posts, the same in every row of a request, 0 = padding
# (core/history_features.py; set by the same offline and online code as HISTORY_FEATURES).
SEQUENCE_ID_FEATURES: tuple[str, ...] = _SEQUENCE_ID_FEATURES

# Retrieval model scores of each candidate at request time (mixer/feature_hydrators/retrieval.py):
# the two-tower's user-vector x post-vector cosine. Only served pipelines compute them, so only the
# rows built from the mixer's own candidate sets (home_mixer/candidate_training.py) carry them;
# impression training sets hold NaN.
RETRIEVAL_FEATURES: tuple[str, ...] = ("retrieval_two_tower_score",)

ALL_FEATURES: tuple[str, ...] = tuple(
    f for v in FEATURE_VIEWS for f in v.features
) + REQUEST_FEATURES + ID_FEATURES + HISTORY_FEATURES + SEQUENCE_ID_FEATURES + RETRIEVAL_FEATURES

# Not the retrieval scores: impression training rows cannot carry them (no retrieval model as of
# each logged request), so the heavy ranker would learn nothing for an input serving then fills.
HEAVY_RANKER_FEATURES: tuple[str, ...] = tuple(
    f for f in ALL_FEATURES if f not in _NOT_MODEL_INPUTS and f not in RETRIEVAL_FEATURES)

# Light ranker: a small, cheap set (Twitter's light ranker used a few dozen static/real-time
# features; here the strongest per group).
LIGHT_RANKER_FEATURES: tuple[str, ...] = (
    "user_click_rate", "user_long_view_rate", "user_impressions",
    "post_impressions_24h", "post_click_rate_24h", "post_long_view_rate_24h", "post_like_rate_7d",
    "post_duration_ms", "post_engagement_rate_total",
    "ua_engagements", "ua_follows", "ua_engagement_rate",
    "req_hour_of_day", "req_post_age_hours",
    # the three biggest surfaces (tab 1, 0, 4: 90 % of impressions, click rates 50 %, 8 %, 60 %)
    "req_surface_1", "req_surface_0", "req_surface_4",
    # the user's history: the light ranker's cut decides which history-matched candidates the heavy
    # ranker ever sees
    "hist_coeng_sum", "hist_coeng_max", "hist_author_engagements", "hist_tag_engagements", "hist_len",
)

# The light ranker trained on the mixer's candidate sets (``home_mixer.candidate_training``): over a
# whole candidate set the volume of recent engagement (what the logging policy kept showing) and the
# match with the user's history separate what users go on to engage with; rates alone do not.
CANDIDATE_LIGHT_RANKER_FEATURES: tuple[str, ...] = LIGHT_RANKER_FEATURES + (
    "post_impressions_1h", "post_impressions_7d", "post_long_views_7d", "post_likes_7d", "post_clicks_24h",
    "post_long_views_24h", "post_impressions_total", "author_impressions_total", "hist_coeng_seeds",
    "ut_impressions", "ut_long_view_rate", "ut_prelog_watches", "ua_prelog_watches",
) + RETRIEVAL_FEATURES

# Feature groups of the ablation study (``home-mixer train --ablation``): each is removed in turn.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "user": tuple(USER_VIEW.features),
    "user_longterm": tuple(USER_LONGTERM_VIEW.features),
    "post": tuple(f for f in CONTENT_VIEW.features if f.startswith("post_")),
    "author": tuple(f for f in CONTENT_VIEW.features if f.startswith("author_")),
    "user_author": tuple(SOCIAL_VIEW.features),
    "user_tag": tuple(USER_TAG_VIEW.features),
    "temporal": tuple(TEMPORAL_VIEW.features) + ("req_secs_since_last_impression",),
    "request_context": ("req_hour_of_day", "req_day_of_week", "req_post_age_hours") + SURFACE_FEATURES,
    "ids": ID_FEATURES,
    "history": HISTORY_FEATURES,
    "sequence_attention": SEQUENCE_ID_FEATURES,
}

ENTITY_COLUMNS: tuple[str, ...] = ("user_id", "post_id", "author_id", "tag_id", "event_timestamp")

# The last days of a log are the validation days (time split); smoothing priors never see them.
VALIDATION_DAYS = 2

# Registered model names in MLflow and the alias the mixer serves.
LIGHT_RANKER_NAME = "light_ranker"
HEAVY_RANKER_NAME = "heavy_ranker"
# The learned-retrieval model (models.two_tower): towers, candidate embeddings and FAISS index in one version.
TWO_TOWER_NAME = "two_tower"
CHAMPION_ALIAS = "champion"

"""Development training frames computed straight from the raw KuaiRand log (pandas, in memory).

Production training sets come from the Spark feature pipelines + Feast's point-in-time join. The
model code only needs a frame with the same *contract* (columns of ``core.schema``), so this
module builds one directly from the log for unit/integration tests and quick experiments:
every feature of ``schema.ALL_FEATURES`` is computed point-in-time (from impressions strictly
before each row) with vectorised cumulative sums. It approximates, and does not replace, the
pipeline's definitions (e.g. rate priors here are the whole log's mean rates, a dev shortcut).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.requests import assign_requests
from core.schema import (
    ACTIVE_DEGREES, ENGAGEMENT_EDGE_WEIGHTS, HEADS, HISTORY_FEATURES, POSITIVE_HEADS, RETRIEVAL_FEATURES, RAW_LABEL_COLUMNS, SEQUENCE_ID_FEATURES, SMOOTHING_M, WINDOWS_HOURS,
)
from core.id_features import id_bucket_columns
from core.request_features import LOCAL_UTC_OFFSET_HOURS, add_request_features

from pipelines.canonical import primary_tag
from pipelines.raw import LOG_FILE, SEQUENCES_FILE
_HOUR_MS = 3_600_000


class PriorWindowSums:
    """Sums of per-row values over earlier rows of the same key, optionally within a time window.

    For row i with key k and time t, ``sums(v, w)[i] = sum of v[j]`` over rows j with key k and
    ``t - w <= t_j < t`` (strictly before t: rows at the same instant are not included).
    Sort once, then each sum is two ``searchsorted`` lookups on a cumulative sum: O(N log N).
    """

    def __init__(self, keys: np.ndarray, t_ms: np.ndarray, max_window_ms: int):
        self.n = len(keys)
        self.order = np.lexsort((t_ms, keys))
        k = keys[self.order].astype(np.int64)
        t = t_ms[self.order].astype(np.int64) - int(t_ms.min()) + max_window_ms
        span = int(t.max()) + 1
        if k.max(initial=0) * span > 2**62:
            raise OverflowError("too many keys x time span for int64 composite keys")
        self.k, self.t, self.span = k, t, span
        self.combined = k * span + t
        self.end = np.searchsorted(self.combined, self.combined, side="left")
        self.group_start = np.searchsorted(self.combined, k * span, side="left")

    def sums(self, values: np.ndarray, window_ms: int | None = None) -> np.ndarray:
        """``float64 [N]`` prior sums of ``values`` (aligned with the input rows)."""
        cs = np.r_[0.0, np.cumsum(np.asarray(values, dtype=np.float64)[self.order])]
        if window_ms is None:
            start = self.group_start
        else:
            start = np.searchsorted(self.combined, self.k * self.span + self.t - window_ms, side="left")
        out = np.empty(self.n)
        out[self.order] = cs[self.end] - cs[start]
        return out

    def previous_time(self, t_ms: np.ndarray) -> np.ndarray:
        """Time (ms) of the latest earlier row of the same key, NaN if none: ``float64 [N]``."""
        has_prev = self.end > self.group_start
        sorted_t = t_ms[self.order].astype(np.float64)
        prev = np.where(has_prev, sorted_t[np.maximum(self.end - 1, 0)], np.nan)
        out = np.empty(self.n)
        out[self.order] = prev
        return out


def _smoothed(k: np.ndarray, n: np.ndarray, prior: float) -> np.ndarray:
    return (k + prior * SMOOTHING_M) / (n + SMOOTHING_M)


def load_impressions(data_dir: Path) -> pd.DataFrame:
    """The log as canonical impressions: deduplicated, label columns renamed, ``post_id``/``author_id``.

    Returns columns user_id, post_id, author_id (int64), time_ms (int64), event_timestamp (UTC),
    date (int yyyymmdd), the ``schema.HEADS`` labels (int64 0/1), sorted by time.

    Raises:
        FileNotFoundError: the log or the video features file is missing from ``data_dir``.
    """
    data_dir = Path(data_dir)
    log = pd.read_csv(data_dir / LOG_FILE)
    # ~2.5% of rows repeat (user, video, time): one impression each
    log = log.drop_duplicates(["user_id", "video_id", "time_ms"]).rename(
        columns={**RAW_LABEL_COLUMNS, "video_id": "post_id"}
    )
    videos = pd.read_csv(data_dir / "video_features_basic_pure.csv",
                         usecols=["video_id", "author_id", "video_type", "upload_dt", "video_duration", "tag"])
    videos = videos.rename(columns={"video_id": "post_id"})
    videos["tag_id"] = primary_tag(videos.pop("tag").astype("string"))
    df = log.merge(videos, on="post_id", how="left", validate="many_to_one")
    df["author_id"] = df["author_id"].fillna(-1).astype("int64")
    df["event_timestamp"] = pd.to_datetime(df["time_ms"], unit="ms", utc=True)
    for h in HEADS:
        df[h] = (df[h] > 0).astype("int64")
    return df.sort_values("time_ms", kind="stable").reset_index(drop=True)


def _prelog_features(data_dir: Path, df: pd.DataFrame, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``user_lt_prelog_*``, ``ua_prelog_*`` and ``ut_prelog_*`` from the sequences file (NaN without it)."""
    names = ("user_lt_prelog_watches", "user_lt_prelog_long_view_rate", "user_lt_prelog_like_rate",
             "ua_prelog_watches", "ua_prelog_long_views", "ut_prelog_watches", "ut_prelog_long_views")
    path = data_dir / SEQUENCES_FILE
    if not path.exists():
        return {n: np.full(len(df), np.nan) for n in names}
    seq = pd.read_parquet(path)
    meta = df.drop_duplicates("post_id").set_index("post_id")[["author_id", "tag_id"]]
    events = []
    for kind, col in (("watch", "watch_seq"), ("long_view", "long_watch_seq"), ("like", "like_seq")):
        e = seq[["user_id", col]].explode(col).dropna().rename(columns={col: "post_id"})
        events.append(e.assign(kind=kind, post_id=e["post_id"].astype("int64")))
    ev = pd.concat(events).join(meta, on="post_id", how="inner")
    per_user = ev.groupby(["user_id", "kind"]).size().unstack(fill_value=0)
    u = per_user.reindex(df["user_id"])
    watches = u.get("watch", pd.Series(0, index=u.index)).to_numpy(float)
    out = {"user_lt_prelog_watches": watches}
    for kind, head in (("long_view", "long_view"), ("like", "like")):
        k = u.get(kind, pd.Series(0, index=u.index)).to_numpy(float)
        out[f"user_lt_prelog_{head}_rate"] = np.minimum(1.0, _smoothed(k, watches, labels[head].mean()))
    for key, prefix in (("author_id", "ua"), ("tag_id", "ut")):
        pair = ev.groupby(["user_id", key, "kind"]).size().unstack(fill_value=0)
        p = pair.reindex(pd.MultiIndex.from_arrays([df["user_id"], df[key]]))
        out[f"{prefix}_prelog_watches"] = p.get("watch", pd.Series(np.nan, index=p.index)).to_numpy(float)
        out[f"{prefix}_prelog_long_views"] = p.get("long_view", pd.Series(np.nan, index=p.index)).to_numpy(float)
    return out


def build_dev_frame(data_dir: Path, user_sample_mod: int = 1) -> pd.DataFrame:
    """A training frame with the training-set contract, from the raw log in ``data_dir``.

    Args:
        data_dir: the KuaiRand-Pure folder (``core.state.DEFAULT_DATA_DIR``).
        user_sample_mod: keep users with ``user_id % user_sample_mod == 0`` (features are still
            computed over every user, as the real pipeline would); 1 keeps all (~167k rows).

    Returns:
        DataFrame with user_id, post_id, author_id, tag_id (the post's primary tag, -1 none; int64),
        event_timestamp (UTC), date (int),
        tab, request_id and request_ts (``core.requests``), the ``schema.HEADS`` labels (int64 0/1) and every feature of ``schema.ALL_FEATURES``
        (float64, NaN where the feature view would have no row: cold user/post/pair), sorted by
        time.
    """
    df = load_impressions(data_dir)
    t = df["time_ms"].to_numpy()
    labels = {h: df[h].to_numpy(dtype=np.float64) for h in HEADS}
    ones = np.ones(len(df))
    engaged = np.zeros(len(df))
    for h in POSITIVE_HEADS:
        engaged = np.maximum(engaged, labels[h])
    weighted = sum(ENGAGEMENT_EDGE_WEIGHTS[h] * labels[h] for h in ENGAGEMENT_EDGE_WEIGHTS)
    max_w = max(WINDOWS_HOURS.values()) * _HOUR_MS
    feats: dict[str, np.ndarray] = {}
    nan = np.nan

    # user view: static attributes + rolling rates over all earlier impressions
    users = pd.read_csv(Path(data_dir) / "user_features_pure.csv").set_index("user_id")
    u = users.reindex(df["user_id"])
    degree_code = {d: i for i, d in enumerate(ACTIVE_DEGREES)}
    feats["user_active_degree_code"] = u["user_active_degree"].map(degree_code).fillna(-1).to_numpy(float)
    feats["user_is_video_author"] = u["is_video_author"].to_numpy(float)
    for src, dst in (("follow_user_num", "user_follow_num"), ("fans_user_num", "user_fans_num"),
                     ("friend_user_num", "user_friend_num"), ("register_days", "user_register_days")):
        feats[dst] = u[src].to_numpy(float)
    by_user = PriorWindowSums(df["user_id"].to_numpy(), t, max_w)
    n_user = by_user.sums(ones)
    cold_user = n_user == 0
    feats["user_impressions"] = np.where(cold_user, nan, n_user)
    for h in ("click", "long_view", "like", "follow", "hate"):
        rate = _smoothed(by_user.sums(labels[h]), n_user, labels[h].mean())
        feats[f"user_{h}_rate"] = np.where(cold_user, nan, rate)

    # content view: windowed counts and rates over the post's earlier impressions
    feats["post_duration_ms"] = df["video_duration"].to_numpy(float)
    created = pd.to_datetime(df["upload_dt"]) - pd.Timedelta(hours=LOCAL_UTC_OFFSET_HOURS)  # local midnight
    feats["post_created_ts"] = (created.astype("int64") // 10**9).to_numpy(float)
    feats["post_is_ad"] = (df["video_type"] == "AD").to_numpy(float)
    by_post = PriorWindowSums(df["post_id"].to_numpy(), t, max_w)
    n_post = by_post.sums(ones)
    cold_post = n_post == 0
    kinds = {"impressions": ones, "clicks": labels["click"], "long_views": labels["long_view"],
             "likes": labels["like"]}
    for w, hours in WINDOWS_HOURS.items():
        for kind, v in kinds.items():
            feats[f"post_{kind}_{w}"] = np.where(cold_post, nan, by_post.sums(v, hours * _HOUR_MS))
    feats["post_click_rate_24h"] = _smoothed(feats["post_clicks_24h"], feats["post_impressions_24h"], labels["click"].mean())
    feats["post_long_view_rate_24h"] = _smoothed(feats["post_long_views_24h"], feats["post_impressions_24h"],
                                                 labels["long_view"].mean())
    feats["post_like_rate_7d"] = _smoothed(feats["post_likes_7d"], feats["post_impressions_7d"], labels["like"].mean())
    feats["post_impressions_total"] = np.where(cold_post, nan, n_post)
    feats["post_engagement_rate_total"] = np.where(
        cold_post, nan, _smoothed(by_post.sums(engaged), n_post, engaged.mean()))
    for h in HEADS:
        feats[f"post_{h}_rate_total"] = _smoothed(by_post.sums(labels[h]), n_post, labels[h].mean())
    # the same over all earlier impressions of the author's posts (unknown author -1: none); the
    # view's base row gives every post a row, so zero counts (the prior) rather than NaN
    author = df["author_id"].to_numpy()
    known_author = author != -1
    by_author = PriorWindowSums(author, t, max_w)
    n_author = np.where(known_author, by_author.sums(ones), 0.0)
    feats["author_impressions_total"] = n_author
    for h in HEADS:
        k_author = np.where(known_author, by_author.sums(labels[h]), 0.0)
        feats[f"author_{h}_rate_total"] = _smoothed(k_author, n_author, labels[h].mean())

    # social view: the user's history with the author
    pair = pd.factorize(pd.MultiIndex.from_arrays([df["user_id"], df["author_id"]]))[0]
    by_pair = PriorWindowSums(pair, t, max_w)
    n_pair = by_pair.sums(ones)
    cold_pair = n_pair == 0
    eng_pair = by_pair.sums(weighted)
    feats["ua_impressions"] = np.where(cold_pair, nan, n_pair)
    feats["ua_engagements"] = np.where(cold_pair, nan, eng_pair)
    feats["ua_clicks"] = np.where(cold_pair, nan, by_pair.sums(labels["click"]))
    feats["ua_follows"] = np.where(cold_pair, nan, (by_pair.sums(labels["follow"]) > 0).astype(float))
    feats["ua_engagement_rate"] = np.where(cold_pair, nan, _smoothed(eng_pair, n_pair, weighted.mean()))
    feats["ua_long_views"] = np.where(cold_pair, nan, by_pair.sums(labels["long_view"]))

    # user x primary tag (tag -1: no row)
    tag = df["tag_id"].fillna(-1).to_numpy(np.int64)
    by_ut = PriorWindowSums(pd.factorize(pd.MultiIndex.from_arrays([df["user_id"], tag]))[0], t, max_w)
    n_ut = by_ut.sums(ones)
    no_ut = (n_ut == 0) | (tag < 0)
    feats["ut_impressions"] = np.where(no_ut, nan, n_ut)
    for h in ("click", "long_view", "like"):
        feats[f"ut_{h}_rate"] = np.where(no_ut, nan, _smoothed(by_ut.sums(labels[h]), n_ut, labels[h].mean()))

    # long-window user propensities: impressions of earlier local days (daily snapshots)
    daily = df.groupby(["user_id", "date"])[list(HEADS)].agg(["sum", "count"])
    n_day = daily[(HEADS[0], "count")].groupby(level=0).cumsum() - daily[(HEADS[0], "count")]
    lt = pd.DataFrame({"user_lt_impressions": n_day,
                       "user_lt_active_days": daily.groupby(level=0).cumcount().astype(float)})
    for h in HEADS:
        k_day = daily[(h, "sum")].groupby(level=0).cumsum() - daily[(h, "sum")]
        lt[f"user_lt_{h}_rate"] = _smoothed(k_day, n_day, labels[h].mean())
    lt = lt.reindex(pd.MultiIndex.from_arrays([df["user_id"], df["date"]]))
    for col in lt.columns:
        feats[col] = lt[col].to_numpy(float)

    # the pre-log history (constant over the log, which starts after it)
    feats.update(_prelog_features(Path(data_dir), df, labels))

    # temporal view: session activity of the user
    prev = by_user.previous_time(t)
    feats["tmp_last_impression_ts"] = np.floor(prev / 1000.0)
    feats["tmp_impressions_1h"] = np.where(cold_user, nan, by_user.sums(ones, _HOUR_MS))
    feats["tmp_impressions_24h"] = np.where(cold_user, nan, by_user.sums(ones, 24 * _HOUR_MS))

    out = df[["user_id", "post_id", "author_id", "tag_id", "event_timestamp", "date", "tab", *HEADS]].copy()
    out["date"] = out["date"].astype("int64")
    out = pd.concat([out, pd.DataFrame(feats, index=out.index)], axis=1)
    out = add_request_features(out, out["event_timestamp"], surface=out["tab"])
    for col, values in id_bucket_columns(out["user_id"].to_numpy(), out["post_id"].to_numpy(),
                                         out["author_id"].to_numpy()).items():
        out[col] = values
    # the history features need the co-engagement job's daily neighbour tables (Spark:
    # pipelines.history_features); the dev frame leaves them missing, as a mixer without the history
    # hydrator would serve them (tests of that path build them for real)
    for col in HISTORY_FEATURES + SEQUENCE_ID_FEATURES + RETRIEVAL_FEATURES:  # retrieval scores: served candidate sets only
        out[col] = np.nan
    # request ids as evaluation groups them (the features here stay per impression: a dev shortcut)
    out = assign_requests(out)
    if user_sample_mod > 1:
        out = out.loc[out["user_id"] % user_sample_mod == 0].reset_index(drop=True)
    return out

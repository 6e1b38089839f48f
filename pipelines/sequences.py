"""User action sequences: each user's engagements in time order, as known before a cutoff.

The sequence is x-algorithm's user action sequence (the recent engagements the retrieval and
ranking models read; DIN / SIM in the literature): one row per engaged post, with its author, the
action and its time. It is built from two sources, both strictly before ``as_of``:

- the pre-log history (canonical ``prelog_events``, KuaiRand's ``user_sequences_upto_20220424``):
  kinds ``long_view`` and ``like``. A plain ``watch`` is not an engagement. The file gives no time
  per video, only the order inside each list and when the history ends (``event_ts``), so each
  video is stamped ``event_ts - (last position - position) ms``: the order survives and every
  stamp is before the history's end. A post in both lists is kept once, as ``like``.
- the impression log: rows with any engaged label (``ENGAGED_HEADS``), stamped at the impression,
  the action being the strongest label (``ACTION_STRENGTH``).

A post engaged more than once keeps its latest engagement (and the strongest action at that time),
so the sequence is the user's distinct engaged posts, oldest first. The online store keeps the
last ``N`` (``core.online_layout.action_sequence``); the co-engagement job reads all of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# What counts as engaged: the whole-funnel evaluation's ``engaged`` positives (issue #19 and
# DESIGN.md): a click alone is not an engagement on a feed that autoplays.
ENGAGED_HEADS: tuple[str, ...] = ("long_view", "like", "follow", "comment", "forward")
# Weaker first: an impression with several labels is recorded as its strongest action (the order
# of ``core.schema.ENGAGEMENT_EDGE_WEIGHTS``: effort of the action).
ACTION_STRENGTH: tuple[str, ...] = ("long_view", "like", "comment", "forward", "follow")
SEQUENCE_COLUMNS: tuple[str, ...] = ("user_id", "post_id", "author_id", "action", "ts")


def _utc(as_of) -> pd.Timestamp:
    ts = pd.Timestamp(as_of)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _seconds(ts: pd.Series) -> np.ndarray:
    values = pd.to_datetime(ts, utc=True)
    return ((values - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype="float64")


def engagement_sequences(impressions: pd.DataFrame, prelog_events: pd.DataFrame | None,
                         as_of, distinct: bool = True) -> pd.DataFrame:
    """Every user's distinct engaged posts before ``as_of``, oldest first (module docstring).

    Args:
        impressions: canonical impressions (``user_id``, ``post_id``, ``author_id``, ``event_ts``
            and the ``ENGAGED_HEADS`` label columns).
        prelog_events: canonical ``prelog_events`` (with ``position``), or None.
        as_of: the cutoff (tz-aware, or naive meaning UTC); only events strictly before it count.
        distinct: keep each post's latest engagement only (False: every engagement, for callers
            that cut the sequence at several times and de-duplicate after the cut).

    Returns:
        DataFrame ``SEQUENCE_COLUMNS``: user_id, post_id, author_id (int64), action (str, one of
        ``ACTION_STRENGTH``), ts (float64 epoch seconds), sorted by (user_id, ts).

    Raises:
        ValueError: a needed column is missing.
    """
    need = {"user_id", "post_id", "author_id", "event_ts", *ENGAGED_HEADS}
    missing = sorted(need - set(impressions.columns))
    if missing:
        raise ValueError(f"impressions lack columns {missing} (see core.schema.IMPRESSIONS_COLUMNS); rebuild them")
    cutoff = _utc(as_of)
    cutoff_s = cutoff.value / 1e9
    parts = []

    ts = _seconds(impressions["event_ts"])
    labels = impressions[list(ACTION_STRENGTH)].fillna(0).to_numpy(dtype="float64") > 0
    engaged = labels.any(axis=1) & (ts < cutoff_s)
    if engaged.any():
        # strongest label: the last True column in ACTION_STRENGTH order
        strongest = len(ACTION_STRENGTH) - 1 - np.argmax(labels[engaged][:, ::-1], axis=1)
        parts.append(pd.DataFrame({
            "user_id": impressions["user_id"].to_numpy(dtype="int64")[engaged],
            "post_id": impressions["post_id"].to_numpy(dtype="int64")[engaged],
            "author_id": impressions["author_id"].to_numpy(dtype="int64")[engaged],
            "strength": strongest.astype("int64"),
            "ts": ts[engaged],
        }))

    if prelog_events is not None and len(prelog_events):
        if "position" not in prelog_events.columns:
            raise ValueError("prelog_events has no 'position' column: rebuild the canonical tables "
                             "(`home-mixer features build`)")
        pre = prelog_events[prelog_events["kind"].isin(["long_view", "like"])]
        pre_ts = _seconds(pre["event_ts"])
        pre = pre.loc[pre_ts < cutoff_s].assign(end=pre_ts[pre_ts < cutoff_s])
        if len(pre):
            last = pre.groupby(["user_id", "kind"])["position"].transform("max")
            pre = pre.assign(ts=pre["end"] - (last - pre["position"]) * 1e-3,
                             strength=np.where(pre["kind"] == "like", ACTION_STRENGTH.index("like"),
                                               ACTION_STRENGTH.index("long_view")))
            # a post in both lists: one row, the like, at the later of its two stamps
            pre = pre.groupby(["user_id", "post_id", "author_id"], as_index=False).agg(
                strength=("strength", "max"), ts=("ts", "max"))
            parts.append(pre[["user_id", "post_id", "author_id", "strength", "ts"]].astype(
                {"user_id": "int64", "post_id": "int64", "author_id": "int64", "strength": "int64"}))

    if not parts:
        return pd.DataFrame({"user_id": pd.Series(dtype="int64"), "post_id": pd.Series(dtype="int64"),
                             "author_id": pd.Series(dtype="int64"), "action": pd.Series(dtype="object"),
                             "ts": pd.Series(dtype="float64")})
    events = pd.concat(parts, ignore_index=True).sort_values(["user_id", "ts", "strength"], kind="stable")
    if distinct:  # the latest engagement of each post; the strongest action when two share that time
        events = events.drop_duplicates(["user_id", "post_id"], keep="last")
    events["action"] = np.asarray(ACTION_STRENGTH, dtype=object)[events["strength"].to_numpy()]
    return events[list(SEQUENCE_COLUMNS)].reset_index(drop=True)


def last_n(sequences: pd.DataFrame, n: int) -> pd.DataFrame:
    """The last ``n`` rows of each user's sequence (``engagement_sequences`` order kept).

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"the sequence length must be >= 1, got {n}")
    from_end = sequences.groupby("user_id").cumcount(ascending=False)
    return sequences[from_end < n].reset_index(drop=True)


__all__ = ["ACTION_STRENGTH", "ENGAGED_HEADS", "SEQUENCE_COLUMNS", "engagement_sequences", "last_n"]

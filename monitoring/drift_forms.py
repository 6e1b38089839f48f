"""How each monitored feature is compared for drift: in which form, and against which reference.

Many features are accumulated from the impression log since the feature pipelines' origin (the
log's first local day): lifetime counts (``user_impressions``, ``post_impressions_total``), counts
over earlier days (``user_lt_active_days``), windows longer than the history so far (``post_*_7d``
in the first week), and ages (``req_post_age_hours`` of a fixed catalogue grows 24 h a day). Their
raw values grow by construction, so against the training window they drift on every normal day
(on KuaiRand's validation days, about half of the 90 monitored features). ``DRIFT_FORMS`` says,
for every monitored feature, how it is compared instead:

- ``against``: ``TRAINING`` (the champion's training reference) for what does not depend on how
  much log there is (the official user features, the pre-log history, the post's own attributes,
  the request context); ``RECENT`` (a rolling reference: the previous day(s) of served rows) for
  everything accumulated from the log, whose shape keeps changing as the history grows (smoothed
  rates of users with more impressions spread out; fewer users are cold);
- ``form``: ``RAW`` (as is); ``PER_DAY`` (a count divided by its exposure: days since the origin,
  capped at the feature's window); ``PER_WHOLE_DAY`` (a count over earlier whole days divided by
  how many there were); ``CREATION_TIME`` (an age turned back into the item's creation time, request
  time - age: for a fixed catalogue it does not move); ``CALENDAR`` (day of week: a window of one
  day is a single value by construction, so it is not tested, only checked for nulls).

The choices were made from data (``bench/drift_gate.py`` on KuaiRand's ten days: each feature's
drift flags per day in each candidate form against the days before and against the previous day;
README "Drift monitoring" has the table). On a feed where new posts keep arriving, post age at
request time would be stationary as is: the table is per deployment, and the unit tests check it
covers every feature that grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.request_features import LOCAL_UTC_OFFSET_HOURS
from core.schema import (
    CONTENT_VIEW, HISTORY_FEATURES, SOCIAL_VIEW, SURFACE_FEATURES, TEMPORAL_VIEW, USER_LONGTERM_VIEW, USER_TAG_VIEW,
    USER_VIEW, WINDOWS_HOURS,
)
from monitoring.reference import monitored_features

# the comparison forms
RAW = "raw"
PER_DAY = "per_day"
PER_WHOLE_DAY = "per_whole_day"
CREATION_TIME = "creation_time"
CALENDAR = "calendar"
FORMS = (RAW, PER_DAY, PER_WHOLE_DAY, CREATION_TIME, CALENDAR)
# the references
TRAINING = "training"
RECENT = "recent"


@dataclass(frozen=True)
class DriftForm:
    """How one feature is compared.

    Attributes:
        form: one of ``FORMS``. against: ``TRAINING`` or ``RECENT``.
        window_days: for ``PER_DAY``, the feature's window (exposure = min(days since origin,
            window)); None for a lifetime count.
        critical: drift of this feature alone fails the gate (the surface mix: click rates differ
            ~5x between surfaces, so a changed mix changes what is served, whatever the share).
        why: one line for the README and the report.
    """

    form: str
    against: str
    why: str
    window_days: float | None = None
    critical: bool = False

    def __post_init__(self):
        if self.form not in FORMS or self.against not in (TRAINING, RECENT):
            raise ValueError(f"unknown drift form {self.form!r} or reference {self.against!r}")


def _window_days(feature: str) -> float | None:
    for suffix, hours in WINDOWS_HOURS.items():
        if feature.endswith(f"_{suffix}"):
            return hours / 24.0
    return None


def _table() -> dict[str, DriftForm]:
    """Every monitored feature's form (``monitoring.reference.monitored_features``), by rule over
    ``core.schema`` names; the unit tests check it is complete."""
    t: dict[str, DriftForm] = {}
    log_derived = "accumulated from the log: its shape changes as the history grows"
    static = "does not depend on how much log there is"
    for f in USER_VIEW.features:
        t[f] = DriftForm(RAW, TRAINING, "official user attribute: " + static)
    for f in ("user_impressions",):
        t[f] = DriftForm(PER_DAY, RECENT, "lifetime count since the origin: per day of history")
    for f in ("user_click_rate", "user_long_view_rate", "user_like_rate", "user_follow_rate", "user_hate_rate"):
        t[f] = DriftForm(RAW, RECENT, "smoothed rate " + log_derived)
    # the official activity degree and account age follow the mix of users served (holidays move it)
    t["user_active_degree_code"] = DriftForm(RAW, RECENT, "mix of users served moves from day to day")
    t["user_register_days"] = DriftForm(RAW, RECENT, "mix of users served moves from day to day")
    for f in CONTENT_VIEW.features:
        if f in ("post_duration_ms", "post_is_ad"):
            t[f] = DriftForm(RAW, TRAINING, "the post's own attribute: " + static)
        elif f.endswith("_7d") and "rate" not in f:
            t[f] = DriftForm(PER_DAY, RECENT, "window count that grows until the log spans the window: per day "
                             "of the window so far", window_days=_window_days(f))
        elif f in ("post_impressions_total", "author_impressions_total"):
            t[f] = DriftForm(PER_DAY, RECENT, "lifetime count since the origin: per day of history")
        else:
            t[f] = DriftForm(RAW, RECENT, "window count or smoothed rate " + log_derived)
    # the share of pairs / tags with pre-log history falls as the log's own pairs outnumber them
    prelog_pairs = "pre-log history of the pair: its present share falls as the log adds new pairs"
    for f in SOCIAL_VIEW.features:
        if "prelog" in f:
            t[f] = DriftForm(RAW, RECENT, prelog_pairs)
        else:
            # sparse (3 % of rows) small pair counts: per-day forms drifted more than raw on KuaiRand
            t[f] = DriftForm(RAW, RECENT, "user x author count or rate " + log_derived)
    for f in TEMPORAL_VIEW.features:
        t[f] = DriftForm(RAW, RECENT, "session depth " + log_derived)
    for f in USER_LONGTERM_VIEW.features:
        if "prelog" in f:
            t[f] = DriftForm(RAW, TRAINING, "pre-log history: " + static)
        elif f in ("user_lt_impressions", "user_lt_active_days"):
            t[f] = DriftForm(PER_WHOLE_DAY, RECENT, "count over earlier whole days: per earlier day")
        else:
            t[f] = DriftForm(RAW, RECENT, "long-window rate " + log_derived)
    for f in USER_TAG_VIEW.features:
        if "prelog" in f:
            t[f] = DriftForm(RAW, RECENT, prelog_pairs)
        elif f == "ut_impressions":
            t[f] = DriftForm(PER_DAY, RECENT, "lifetime count since the origin: per day of history")
        else:
            t[f] = DriftForm(RAW, RECENT, "user x tag rate " + log_derived)
    t["req_hour_of_day"] = DriftForm(RAW, TRAINING, "request context: " + static)
    t["req_day_of_week"] = DriftForm(CALENDAR, TRAINING, "one value per day window by construction: not tested")
    t["req_secs_since_last_impression"] = DriftForm(RAW, RECENT, "gap bounded by the history so far")
    t["req_post_age_hours"] = DriftForm(CREATION_TIME, RECENT, "age of a fixed catalogue grows 24 h a day: compared "
                                        "as the post's creation time")
    for f in SURFACE_FEATURES:
        t[f] = DriftForm(RAW, TRAINING, "surface mix (request context); critical", critical=True)
    for f in HISTORY_FEATURES:
        t[f] = DriftForm(RAW, RECENT, "user action sequence " + log_derived)
    # raw timestamps of the views are inputs to request features, not monitored
    return {f: t[f] for f in monitored_features() if f in t}


DRIFT_FORMS: dict[str, DriftForm] = _table()


def drift_form(feature: str) -> DriftForm:
    """The declared form of ``feature``; ``RAW`` against ``TRAINING`` for a feature the table does
    not name (a feature added to ``core.schema`` later; the unit tests ask for it to be declared)."""
    return DRIFT_FORMS.get(feature, DriftForm(RAW, TRAINING, "not declared"))


def growing_features() -> tuple[str, ...]:
    """Features compared in a transformed form because their raw values grow by construction."""
    return tuple(f for f, d in DRIFT_FORMS.items() if d.form != RAW)


def history_origin(first_event: pd.Timestamp) -> pd.Timestamp:
    """The start (UTC) of the local day of the log's first event: where accumulated features start
    counting (``LOCAL_UTC_OFFSET_HOURS``; KuaiRand's days are Beijing days)."""
    ts = pd.Timestamp(first_event)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    offset = pd.Timedelta(hours=LOCAL_UTC_OFFSET_HOURS)
    return (ts + offset).floor("D") - offset


def request_times(frame: pd.DataFrame) -> pd.Series | None:
    """Each row's request time (UTC): ``request_ts`` (training sets), else ``as_of`` (epoch
    seconds, the production sample); None when the frame has neither (e.g. an older reference)."""
    if "request_ts" in frame.columns:
        return pd.to_datetime(frame["request_ts"], utc=True)
    if "as_of" in frame.columns:
        return pd.to_datetime(pd.to_numeric(frame["as_of"]), unit="s", utc=True)
    return None


def request_hours(frame: pd.DataFrame) -> np.ndarray | None:
    """Each row's request hour as int64 hours since the epoch (None without a request time)."""
    times = request_times(frame)
    if times is None:
        return None
    return ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(hours=1)).to_numpy(dtype="int64")


def comparison_form(frame: pd.DataFrame, features, origin: pd.Timestamp | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """``frame[features]`` as float64 in each feature's declared form.

    Args:
        frame: rows with the features (NaN = missing) and, for the transformed forms, a request
            time (``request_times``).
        features: the columns to return.
        origin: ``history_origin`` of the log the features were accumulated from; None (or no
            request time in the frame) leaves every feature raw.

    Returns:
        (DataFrame ``[len(frame), len(features)]`` float64, same index; ``{feature: form used}``:
        the declared form, or ``RAW`` where it could not be applied).

    Formulas (days are 86,400 s): ``PER_DAY``: x / max(min(t - origin, window), 1 h);
    ``PER_WHOLE_DAY``: x / max(floor(t - origin), 1); ``CREATION_TIME``: (t - origin) in hours - x
    (hours from the origin back to the post's creation, the same for every request of a post).
    """
    x = frame[list(features)].apply(pd.to_numeric, errors="coerce").astype("float64")
    times = request_times(frame) if origin is not None else None
    used = {}
    elapsed = None
    if times is not None:
        elapsed = ((times - pd.Timestamp(origin)).dt.total_seconds() / 86400.0).to_numpy(dtype="float64")
    for f in features:
        d = drift_form(f)
        if d.form in (RAW, CALENDAR) or elapsed is None:
            used[f] = d.form if d.form == CALENDAR else RAW
            continue
        if d.form == PER_DAY:
            exposure = elapsed if d.window_days is None else np.minimum(elapsed, d.window_days)
            x[f] = x[f].to_numpy() / np.maximum(exposure, 1.0 / 24.0)
        elif d.form == PER_WHOLE_DAY:
            x[f] = x[f].to_numpy() / np.maximum(np.floor(elapsed), 1.0)
        elif d.form == CREATION_TIME:
            x[f] = elapsed * 24.0 - x[f].to_numpy()
        used[f] = d.form
    return x, used

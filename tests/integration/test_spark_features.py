"""The Spark feature jobs on a real local Spark: no leakage (crafted cases) and the table contract (real slice).

The point-in-time lookup used throughout is the one Feast applies: per entity and request time t,
the latest feature row with ``event_timestamp <= t``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.schema import (
    ENGAGEMENT_EDGE_WEIGHTS,
    FEATURE_VIEWS,
    IMPRESSIONS_COLUMNS,
    POSTS_COLUMNS,
    USERS_COLUMNS,
)
from core.state import StateDir
from pipelines.canonical import build_canonical, write_table
from pipelines.features import RatePriors, build_offline_features, smoothed_rate
from pipelines.features.common import BASE_ROW_TS
from pipelines.raw import load_raw

pytestmark = pytest.mark.integration

MS = pd.Timedelta(milliseconds=1)
H = pd.Timestamp("2022-04-25T10:00:00Z")  # an hour boundary
T1, T2, T3, T4 = H + pd.Timedelta(minutes=10), H + pd.Timedelta(minutes=20), \
    H + pd.Timedelta(minutes=30), H + pd.Timedelta(minutes=90)
PRIORS = RatePriors(click=0.4, long_view=0.3, like=0.02, follow=0.01, hate=0.005, engaged=0.45,
                    period="fixed for the test")
CREATED = pd.Timestamp("2022-04-09T16:00:00Z")
B_TIME, A_TIME = H - pd.Timedelta(hours=3) + pd.Timedelta(minutes=5), H + pd.Timedelta(minutes=15)


def point_in_time(table: pd.DataFrame, t: pd.Timestamp, **keys) -> pd.Series | None:
    """The latest row of ``table`` for ``keys`` with event_timestamp <= t (None if there is none)."""
    rows = table
    for k, v in keys.items():
        rows = rows[rows[k] == v]
    rows = rows[rows["event_timestamp"] <= t]
    return None if rows.empty else rows.sort_values("event_timestamp").iloc[-1]


def impression(user, post, author, ts, **heads) -> dict:
    row = {c: 0 for c in IMPRESSIONS_COLUMNS}
    return row | {"user_id": user, "post_id": post, "author_id": author, "event_ts": ts,
                  "date": 20220425, "duration_ms": 10_000, "tab": 1} | heads


def user_row(user, degree="high_active", **values) -> dict:
    row = {c: 0 for c in USERS_COLUMNS}
    return row | {"user_id": user, "user_active_degree": degree, "is_video_author": 1,
                  "follow_user_num": 7, "fans_user_num": 3, "friend_user_num": 2,
                  "register_days": 100} | values


def post_row(post, author, video_type="NORMAL") -> dict:
    return {"post_id": post, "author_id": author, "created_ts": CREATED, "duration_ms": 12_000.0,
            "video_type": video_type, "tags": "7", "primary_tag": 7}


def write_canonical(state: StateDir, impressions: list[dict], users: list[dict], posts: list[dict]):
    imp = pd.DataFrame(impressions)[list(IMPRESSIONS_COLUMNS)]
    imp["event_ts"] = pd.to_datetime(imp["event_ts"], utc=True).astype("datetime64[us, UTC]")
    usr = pd.DataFrame(users)[list(USERS_COLUMNS)]
    usr["user_active_degree"] = usr["user_active_degree"].astype("string")
    pst = pd.DataFrame(posts)[list(POSTS_COLUMNS)]
    pst["created_ts"] = pd.to_datetime(pst["created_ts"], utc=True).astype("datetime64[us, UTC]")
    for name, frame in (("impressions", imp), ("users", usr), ("posts", pst)):
        write_table(frame, state.table(name))


def read_features(state: StateDir) -> dict[str, pd.DataFrame]:
    return {v.table: pd.read_parquet(state.table(v.table)) for v in FEATURE_VIEWS}


@pytest.fixture(scope="module")
def crafted(spark, tmp_path_factory):
    """Feature tables built from a handful of hand-placed events (see each test)."""
    state = StateDir(tmp_path_factory.mktemp("crafted")).ensure()
    impressions = [
        # user 1: clicked + liked + followed author 900 at T1, saw another of its posts at T2
        impression(1, 100, 900, T1, click=1, like=1, follow=1),
        impression(1, 101, 900, T2),
        impression(1, 102, 901, T4),
        # user 2: two impressions in the same millisecond, one clicked
        impression(2, 100, 900, T3, click=1),
        impression(2, 101, 900, T3),
        # user 4 (not in the users table): post 103 at exactly H:00 and just before H+1h
        impression(4, 103, 902, H),
        impression(4, 103, 902, H + pd.Timedelta(hours=1) - MS, long_view=1),
        # user 5: post 105 two days earlier (7-day window only)
        impression(5, 105, 903, H - pd.Timedelta(days=2), like=1),
        # user 6 (not in the users table): author 904's post 107 (B) at H - 3h + 5 min, then its
        # post 106 (A) at H + 15 min; post 108 of 904 is never shown
        impression(6, 107, 904, B_TIME, click=1),
        impression(6, 106, 904, A_TIME, click=1, like=1),
    ]
    users = [user_row(1), user_row(2, degree="full_active"), user_row(3, degree="no-such-degree"),
             user_row(5)]
    posts = [post_row(100, 900), post_row(101, 900), post_row(102, 901), post_row(103, 902),
             post_row(104, 902, video_type="AD"), post_row(105, 903),
             post_row(106, 904), post_row(107, 904), post_row(108, 904)]
    write_canonical(state, impressions, users, posts)
    lines: list[str] = []
    counts = build_offline_features(spark, state, priors=PRIORS, log=lines.append)
    return {"state": state, "counts": counts, "lines": lines, **read_features(state)}


def test_runner_reports_counts_and_progress(crafted):
    for table, n in crafted["counts"].items():
        assert len(crafted[table]) == n
    assert any("content_features: done (" in ln and ln.endswith(" s") for ln in crafted["lines"])
    # user rows: 4 base rows + one per (user, distinct event time): 3 + 1 + 2 + 1 + 2
    assert crafted["counts"]["user_features"] == 4 + 9


def test_user_row_at_event_time_excludes_that_event(crafted):
    uf, p = crafted["user_features"], PRIORS
    at_t1 = point_in_time(uf, T1, user_id=1)
    assert at_t1["user_impressions"] == 0 and at_t1["user_click_rate"] == pytest.approx(p.click)
    assert at_t1["event_timestamp"] == BASE_ROW_TS  # the profile row
    just_after = point_in_time(uf, T1 + MS, user_id=1)
    assert just_after["user_impressions"] == 1
    at_t2 = point_in_time(uf, T2, user_id=1)
    assert at_t2["user_impressions"] == 1
    assert at_t2["user_click_rate"] == pytest.approx(smoothed_rate(1, 1, p.click))
    assert at_t2["user_like_rate"] == pytest.approx(smoothed_rate(1, 1, p.like))
    assert at_t2["user_long_view_rate"] == pytest.approx(smoothed_rate(0, 1, p.long_view))
    after_t2 = point_in_time(uf, T2 + MS, user_id=1)
    assert after_t2["user_impressions"] == 2
    assert after_t2["user_click_rate"] == pytest.approx(smoothed_rate(1, 2, p.click))


def test_same_millisecond_events_are_counted_together(crafted):
    uf = crafted["user_features"]
    assert point_in_time(uf, T3, user_id=2)["user_impressions"] == 0
    row = point_in_time(uf, T3 + MS, user_id=2)
    assert row["user_impressions"] == 2
    assert row["user_click_rate"] == pytest.approx(smoothed_rate(1, 2, PRIORS.click))
    assert ((uf["user_id"] == 2) & (uf["event_timestamp"] == T3 + MS)).sum() == 1
    tf = crafted["temporal_features"]
    assert point_in_time(tf, T3 + MS, user_id=2)["tmp_impressions_1h"] == 2


def test_user_profile_rows_and_unknown_profiles(crafted):
    uf = crafted["user_features"]
    before_log = H - pd.Timedelta(days=10)
    u1, u2, u3 = (point_in_time(uf, before_log, user_id=u) for u in (1, 2, 3))
    assert (u1["user_active_degree_code"], u2["user_active_degree_code"]) == (1, 0)
    assert u3["user_active_degree_code"] == -1 and u3["user_impressions"] == 0
    assert u1["user_follow_num"] == 7 and u1["user_register_days"] == 100
    assert point_in_time(uf, BASE_ROW_TS - MS, user_id=1) is None
    # user 4 is not in the users table: no profile row, unknown profile values
    assert point_in_time(uf, H, user_id=4) is None
    u4 = point_in_time(uf, H + MS, user_id=4)
    assert u4["user_impressions"] == 1 and u4["user_active_degree_code"] == -1
    assert u4["user_is_video_author"] == -1 and np.isnan(u4["user_follow_num"])


def test_social_features_only_count_earlier_impressions(crafted):
    sf, pe = crafted["social_features"], PRIORS.engaged
    assert point_in_time(sf, T1, user_id=1, author_id=900) is None
    at_t2 = point_in_time(sf, T2, user_id=1, author_id=900)
    weight = ENGAGEMENT_EDGE_WEIGHTS["click"] + ENGAGEMENT_EDGE_WEIGHTS["like"] + \
        ENGAGEMENT_EDGE_WEIGHTS["follow"]
    assert (at_t2["ua_impressions"], at_t2["ua_clicks"], at_t2["ua_follows"]) == (1, 1, 1)
    assert at_t2["ua_engagements"] == pytest.approx(weight)
    assert at_t2["ua_engagement_rate"] == pytest.approx(smoothed_rate(1, 1, pe))
    after = point_in_time(sf, T2 + MS, user_id=1, author_id=900)
    assert (after["ua_impressions"], after["ua_follows"]) == (2, 1)
    assert after["ua_engagement_rate"] == pytest.approx(smoothed_rate(1, 2, pe))
    assert point_in_time(sf, T4, user_id=1, author_id=901) is None


def test_temporal_windows_and_last_impression(crafted):
    tf = crafted["temporal_features"]
    at_t2 = point_in_time(tf, T2, user_id=1)
    assert at_t2["tmp_last_impression_ts"] == int(T1.timestamp())
    at_t4 = point_in_time(tf, T4, user_id=1)
    assert (at_t4["tmp_impressions_1h"], at_t4["tmp_impressions_24h"]) == (2, 2)
    after_t4 = point_in_time(tf, T4 + MS, user_id=1)
    # T1 and T2 are more than an hour before T4: they leave the 1 h window, stay in 24 h
    assert (after_t4["tmp_impressions_1h"], after_t4["tmp_impressions_24h"]) == (1, 3)
    assert after_t4["tmp_last_impression_ts"] == int(T4.timestamp())


def test_content_hour_boundary_and_window_drop_off(crafted):
    cf = crafted["content_features"]
    post = 103  # impressions at exactly H and at H + 1h - 1ms (long view)
    at_h = point_in_time(cf, H, post_id=post)
    assert at_h["event_timestamp"] == H
    assert at_h["post_impressions_1h"] == 0 and at_h["post_impressions_total"] == 0
    assert point_in_time(cf, H + pd.Timedelta(hours=1) - MS, post_id=post)["post_impressions_1h"] == 0
    next_hour = point_in_time(cf, H + pd.Timedelta(hours=1), post_id=post)
    assert (next_hour["post_impressions_1h"], next_hour["post_long_views_1h"]) == (2, 1)
    assert next_hour["post_long_view_rate_24h"] == pytest.approx(smoothed_rate(1, 2, PRIORS.long_view))
    later = point_in_time(cf, H + pd.Timedelta(hours=2), post_id=post)
    assert (later["post_impressions_1h"], later["post_impressions_24h"]) == (0, 2)
    assert later["post_impressions_total"] == 2
    assert later["post_engagement_rate_total"] == pytest.approx(smoothed_rate(1, 2, PRIORS.engaged))
    # before its first impression hour: the static row (created 2022-04-10 local time)
    static = point_in_time(cf, H - pd.Timedelta(hours=1), post_id=post)
    assert static["event_timestamp"] == CREATED and static["post_impressions_7d"] == 0
    assert static["post_created_ts"] == int(CREATED.timestamp()) and static["post_duration_ms"] == 12_000


def test_content_seven_day_window_and_clicks(crafted):
    cf = crafted["content_features"]
    old = point_in_time(cf, H + pd.Timedelta(hours=1), post_id=105)  # event 49 h earlier
    assert (old["post_likes_24h"], old["post_likes_7d"], old["post_impressions_7d"]) == (0, 1, 1)
    assert old["post_like_rate_7d"] == pytest.approx(smoothed_rate(1, 1, PRIORS.like))
    p100 = point_in_time(cf, H + pd.Timedelta(hours=1), post_id=100)
    assert (p100["post_impressions_1h"], p100["post_clicks_1h"]) == (2, 2)
    assert p100["post_click_rate_24h"] == pytest.approx(smoothed_rate(2, 2, PRIORS.click))
    assert point_in_time(cf, T3, post_id=100)["post_impressions_1h"] == 0


def test_never_shown_post_has_static_row(crafted):
    cf = crafted["content_features"]
    rows = cf[cf["post_id"] == 104]
    assert len(rows) == 1
    row = rows.iloc[0]
    assert row["event_timestamp"] == CREATED and row["post_is_ad"] == 1
    assert row["post_impressions_total"] == 0
    assert row["post_click_rate_24h"] == pytest.approx(PRIORS.click)
    # the grid of shown posts ends at the end of the log's last hour (T4 = 11:30 -> 12:00)
    assert cf["event_timestamp"].max() == H + pd.Timedelta(hours=2)


def test_author_rates_count_the_authors_other_posts_from_the_next_hour(crafted):
    cf, p = crafted["content_features"], PRIORS
    hour = pd.Timedelta(hours=1)
    # post B (107): its own impression at H - 3h + 5 min counts from the row stamped H - 2h
    b_own = point_in_time(cf, H - 2 * hour, post_id=107)
    assert b_own["event_timestamp"] == H - 2 * hour and b_own["author_impressions_total"] == 1
    assert b_own["author_click_rate_total"] == pytest.approx(smoothed_rate(1, 1, p.click))
    # post A's impression at H + 15 min: not in B's row at H, even just before H + 1h ...
    for t in (A_TIME, A_TIME + MS, H + hour - MS):
        row = point_in_time(cf, t, post_id=107)
        assert row["event_timestamp"] == H and row["author_impressions_total"] == 1
        assert row["author_like_rate_total"] == pytest.approx(smoothed_rate(0, 1, p.like))
    # ... but in B's row at H + 1h, although B itself had no impression in that hour
    b_next = point_in_time(cf, H + hour, post_id=107)
    assert b_next["event_timestamp"] == H + hour and b_next["post_impressions_total"] == 1
    assert b_next["author_impressions_total"] == 2
    assert b_next["author_click_rate_total"] == pytest.approx(smoothed_rate(2, 2, p.click))
    assert b_next["author_like_rate_total"] == pytest.approx(smoothed_rate(1, 2, p.like))
    assert b_next["author_hate_rate_total"] == pytest.approx(smoothed_rate(0, 2, p.hate))
    assert b_next["post_click_rate_total"] == pytest.approx(smoothed_rate(1, 1, p.click))
    # post A (106): B's impression is in A's first grid row; its own from the next row
    a_first = point_in_time(cf, A_TIME, post_id=106)
    assert a_first["event_timestamp"] == H and a_first["author_impressions_total"] == 1
    assert a_first["post_impressions_total"] == 0
    assert point_in_time(cf, H + hour, post_id=106)["author_impressions_total"] == 2
    # base rows (created before every event) and the never-shown post 108: zero counts, the prior
    base = point_in_time(cf, H - 4 * hour, post_id=106)
    assert base["event_timestamp"] == CREATED and base["author_impressions_total"] == 0
    never = cf[cf["post_id"] == 108]
    assert len(never) == 1 and never.iloc[0]["author_impressions_total"] == 0
    assert never.iloc[0]["author_follow_rate_total"] == pytest.approx(p.follow)
    # author 900 (posts 100, 101): four impressions, two clicked, in hour H
    p101 = point_in_time(cf, H + hour, post_id=101)
    assert p101["author_impressions_total"] == 4 and p101["post_impressions_total"] == 2
    assert p101["author_click_rate_total"] == pytest.approx(smoothed_rate(2, 4, p.click))
    assert point_in_time(cf, T4, post_id=100)["author_impressions_total"] == 4
    assert point_in_time(cf, T3, post_id=100)["author_impressions_total"] == 0


# ---------------- (b) a slice of the real data ----------------

@pytest.fixture(scope="module")
def real_slice(spark, data_dir, tmp_path_factory):
    """Canonical + feature tables of the first 5,000 log rows (all users and videos)."""
    state = StateDir(tmp_path_factory.mktemp("real_slice")).ensure()
    raw = load_raw(data_dir)
    raw = dataclasses.replace(raw, log=raw.log.head(5000).copy())
    build_canonical(raw, state)
    counts = build_offline_features(spark, state, log=lambda _: None)
    impressions = pd.read_parquet(state.table("impressions"))
    return {"state": state, "counts": counts, "impressions": impressions, **read_features(state)}


@pytest.mark.parametrize("spec", FEATURE_VIEWS, ids=lambda s: s.name)
def test_feature_table_schema_matches_schema_py(real_slice, spec):
    schema = pq.read_table(real_slice["state"].table(spec.table)).schema
    assert schema.names == [*spec.join_keys, "event_timestamp", *spec.features]
    expected = {k: pa.int64() for k in spec.join_keys}
    expected["event_timestamp"] = pa.timestamp("us", tz="UTC")
    expected |= {f: pa.int64() if t == "int64" else pa.float64() for f, t in spec.features.items()}
    assert {f.name: f.type for f in schema} == expected
    frame = real_slice[spec.table]
    assert len(frame) == real_slice["counts"][spec.table] > 0
    assert not frame.duplicated([*spec.join_keys, "event_timestamp"]).any()


def test_rates_are_probabilities_and_windows_nest(real_slice):
    for table in ("user_features", "content_features", "social_features"):
        frame = real_slice[table]
        rates = [c for c in frame.columns if c.endswith("_rate") or "_rate_" in c]
        assert rates
        values = frame[rates].to_numpy()
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all(), table
    cf = real_slice["content_features"]
    for kind in ("impressions", "clicks", "long_views", "likes"):
        assert (cf[f"post_{kind}_1h"] <= cf[f"post_{kind}_24h"]).all()
        assert (cf[f"post_{kind}_24h"] <= cf[f"post_{kind}_7d"]).all()
    assert (cf["post_impressions_7d"] <= cf["post_impressions_total"]).all()


def test_totals_never_decrease_over_time(real_slice):
    checks = (("user_features", ["user_id"], ["user_impressions"]),
              ("content_features", ["post_id"], ["post_impressions_total", "author_impressions_total"]),
              ("social_features", ["user_id", "author_id"], ["ua_impressions", "ua_engagements",
                                                             "ua_follows"]))
    for table, keys, cols in checks:
        frame = real_slice[table].sort_values([*keys, "event_timestamp"])
        steps = frame.groupby(keys)[cols].diff().dropna()
        assert (steps >= 0).all().all(), table


def test_real_slice_features_match_a_direct_computation(real_slice):
    """For sampled impressions, the joined features equal counts over strictly earlier events."""
    imp, uf, cf = real_slice["impressions"], real_slice["user_features"], real_slice["content_features"]
    sample = imp.sample(40, random_state=7)
    for _, q in sample.iterrows():
        t = q["event_ts"]
        past_user = imp[(imp["user_id"] == q["user_id"]) & (imp["event_ts"] < t)]
        assert point_in_time(uf, t, user_id=q["user_id"])["user_impressions"] == len(past_user)
        hour = t.floor("h")
        post_events = imp.loc[imp["post_id"] == q["post_id"], "event_ts"]
        row = point_in_time(cf, t, post_id=q["post_id"])
        for window, hours in (("1h", 1), ("24h", 24)):
            expected = ((post_events >= hour - pd.Timedelta(hours=hours)) & (post_events < hour)).sum()
            assert row[f"post_impressions_{window}"] == expected
        assert row["post_impressions_total"] == (post_events < hour).sum()
        author_events = imp.loc[imp["author_id"] == q["author_id"], "event_ts"]
        assert row["author_impressions_total"] == (author_events < hour).sum()


def test_spark_session_settings(spark):
    from pipelines.spark import spark_session

    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    assert spark.conf.get("spark.sql.shuffle.partitions") == "8"
    assert spark_session("another-name") is spark  # getOrCreate: Feast reuses the same session


def test_priors_hold_out_the_validation_days_and_round_trip(spark, real_slice, tmp_path):
    from core.schema import VALIDATION_DAYS
    from pipelines.features.common import PRIORS_REPORT

    # ten days; the last two are all clicks: they must not move the prior
    days = [20220425 + i for i in range(6)] + [20220501, 20220502, 20220503, 20220504]
    rows = [{"date": d, "click": int(d >= 20220503 or j == 0), "long_view": 0, "like": 0,
             "follow": 0, "comment": 0, "forward": 0, "hate": 0}
            for d in days for j in range(4)]
    frame = spark.createDataFrame(pd.DataFrame(rows))
    priors = RatePriors.from_impressions(frame)
    assert VALIDATION_DAYS == 2 and priors.click == pytest.approx(0.25) and priors.engaged == pytest.approx(0.25)
    assert "20220425..20220502" in priors.period
    # holding out three days drops 20220502 too (still one click in four)
    three = RatePriors.from_impressions(frame, holdout_days=3)
    assert "20220425..20220501" in three.period and three.click == pytest.approx(0.25)
    written = RatePriors.read_json(real_slice["state"].reports / PRIORS_REPORT)
    imp = real_slice["impressions"]
    assert written.click == pytest.approx(imp["click"].mean())  # the slice is within the first day
    assert RatePriors.read_json(priors.write_json(tmp_path / "p.json")) == priors


def test_missing_canonical_table_is_a_clear_error(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match="impressions.*build_canonical"):
        build_offline_features(spark, StateDir(tmp_path).ensure(), log=lambda _: None)

"""The new offline feature jobs on a real local Spark: user_longterm, user_tag, social's new columns.

(a) crafted cases with known answers (daily snapshots at local midnight, strictly-earlier counts,
pre-log history known only from ``last_time_ms + 1 ms``); (b) a leakage check: on a small random
log, every row of each new table equals a direct pandas recomputation from the events strictly
before its stamp (pre-log events: stamped ``<=`` the row).

Point-in-time lookup as Feast does it: per entity and request time t, the latest row with
``event_timestamp <= t`` (``point_in_time`` of test_spark_features).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import (
    ENGAGEMENT_EDGE_WEIGHTS,
    HEADS,
    POSITIVE_HEADS,
    SOCIAL_VIEW,
    USER_LONGTERM_VIEW,
    USER_TAG_VIEW,
)
from core.state import StateDir
from pipelines.canonical import prelog_events_table, write_table
from pipelines.features import build_offline_features, smoothed_rate
from pipelines.features.common import BASE_ROW_TS
from tests.integration.test_spark_features import (
    PRIORS,
    impression,
    point_in_time,
    post_row,
    user_row,
    write_canonical,
)

pytestmark = pytest.mark.integration

MS = pd.Timedelta(milliseconds=1)
LOCAL = "Asia/Shanghai"
# local (UTC+8) midnights ending 2022-04-25, -26, -27
M25, M26, M27 = (pd.Timestamp(f"2022-04-{d}T16:00:00Z") for d in (25, 26, 27))
LT_PRE = ("user_lt_prelog_watches", "user_lt_prelog_long_view_rate", "user_lt_prelog_like_rate")
UT_PRE = ("ut_prelog_watches", "ut_prelog_long_views")
UA_PRE = ("ua_prelog_watches", "ua_prelog_long_views")


def local_date(ts: pd.Timestamp) -> int:
    return int(pd.Timestamp(ts).tz_convert(LOCAL).strftime("%Y%m%d"))


def ms(ts: pd.Timestamp) -> int:
    return int(pd.Timestamp(ts).value // 1_000_000)


def tagged_post(post: int, author: int, tag: int) -> dict:
    return post_row(post, author) | {"primary_tag": tag, "tags": "" if tag < 0 else str(tag)}


def sequence(user: int, last: pd.Timestamp, watch=(), long=(), like=()) -> dict:
    return {"user_id": user, "history_len": len(watch), "last_time_ms": ms(last),
            "watch_seq": list(watch), "long_watch_seq": list(long), "like_seq": list(like)}


def build(spark, state: StateDir, impressions: list[dict], users: list[dict], posts: list[dict],
          sequences: list[dict]) -> dict[str, pd.DataFrame]:
    """Write the canonical tables (+ prelog_events), run the feature jobs, read the new tables back."""
    write_canonical(state, impressions, users, posts)
    post_frame = pd.DataFrame(posts)[["post_id", "author_id", "primary_tag"]].astype("int64")
    prelog = prelog_events_table(pd.DataFrame(sequences) if sequences else None, post_frame)
    write_table(prelog, state.table("prelog_events"))
    build_offline_features(spark, state, priors=PRIORS, log=lambda _: None)
    out = {v.table: pd.read_parquet(state.table(v.table))
           for v in (USER_LONGTERM_VIEW, USER_TAG_VIEW, SOCIAL_VIEW)}
    imp = pd.read_parquet(state.table("impressions"))
    return out | {"impressions": imp, "prelog": pd.read_parquet(state.table("prelog_events")),
                  "posts": pd.read_parquet(state.table("posts")),
                  "users": pd.read_parquet(state.table("users"))}


def imp(user: int, post: int, ts: pd.Timestamp, **heads) -> dict:
    """An impression of a crafted post whose ``date`` is the local day of ``ts``."""
    author = CRAFTED_POSTS[post][0]
    return impression(user, post, author, ts, date=local_date(ts), **heads)


# post -> (author, primary tag)
CRAFTED_POSTS = {200: (950, 7), 201: (950, 8), 202: (951, -1), 203: (951, 7)}
I1 = pd.Timestamp("2022-04-25T03:00:00Z")         # 11:00 local, 04-25
I2 = M26 - pd.Timedelta(minutes=1)                 # 23:59 local, 04-26
I3 = M26 + pd.Timedelta(minutes=1)                 # 00:01 local, 04-27
L10 = pd.Timestamp("2022-04-20T12:00:00Z")         # user 10's history ends before the log
L11 = pd.Timestamp("2022-04-25T04:00:00Z")         # user 11's ends between two of its impressions
U11_A, U11_B = pd.Timestamp("2022-04-25T02:00:00Z"), pd.Timestamp("2022-04-25T06:00:00Z")
L12 = pd.Timestamp("2022-04-26T04:00:00Z")         # user 12's ends on its second active day
U12_A, U12_B = pd.Timestamp("2022-04-25T03:00:00Z"), pd.Timestamp("2022-04-26T08:00:00Z")
L14 = M25 - MS                                     # pre-log stamp == the snapshot at M25
L15 = BASE_ROW_TS - MS                             # pre-log stamp == the base row
L16 = pd.Timestamp("2022-03-01T00:00:00Z")         # pre-log stamp before the base row


@pytest.fixture(scope="module")
def crafted(spark, tmp_path_factory):
    state = StateDir(tmp_path_factory.mktemp("prelog_crafted")).ensure()
    impressions = [
        imp(10, 200, I1, click=1, long_view=1),
        imp(10, 201, I2, like=1),
        imp(10, 202, I3, click=1),                 # untagged post
        imp(11, 200, U11_A, click=1, long_view=1),
        imp(11, 203, U11_B),
        imp(12, 200, U12_A, click=1),
        imp(12, 203, U12_B),
        imp(13, 203, pd.Timestamp("2022-04-25T05:00:00Z")),  # not in users, no history
        imp(14, 201, pd.Timestamp("2022-04-25T05:00:00Z")),
    ]
    users = [user_row(u) for u in (10, 11, 12, 14, 15, 16, 17)]
    posts = [tagged_post(p, a, t) for p, (a, t) in CRAFTED_POSTS.items()]
    sequences = [
        sequence(10, L10, watch=[200, 201, 203, 999], long=[200, 203], like=[200]),  # 999: no post
        sequence(11, L11, watch=[200, 201], long=[200]),
        sequence(12, L12, watch=[201]),
        sequence(14, L14, watch=[200, 203], long=[203]),
        sequence(15, L15, watch=[203]),
        sequence(16, L16, watch=[200]),
    ]
    return build(spark, state, impressions, users, posts, sequences)


# ---------------- user_longterm_features ----------------

def test_longterm_snapshots_at_local_midnight_count_earlier_days_only(crafted):
    lt, p = crafted["user_longterm_features"], PRIORS
    stamps = sorted(lt.loc[lt.user_id == 10, "event_timestamp"])
    assert stamps == [BASE_ROW_TS, L10 + MS, M25, M26, M27]
    # during 04-26 (also at the 23:59 impression itself): only 04-25's impression
    for t in (M26 - MS, I2):
        row = point_in_time(lt, t, user_id=10)
        assert row["event_timestamp"] == M25 and row["user_lt_impressions"] == 1
    # at the midnight ending 04-26: the 23:59 impression is in, the 00:01 one (04-27) is not
    at_m26 = point_in_time(lt, M26, user_id=10)
    assert (at_m26["event_timestamp"], at_m26["user_lt_impressions"], at_m26["user_lt_active_days"]) == (M26, 2, 2)
    for t in (I3, I3 + MS, M27 - MS):
        assert point_in_time(lt, t, user_id=10)["user_lt_impressions"] == 2
    at_m27 = point_in_time(lt, M27, user_id=10)
    assert (at_m27["user_lt_impressions"], at_m27["user_lt_active_days"]) == (3, 3)
    # rates: (k + prior * 10) / (n + 10) over the earlier days' impressions
    assert at_m26["user_lt_click_rate"] == pytest.approx(smoothed_rate(1, 2, p.click))
    assert at_m26["user_lt_long_view_rate"] == pytest.approx(smoothed_rate(1, 2, p.long_view))
    assert at_m26["user_lt_like_rate"] == pytest.approx(smoothed_rate(1, 2, p.like))
    assert at_m26["user_lt_hate_rate"] == pytest.approx(smoothed_rate(0, 2, p.hate))
    assert at_m27["user_lt_click_rate"] == pytest.approx(smoothed_rate(2, 3, p.click))
    at_m25 = point_in_time(lt, M25, user_id=10)
    assert at_m25["user_lt_long_view_rate"] == pytest.approx(smoothed_rate(1, 1, p.long_view))
    assert at_m25["user_lt_like_rate"] == pytest.approx(smoothed_rate(0, 1, p.like))
    # a user outside the users table: no base row, first row at its first snapshot, no pre-log
    u13 = lt[lt.user_id == 13]
    assert u13["event_timestamp"].tolist() == [M25] and u13[list(LT_PRE)].isna().all().all()
    assert point_in_time(lt, M25 - MS, user_id=13) is None


def test_longterm_active_days_skip_days_without_impressions(crafted):
    lt = crafted["user_longterm_features"]
    # user 12: active 04-25 and 04-26
    assert point_in_time(lt, M26, user_id=12)["user_lt_active_days"] == 2
    assert point_in_time(lt, M27 + pd.Timedelta(days=5), user_id=12)["user_lt_active_days"] == 2
    assert point_in_time(lt, M26 - MS, user_id=14)["user_lt_active_days"] == 1


def test_longterm_prelog_row_is_known_from_last_time_plus_one_ms(crafted):
    lt, p = crafted["user_longterm_features"], PRIORS
    before = point_in_time(lt, L10, user_id=10)  # 1 ms before the pre-log stamp: the base row
    assert before["event_timestamp"] == BASE_ROW_TS
    assert before[list(LT_PRE)].isna().all() and before["user_lt_impressions"] == 0
    assert before["user_lt_click_rate"] == pytest.approx(p.click)
    pre = point_in_time(lt, L10 + MS, user_id=10)
    assert pre["event_timestamp"] == L10 + MS
    assert pre["user_lt_prelog_watches"] == 3  # 999 is not a post
    assert pre["user_lt_prelog_long_view_rate"] == pytest.approx(smoothed_rate(2, 3, p.long_view))
    assert pre["user_lt_prelog_like_rate"] == pytest.approx(smoothed_rate(1, 3, p.like))
    assert pre["user_lt_impressions"] == 0 and pre["user_lt_active_days"] == 0
    assert pre["user_lt_click_rate"] == pytest.approx(p.click)
    # later snapshots carry the pre-log features
    assert point_in_time(lt, M27, user_id=10)[list(LT_PRE)].tolist() == pytest.approx(pre[list(LT_PRE)].tolist())
    # user 12's history is known on 04-26 04:00: the snapshot at M25 has none, the one at M26 has it
    assert point_in_time(lt, M25, user_id=12)[list(LT_PRE)].isna().all()
    assert point_in_time(lt, L12 + MS, user_id=12)["user_lt_prelog_watches"] == 1
    assert point_in_time(lt, M26, user_id=12)["user_lt_prelog_watches"] == 1
    # no pre-log history at all: null everywhere
    assert lt.loc[lt.user_id.isin([13, 17]), list(LT_PRE)].isna().all().all()


def test_longterm_one_row_per_user_and_stamp_ties_keep_the_row_that_knows_more(crafted):
    lt, p = crafted["user_longterm_features"], PRIORS
    assert not lt.duplicated(["user_id", "event_timestamp"]).any()
    # user 14: pre-log stamp == snapshot stamp M25: the snapshot, with the pre-log features
    u14 = lt[lt.user_id == 14].sort_values("event_timestamp")
    assert u14["event_timestamp"].tolist() == [BASE_ROW_TS, M25]
    snap = u14.iloc[-1]
    assert (snap["user_lt_impressions"], snap["user_lt_prelog_watches"]) == (1, 2)
    assert snap["user_lt_prelog_long_view_rate"] == pytest.approx(smoothed_rate(1, 2, p.long_view))
    # user 15: pre-log stamp == base row stamp: one row, with the pre-log features
    u15 = lt[lt.user_id == 15]
    assert u15["event_timestamp"].tolist() == [BASE_ROW_TS]
    assert u15.iloc[0]["user_lt_prelog_watches"] == 1 and u15.iloc[0]["user_lt_impressions"] == 0


def test_longterm_prelog_row_keeps_the_earlier_days(crafted):
    lt, p = crafted["user_longterm_features"], PRIORS
    # user 12: one impression on 04-25 (clicked); history known 04-26 04:00 (after M25)
    row = point_in_time(lt, L12 + MS, user_id=12)
    assert row["user_lt_prelog_watches"] == 1
    assert (row["user_lt_impressions"], row["user_lt_active_days"]) == (1, 1)
    assert row["user_lt_click_rate"] == pytest.approx(smoothed_rate(1, 1, p.click))


def test_longterm_prelog_before_the_base_row_stays_visible(crafted):
    lt = crafted["user_longterm_features"]
    assert point_in_time(lt, L16 + MS, user_id=16)["user_lt_prelog_watches"] == 1
    assert point_in_time(lt, BASE_ROW_TS + pd.Timedelta(days=30), user_id=16)["user_lt_prelog_watches"] == 1


# ---------------- user_tag_features ----------------

def test_user_tag_counts_strictly_earlier_impressions_of_the_primary_tag(crafted):
    ut, p = crafted["user_tag_features"], PRIORS
    assert not ut.duplicated(["user_id", "tag_id", "event_timestamp"]).any()
    # user 10, tag 7 (post 200 at I1, clicked + long view)
    at_i1 = point_in_time(ut, I1, user_id=10, tag_id=7)
    assert at_i1["event_timestamp"] == L10 + MS and at_i1["ut_impressions"] == 0  # the pre-log base row
    assert at_i1["ut_click_rate"] == pytest.approx(p.click)
    after = point_in_time(ut, I1 + MS, user_id=10, tag_id=7)
    assert after["event_timestamp"] == I1 + MS and after["ut_impressions"] == 1
    assert after["ut_click_rate"] == pytest.approx(smoothed_rate(1, 1, p.click))
    assert after["ut_long_view_rate"] == pytest.approx(smoothed_rate(1, 1, p.long_view))
    assert after["ut_like_rate"] == pytest.approx(smoothed_rate(0, 1, p.like))
    # user 10, tag 8 (post 201 at I2, liked): not in tag 7's counts
    assert point_in_time(ut, I2, user_id=10, tag_id=8)["ut_impressions"] == 0
    t8 = point_in_time(ut, I2 + MS, user_id=10, tag_id=8)
    assert t8["ut_impressions"] == 1 and t8["ut_like_rate"] == pytest.approx(smoothed_rate(1, 1, p.like))
    assert point_in_time(ut, M27, user_id=10, tag_id=7)["ut_impressions"] == 1
    # user 13 (no history): no row before its impression
    assert point_in_time(ut, pd.Timestamp("2022-04-25T05:00:00Z"), user_id=13, tag_id=7) is None
    assert point_in_time(ut, pd.Timestamp("2022-04-25T05:00:00Z") + MS, user_id=13, tag_id=7)["ut_impressions"] == 1


def test_user_tag_untagged_posts_have_no_rows(crafted):
    ut = crafted["user_tag_features"]
    assert (ut["tag_id"] >= 0).all()
    # user 10's impression of the untagged post 202 at I3 makes no row
    assert not (ut.event_timestamp == I3 + MS).any()
    assert set(ut.loc[ut.user_id == 10, "tag_id"]) == {7, 8}


def test_user_tag_prelog_known_only_from_the_prelog_stamp(crafted):
    ut, p = crafted["user_tag_features"], PRIORS
    # pre-log base rows of user 10 at L10 + 1 ms: watches / long views of tags 7 (200, 203) and 8 (201)
    base = ut[(ut.user_id == 10) & (ut.event_timestamp == L10 + MS)].set_index("tag_id")
    assert sorted(base.index) == [7, 8]
    assert base.loc[7, list(UT_PRE)].tolist() == [2, 2] and base.loc[8, list(UT_PRE)].tolist() == [1, 0]
    assert (base["ut_impressions"] == 0).all() and base["ut_click_rate"].tolist() == pytest.approx([p.click] * 2)
    assert point_in_time(ut, L10, user_id=10, tag_id=7) is None
    assert point_in_time(ut, I1 + MS, user_id=10, tag_id=7)[list(UT_PRE)].tolist() == [2, 2]
    # user 11: a log impression (02:00) before the history's end (04:00): its row has no pre-log values
    early = point_in_time(ut, U11_A + MS, user_id=11, tag_id=7)
    assert early["event_timestamp"] == U11_A + MS and early["ut_impressions"] == 1
    assert early[list(UT_PRE)].isna().all()
    assert point_in_time(ut, L11, user_id=11, tag_id=7)[list(UT_PRE)].isna().all()
    late = point_in_time(ut, U11_B + MS, user_id=11, tag_id=7)
    assert late["ut_impressions"] == 2 and late[list(UT_PRE)].tolist() == [1, 1]
    assert late["ut_click_rate"] == pytest.approx(smoothed_rate(1, 2, p.click))
    t8 = point_in_time(ut, L11 + MS, user_id=11, tag_id=8)
    assert t8["event_timestamp"] == L11 + MS and t8[list(UT_PRE)].tolist() == [1, 0]
    assert point_in_time(ut, L11, user_id=11, tag_id=8) is None


def test_user_tag_prelog_base_row_keeps_the_earlier_log_counts(crafted):
    ut, p = crafted["user_tag_features"], PRIORS
    # user 11 saw a tag-7 post at 02:00 (clicked); its history is known at 04:00 + 1 ms
    row = point_in_time(ut, L11 + MS, user_id=11, tag_id=7)
    assert row[list(UT_PRE)].tolist() == [1, 1]
    assert row["ut_impressions"] == 1
    assert row["ut_click_rate"] == pytest.approx(smoothed_rate(1, 1, p.click))


def test_prelog_counts_are_null_for_a_pair_outside_a_known_history(crafted):
    # documented: a pair outside the user's history has no pre-log counts (null, as for a pair
    # never seen at all: serving has no row for it either), not 0
    ut, sf = crafted["user_tag_features"], crafted["social_features"]
    # user 12's history (post 201: tag 8, author 950) is known from L12 + 1 ms; at U12_B it sees
    # post 203 (tag 7, author 951)
    assert point_in_time(ut, U12_B + MS, user_id=12, tag_id=7)[list(UT_PRE)].isna().all()
    assert point_in_time(sf, U12_B + MS, user_id=12, author_id=951)[list(UA_PRE)].isna().all()


# ---------------- social_features: new columns ----------------

def test_social_long_views_and_prelog_columns(crafted):
    sf, pe = crafted["social_features"], PRIORS.engaged
    assert not sf.duplicated(["user_id", "author_id", "event_timestamp"]).any()
    # user 10 x author 950: history has posts 200, 201 watched and 200 long-viewed
    assert point_in_time(sf, L10, user_id=10, author_id=950) is None
    base = point_in_time(sf, I1, user_id=10, author_id=950)
    assert base["event_timestamp"] == L10 + MS and base[list(UA_PRE)].tolist() == [2, 1]
    assert (base["ua_impressions"], base["ua_long_views"], base["ua_clicks"], base["ua_follows"]) == (0, 0, 0, 0)
    assert base["ua_engagement_rate"] == pytest.approx(pe)
    first = point_in_time(sf, I1 + MS, user_id=10, author_id=950)
    assert (first["ua_impressions"], first["ua_long_views"], first["ua_clicks"]) == (1, 1, 1)
    assert first["ua_engagements"] == pytest.approx(ENGAGEMENT_EDGE_WEIGHTS["click"] + ENGAGEMENT_EDGE_WEIGHTS["long_view"])
    assert first[list(UA_PRE)].tolist() == [2, 1]
    assert point_in_time(sf, I2, user_id=10, author_id=950)["ua_long_views"] == 1
    second = point_in_time(sf, I2 + MS, user_id=10, author_id=950)
    assert (second["ua_impressions"], second["ua_long_views"]) == (2, 1)
    assert second["ua_engagement_rate"] == pytest.approx(smoothed_rate(2, 2, pe))
    # author 951 (posts 202 untagged, 203): social rows count untagged posts too
    assert point_in_time(sf, I3, user_id=10, author_id=951)[list(UA_PRE)].tolist() == [1, 1]
    a951 = point_in_time(sf, I3 + MS, user_id=10, author_id=951)
    assert (a951["ua_impressions"], a951["ua_long_views"]) == (1, 0) and a951[list(UA_PRE)].tolist() == [1, 1]
    # user 11: the 02:00 impression's row is before the history is known
    early = point_in_time(sf, U11_A + MS, user_id=11, author_id=950)
    assert (early["ua_impressions"], early["ua_long_views"]) == (1, 1) and early[list(UA_PRE)].isna().all()
    assert point_in_time(sf, L11, user_id=11, author_id=950)[list(UA_PRE)].isna().all()
    assert point_in_time(sf, L11 + MS, user_id=11, author_id=950)[list(UA_PRE)].tolist() == [2, 1]
    # no history: null
    assert sf.loc[sf.user_id == 13, list(UA_PRE)].isna().all().all()


def test_social_prelog_base_row_keeps_the_earlier_log_counts(crafted):
    sf = crafted["social_features"]
    row = point_in_time(sf, L11 + MS, user_id=11, author_id=950)
    assert row[list(UA_PRE)].tolist() == [2, 1]
    assert (row["ua_impressions"], row["ua_long_views"], row["ua_clicks"]) == (1, 1, 1)


# ---------------- (b) leakage: recompute every row from strictly earlier events ----------------

LOG_START = pd.Timestamp("2022-04-24T16:00:00Z")  # local midnight starting 2022-04-25
N_POSTS, N_IMPRESSIONS = 24, 300


def random_world(seed: int, inside: bool):
    """A random log of 6 users over 4 local days, 24 posts (some untagged), 5 users' histories.

    inside=False: every history ends before the log; inside=True: users 1-3's histories end inside
    the log (one mid-log, one exactly at one of the user's impressions, one 1 ms before a local
    midnight).
    """
    rng = np.random.default_rng(seed)
    tags = rng.choice([-1, 1, 2, 3], size=N_POSTS, p=[0.2, 0.3, 0.3, 0.2])
    posts = [tagged_post(300 + i, 960 + i % 5, int(tags[i])) for i in range(N_POSTS)]
    authors = {p["post_id"]: p["author_id"] for p in posts}
    offsets = np.sort(rng.integers(0, 4 * 86_400_000, size=N_IMPRESSIONS))
    rows = []
    for j, off in enumerate(offsets):
        user = int(rng.integers(1, 7))
        ts = LOG_START + pd.Timedelta(milliseconds=int(off))
        if j % 10 == 9:  # every tenth impression shares the previous one's user and millisecond
            user, ts = rows[-1]["user_id"], rows[-1]["event_ts"]
        post = int(rng.integers(300, 300 + N_POSTS))
        heads = {h: int(rng.random() < q) for h, q in
                 (("click", 0.4), ("long_view", 0.3), ("like", 0.1), ("follow", 0.05), ("comment", 0.03),
                  ("forward", 0.02), ("hate", 0.02))}
        rows.append(impression(user, post, authors[post], ts, date=local_date(ts), **heads))
    users = [user_row(u) for u in range(1, 6)]  # user 6 has impressions but no profile
    sequences = []
    for u in range(1, 6):
        watch = [int(v) for v in rng.integers(300, 300 + N_POSTS + 3, size=int(rng.integers(0, 15)))]
        long = [v for v in watch if rng.random() < 0.5]
        like = [v for v in watch if rng.random() < 0.2]
        last = LOG_START - pd.Timedelta(hours=int(rng.integers(1, 200)))
        sequences.append(sequence(u, last, watch=watch + [999], long=long, like=like))
    if inside:
        own = [r["event_ts"] for r in rows if r["user_id"] == 2]
        sequences[0]["last_time_ms"] = ms(LOG_START + pd.Timedelta(hours=31))
        sequences[1]["last_time_ms"] = ms(own[len(own) // 2])
        sequences[2]["last_time_ms"] = ms(LOG_START + pd.Timedelta(days=2) - MS)
    return rows, users, posts, sequences


def local_midnight_start(ts: pd.Timestamp) -> pd.Timestamp:
    return ts.tz_convert(LOCAL).normalize().tz_convert("UTC")


class Recompute:
    """Feature values at a time from the canonical tables, directly in pandas."""

    def __init__(self, world: dict):
        imp = world["impressions"].copy()
        tag = world["posts"].set_index("post_id")["primary_tag"]
        imp["tag_id"] = imp["post_id"].map(tag)
        imp["engaged"] = np.zeros(len(imp), dtype=bool)
        for h in POSITIVE_HEADS:
            imp["engaged"] |= imp[h] > 0
        imp["weight"] = sum(np.where(imp[h] > 0, ENGAGEMENT_EDGE_WEIGHTS[h], 0.0) for h in POSITIVE_HEADS)
        self.imp, self.pre = imp, world["prelog"]

    def _prelog(self, t, **keys):
        rows = self.pre[self.pre["event_ts"] <= t]
        for k, v in keys.items():
            rows = rows[rows[k] == v]
        if rows.empty:
            return None
        return {kind: int((rows["kind"] == kind).sum()) for kind in ("watch", "long_view", "like")}

    def _events(self, t, **keys):
        rows = self.imp[self.imp["event_ts"] < t]
        for k, v in keys.items():
            rows = rows[rows[k] == v]
        return rows

    def longterm(self, user, t) -> dict:
        p = PRIORS
        ev = self._events(t, user_id=user)
        n = len(ev)
        out = {"user_lt_impressions": n, "user_lt_active_days": ev["date"].nunique(),
               **{f"user_lt_{h}_rate": smoothed_rate((ev[h] > 0).sum(), n, p.head(h)) for h in HEADS}}
        pre = self._prelog(t, user_id=user)
        out |= dict.fromkeys(LT_PRE, np.nan) if pre is None else {
            "user_lt_prelog_watches": pre["watch"],
            "user_lt_prelog_long_view_rate": min(1.0, smoothed_rate(pre["long_view"], pre["watch"], p.long_view)),
            "user_lt_prelog_like_rate": min(1.0, smoothed_rate(pre["like"], pre["watch"], p.like)),
        }
        return out

    def longterm_as_served(self, user, t) -> dict:
        """What the view holds at t: log counts as of the local midnight starting t's day (daily
        snapshots), the pre-log history as soon as it is known."""
        daily = self.longterm(user, local_midnight_start(t))
        now = self.longterm(user, t)
        return {c: (now[c] if c in LT_PRE else v) for c, v in daily.items()}

    def user_tag(self, user, tag, t) -> dict:
        ev = self._events(t, user_id=user, tag_id=tag)
        n = len(ev)
        out = {"ut_impressions": n, **{f"ut_{h}_rate": smoothed_rate((ev[h] > 0).sum(), n, PRIORS.head(h))
                                       for h in ("click", "long_view", "like")}}
        pre = self._prelog(t, user_id=user, tag_id=tag)
        return out | ({c: np.nan for c in UT_PRE} if pre is None else
                      {"ut_prelog_watches": pre["watch"], "ut_prelog_long_views": pre["long_view"]})

    def social(self, user, author, t) -> dict:
        ev = self._events(t, user_id=user, author_id=author)
        n = len(ev)
        out = {"ua_impressions": n, "ua_engagements": ev["weight"].sum(), "ua_clicks": (ev["click"] > 0).sum(),
               "ua_follows": int((ev["follow"] > 0).any()), "ua_long_views": (ev["long_view"] > 0).sum(),
               "ua_engagement_rate": smoothed_rate(ev["engaged"].sum(), n, PRIORS.engaged)}
        pre = self._prelog(t, user_id=user, author_id=author)
        return out | ({c: np.nan for c in UA_PRE} if pre is None else
                      {"ua_prelog_watches": pre["watch"], "ua_prelog_long_views": pre["long_view"]})


def assert_row_matches(row: pd.Series, expected: dict, what: str):
    """Every expected feature equals the row's (null where null is expected)."""
    for col, want in expected.items():
        got = row[col]
        if pd.isna(want):
            assert pd.isna(got), f"{what}: {col} = {got}, expected null"
        else:
            assert got == pytest.approx(want), f"{what}: {col} = {got}, expected {want}"


@pytest.fixture(scope="module", params=[False, True], ids=["history-before-log", "history-inside-log"])
def random_world_tables(request, spark, tmp_path_factory):
    state = StateDir(tmp_path_factory.mktemp("prelog_random")).ensure()
    rows, users, posts, sequences = random_world(seed=11, inside=request.param)
    world = build(spark, state, rows, users, posts, sequences)
    return {"inside": request.param, **world}


def _prelog_stamps(world, keys):
    pre = world["prelog"]
    if "tag_id" in keys:
        pre = pre[pre["tag_id"] >= 0]
    return {k if len(keys) > 1 else (k,): ts for k, ts in pre.groupby(list(keys) if len(keys) > 1 else keys[0])["event_ts"].max().items()}


def test_no_new_feature_row_uses_an_event_at_or_after_its_stamp(random_world_tables):
    """Every row of each new table equals the recomputation from events before its stamp.

    Histories ending before the log and inside it alike: the pre-log row of a key carries the
    key's log counts from before it.
    """
    world, rc = random_world_tables, Recompute(random_world_tables)
    checks = (
        ("user_longterm_features", ("user_id",), rc.longterm_as_served, LT_PRE),
        ("user_tag_features", ("user_id", "tag_id"), rc.user_tag, UT_PRE),
        ("social_features", ("user_id", "author_id"), rc.social, UA_PRE),
    )
    for table, keys, expected_at, prelog_cols in checks:
        frame = world[table]
        assert len(frame) > 0 and not frame.duplicated([*keys, "event_timestamp"]).any(), table
        for _, row in frame.iterrows():
            key = tuple(int(row[k]) for k in keys)
            t = row["event_timestamp"]
            assert_row_matches(row, expected_at(*key, t), f"{table} {key} @ {t}")


def test_new_tables_have_exactly_the_expected_rows(random_world_tables):
    world = random_world_tables
    imp, posts = world["impressions"], world["posts"]
    tag = posts.set_index("post_id")["primary_tag"]
    # user_longterm: base rows (users table), pre-log stamps, local midnights after active days
    lt = world["user_longterm_features"]
    expected = {(int(u), BASE_ROW_TS) for u in world["users"]["user_id"]}
    expected |= {(k[0], ts) for k, ts in _prelog_stamps(world, ("user_id",)).items()}
    ends = imp["event_ts"].map(lambda t: local_midnight_start(t) + pd.Timedelta(days=1))
    assert (imp["date"] == imp["event_ts"].map(local_date)).all()
    expected |= set(zip(imp["user_id"].astype(int), ends))
    assert set(zip(lt["user_id"].astype(int), lt["event_timestamp"])) == expected
    # user_tag: (user, tag >= 0, e + 1 ms) and the pre-log stamps of the pairs with history
    ut = world["user_tag_features"]
    tagged = imp.assign(tag_id=imp["post_id"].map(tag)).query("tag_id >= 0")
    expected = set(zip(tagged["user_id"].astype(int), tagged["tag_id"].astype(int), tagged["event_ts"] + MS))
    expected |= {(*k, ts) for k, ts in _prelog_stamps(world, ("user_id", "tag_id")).items()}
    assert set(zip(ut["user_id"].astype(int), ut["tag_id"].astype(int), ut["event_timestamp"])) == expected
    # social: (user, author, e + 1 ms) and the pre-log stamps
    sf = world["social_features"]
    expected = set(zip(imp["user_id"].astype(int), imp["author_id"].astype(int), imp["event_ts"] + MS))
    expected |= {(*k, ts) for k, ts in _prelog_stamps(world, ("user_id", "author_id")).items()}
    assert set(zip(sf["user_id"].astype(int), sf["author_id"].astype(int), sf["event_timestamp"])) == expected


def test_point_in_time_lookups_at_each_impression_see_only_the_past(random_world_tables):
    """As served: at each impression's time t, the joined values equal the recomputation before t
    (user_longterm: before the local midnight starting t's day)."""
    world, rc = random_world_tables, Recompute(random_world_tables)
    tag = world["posts"].set_index("post_id")["primary_tag"]
    lt, ut, sf = world["user_longterm_features"], world["user_tag_features"], world["social_features"]
    for _, q in world["impressions"].iterrows():
        u, a, t, g = int(q["user_id"]), int(q["author_id"]), q["event_ts"], int(tag[q["post_id"]])
        row = point_in_time(lt, t, user_id=u)
        if row is not None:
            assert_row_matches(row, rc.longterm_as_served(u, t), f"longterm {u} @ {t}")
        else:
            assert rc.longterm(u, local_midnight_start(t))["user_lt_impressions"] == 0
        for frame, keys, fn, n_col in ((ut, {"user_id": u, "tag_id": g}, rc.user_tag, "ut_impressions"),
                                       (sf, {"user_id": u, "author_id": a}, rc.social, "ua_impressions")):
            if "tag_id" in keys and g < 0:
                continue
            want = fn(*keys.values(), t)
            row = point_in_time(frame, t, **keys)
            if row is None:
                assert want[n_col] == 0 and all(pd.isna(want[c]) for c in (*UT_PRE, *UA_PRE) if c in want)
            else:
                assert_row_matches(row, want, f"{keys} @ {t}")

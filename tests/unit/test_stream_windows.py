"""Pure helpers of the real-time features: bucket math, window sums, decay vs the closed form."""

import math
import random

import pytest

from core import realtime as rt


def test_bucket_start_floors_to_five_minutes_also_for_negative_times():
    assert rt.bucket_start(600.0) == 600
    assert rt.bucket_start(899.999) == 600
    assert rt.bucket_start(-1.0) == -300
    with pytest.raises(ValueError, match="bucket_s"):
        rt.bucket_start(1.0, bucket_s=0)


def test_window_buckets_are_aligned_and_end_at_now_bucket():
    now = 3600 * 10 + 123.0
    assert rt.window_buckets(now, 300) == (36000, 36000)
    lo, hi = rt.window_buckets(now, 3600)
    assert hi == 36000 and (hi - lo) // 300 + 1 == 12
    with pytest.raises(ValueError, match="multiple"):
        rt.window_buckets(now, 450)


def test_window_at_a_bucket_boundary_is_the_batch_window_before_it():
    # At H:00 the 1 h window is [H-1h, H): the bucket starting at H is not in it (batch rule).
    h = 3600 * 10
    assert rt.window_buckets(h, 3600) == (h - 3600, h - 300)
    counts = {f"click:{h}": 5, f"click:{h - 300}": 2, f"click:{h - 3600}": 1, f"click:{h - 3900}": 7}
    assert rt.sum_window_counts(counts, h)["rt_clicks_1h"] == 3
    assert rt.sum_window_counts(counts, h + 0.001)["rt_clicks_1h"] == 7  # now in bucket h: [h-55m, h+5m)


def test_sum_window_counts_against_brute_force():
    rng = random.Random(3)
    now = 1_651_406_400 + 177.0
    events = [(rng.choice(["click", "impression", "like"]), now - rng.uniform(-600, 100_000)) for _ in range(400)]
    counts: dict[str, float] = {}
    for kind, ts in events:
        f = f"{kind}:{rt.bucket_start(ts)}"
        counts[f] = counts.get(f, 0) + 1
    got = rt.sum_window_counts(counts, now)
    now_b = math.floor(now / 300)
    for kind in ("click", "impression", "like", "comment"):
        for w, secs in rt.WINDOWS_S.items():
            n = secs // 300
            want = sum(1 for k, ts in events if k == kind and now_b - n < math.floor(ts / 300) <= now_b)
            assert got[rt.feature_name(kind, w)] == want
    assert got["rt_clicks_24h"] > got["rt_clicks_1h"] >= got["rt_clicks_5m"]
    with pytest.raises(ValueError, match="kind:bucket_start"):
        rt.sum_window_counts({"nocolon": 1}, now)


def test_decayed_add_matches_closed_form_in_any_order():
    rng = random.Random(7)
    events = [(rng.choice([1.0, 3.0, 4.0, 5.0]), 1_000_000 + rng.uniform(0, 3 * 86400)) for _ in range(200)]
    closed_t = max(t for _, t in events)
    closed = sum(w * 2 ** (-(closed_t - t) / rt.HALF_LIFE_S) for w, t in events)
    for order in (events, sorted(events, key=lambda e: e[1]), list(reversed(events))):
        v, t = 0.0, order[0][1]
        first = True
        for w, ts in order:
            v, t = (w, ts) if first else rt.decayed_add(v, t, w, ts)
            first = False
        assert t == closed_t
        assert v == pytest.approx(closed, rel=1e-12)
    # one half-life halves the score
    assert rt.decay(8.0, 0.0, rt.HALF_LIFE_S) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="half_life"):
        rt.decay(1.0, 0, 1, half_life_s=0)


def test_kind_weights_follow_schema_and_reject_unknown_kinds():
    assert rt.kind_weight("like") == 3.0
    assert rt.kind_weight("impression") == 0.0 and rt.kind_weight("hate") == 0.0
    with pytest.raises(ValueError, match="unknown kind"):
        rt.kind_weight("retweet")

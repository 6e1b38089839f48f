"""The promotion gate's comparison logic on crafted scores (no registry)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from models.promotion import MIN_GATING_POSITIVES, compare_head_scores, head_scores

N_REQUESTS = 100  # two rows per request: one positive and one negative for every head but `rare`


def _frame(rare_positives: int = 10) -> pd.DataFrame:
    """200 rows in 100 requests; every head has 100 positives except ``hate`` (``rare_positives``)."""
    n = 2 * N_REQUESTS
    df = pd.DataFrame({"request_id": np.repeat(np.arange(N_REQUESTS), 2), "date": 20220503})
    for h in HEADS:
        df[h] = np.tile([1, 0], N_REQUESTS)
    df["hate"] = 0
    df.loc[np.arange(rare_positives) * 2, "hate"] = 1  # positive rows of the first requests
    assert len(df) == n
    return df


def _scores(df: pd.DataFrame, flip: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Perfect scores (positive above negative in every request), reversed in a share of requests."""
    out = {}
    for h in HEADS:
        p = df[h].to_numpy(dtype=np.float64) * 0.5 + 0.25
        share = (flip or {}).get(h, 0.0)
        k = int(round(share * N_REQUESTS))
        for r in range(k):  # reverse the order in request r
            i, j = 2 * r, 2 * r + 1
            p[i], p[j] = p[j], p[i]
        out[h] = p
    return out


def test_worse_on_a_gating_head_fails_and_names_it():
    df = _frame()
    check = compare_head_scores(df, _scores(df), _scores(df, {"click": 0.2}), name="light_ranker",
                                champion_version=1, challenger_version=2)
    assert not check.passed
    assert [h.head for h in check.blocking_heads] == ["click"]
    click = next(h for h in check.heads if h.head == "click")
    assert (click.positives, click.gating, click.worse) == (100, True, True)
    assert click.champion_gauc == pytest.approx(1.0) and click.challenger_gauc == pytest.approx(0.8)
    assert "click (0.8000 < champion 1.0000)" in check.describe(check.blocking_heads)
    table = check.to_table()
    assert "champion v1" in table and "challenger v2" in table and "refused (worse on click)" in table
    assert check.days == (20220503,) and check.rows == 200 and check.requests == 100


def test_worse_only_on_a_head_below_the_threshold_passes():
    df = _frame(rare_positives=10)
    check = compare_head_scores(df, _scores(df), _scores(df, {"hate": 0.05}))
    hate = next(h for h in check.heads if h.head == "hate")
    assert hate.positives == 10 < MIN_GATING_POSITIVES
    assert hate.worse and not hate.gating and hate.challenger_gauc < hate.champion_gauc
    assert check.passed and check.worse_heads == (hate,) and check.blocking_heads == ()
    assert "result: passed" in check.to_table()


def test_ties_and_better_pass_and_threshold_is_inclusive():
    df = _frame(rare_positives=MIN_GATING_POSITIVES)
    champion = _scores(df, {"click": 0.3})
    assert compare_head_scores(df, champion, champion).passed  # identical scores: a tie
    tied = compare_head_scores(df, champion, {h: s * 0.5 for h, s in champion.items()})  # same order
    assert tied.passed and not tied.worse_heads
    better = compare_head_scores(df, champion, _scores(df))
    assert better.passed and not better.worse_heads
    hate_gates = compare_head_scores(df, _scores(df), _scores(df, {"hate": 0.05}))
    assert next(h for h in hate_gates.heads if h.head == "hate").gating  # exactly 100 positives gate
    assert not hate_gates.passed


def test_undefined_gauc_is_never_worse():
    df = _frame()
    df["forward"] = 0  # no request with both classes: GAUC is NaN for both versions
    check = compare_head_scores(df, _scores(df), _scores(df, {"forward": 1.0}))
    fwd = next(h for h in check.heads if h.head == "forward")
    assert np.isnan(fwd.champion_gauc) and not fwd.worse and check.passed


def test_head_scores_light_ranks_every_head_heavy_its_own():
    light = head_scores("light", ("engaged",), np.arange(3, dtype=np.float32)[:, None])
    assert set(light) == set(HEADS) and all((v == [0, 1, 2]).all() for v in light.values())
    heads = tuple(reversed(HEADS))
    heavy = head_scores("heavy", heads, np.tile(np.arange(len(heads), dtype=np.float32), (2, 1)))
    assert all((heavy[h] == heads.index(h)).all() for h in HEADS)
    with pytest.raises(ValueError, match="do not match"):
        head_scores("heavy", heads, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="does not predict head"):
        head_scores("heavy", ("click",), np.zeros((2, 1)))


def test_malformed_input_is_a_clear_error():
    df = _frame()
    with pytest.raises(KeyError, match="request_id"):
        compare_head_scores(df.drop(columns="request_id"), _scores(df), _scores(df))
    with pytest.raises(ValueError, match="empty"):
        compare_head_scores(df.head(0), _scores(df), _scores(df))
    with pytest.raises(KeyError, match="challenger scores for head 'like'"):
        compare_head_scores(df, _scores(df), {h: s for h, s in _scores(df).items() if h != "like"})

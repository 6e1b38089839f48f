"""Pieces of models.evaluate that need no registry: gains, orderings, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from models.evaluate import (
    EXAMPLE_WEIGHTS,
    ORDERINGS,
    SCORERS,
    EvaluationReport,
    _order_score,
    evaluate_scores,
    impression_gain,
)


def _labels(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{h: r.get(h, 0) for h in HEADS} for r in rows])


def test_gain_sums_positive_weights_and_ignores_hate():
    frame = _labels([{"click": 1, "like": 1}, {"hate": 1}, {"click": 1, "hate": 1}, {}])
    np.testing.assert_array_equal(impression_gain(frame, EXAMPLE_WEIGHTS), [5.0, 0.0, 1.0, 0.0])


def test_unknown_weight_head_is_rejected():
    with pytest.raises(ValueError, match="retweet"):
        impression_gain(_labels([{}]), {"retweet": 1.0})


def test_order_score_sorts_by_primary_then_secondary_with_missing_last():
    created = np.array([100.0, 200.0, np.nan, 200.0])
    event = np.array([1.0, 2.0, 3.0, 5.0])
    score = _order_score(created, event)
    ranking = list(np.argsort(-score, kind="stable"))
    # newest post first; the two posts created at 200 by later impression first; unknown age last
    assert ranking == [3, 1, 0, 2]


def _report() -> EvaluationReport:
    metrics = {h: {"auc": 0.7, "request_gauc": float("nan") if h == "hate" else 0.55,
                   "request_gauc_ci": [0.5, 0.6], "user_gauc": 0.56} for h in HEADS}
    return EvaluationReport(
        head_metrics={s: metrics for s in SCORERS},
        groups={h: {"requests": 12, "users": 9} for h in HEADS},
        ndcg={name: 0.5 + i / 10 for i, name in enumerate(ORDERINGS)},
        k=10, weights={h: float(EXAMPLE_WEIGHTS[h]) for h in HEADS}, rows=100, users=10, requests=30,
        requests_with_gain=8, positives={h: 3 for h in HEADS},
        models={"light": "light_ranker v1", "heavy": "heavy_ranker v2"}, request_gap_s=1800.0,
    )


def test_report_table_lists_every_head_scorer_and_ordering():
    table = _report().to_table()
    for word in (*HEADS, *SCORERS, *ORDERINGS, "NDCG@10", "heavy_ranker v2", "hate=-20", "req GAUC",
                 "user GAUC", "[0.5000, 0.6000]", "gap 30 min"):
        assert word in table
    assert "n/a" in table  # NaN is rendered readably


def test_report_json_round_trips_with_nan_as_null(tmp_path):
    path = _report().to_json(tmp_path / "sub" / "report.json")
    data = json.loads(path.read_text())
    assert data["ndcg"]["popularity"] == pytest.approx(0.8)
    assert data["head_metrics"]["heavy"]["hate"]["request_gauc"] is None
    assert data["head_metrics"]["light"]["click"]["request_gauc_ci"] == [0.5, 0.6]
    assert not any(isinstance(v, float) and math.isnan(v) for v in data["ndcg"].values())


def _served_rows(n_requests: int, rng) -> pd.DataFrame:
    """Requests of 4 impressions, one user each, click labels, every column evaluation reads."""
    rows = []
    for r in range(n_requests):
        for i in range(4):
            rows.append({"user_id": r // 2, "request_id": r, "post_id": 100 * r + i,
                         "event_timestamp": pd.Timestamp("2022-05-03", tz="UTC") + pd.Timedelta(minutes=r * 60 + i),
                         "post_created_ts": 1_600_000_000 + i, **{h: 0 for h in HEADS}})
    df = pd.DataFrame(rows)
    df["click"] = rng.integers(0, 2, len(df))
    for h in HEADS:
        df[f"post_{h}_rate_total"] = 0.1
    return df


def test_scores_rank_inside_requests_popularity_is_a_scorer():
    rng = np.random.default_rng(0)
    df = _served_rows(200, rng)
    df["post_click_rate_total"] = df["click"] * 0.5 + 0.1  # a popularity lookup that knows the clicks
    heavy = np.tile(rng.random((len(df), 1)), (1, len(HEADS)))  # uninformative
    report = evaluate_scores(df, heavy[:, 0].copy(), heavy, HEADS, EXAMPLE_WEIGHTS, n_boot=50)
    pop, hv = report.head_metrics["popularity"]["click"], report.head_metrics["heavy"]["click"]
    assert pop["request_gauc"] == pytest.approx(1.0) and pop["request_gauc_ci"][0] == pytest.approx(1.0)
    assert 0.35 < hv["request_gauc"] < 0.65 and hv["request_gauc_ci"][0] < hv["request_gauc"] < hv["request_gauc_ci"][1]
    assert report.groups["click"]["requests"] <= report.requests == 200
    assert report.groups["like"] == {"requests": 0, "users": 0}
    assert report.ndcg["popularity"] == pytest.approx(1.0)


def test_missing_request_ids_are_refused_with_the_way_to_build_them():
    df = _served_rows(3, np.random.default_rng(1)).drop(columns="request_id")
    p = np.zeros(len(df))
    with pytest.raises(KeyError, match="served_feature_rows"):
        evaluate_scores(df, p, np.zeros((len(df), len(HEADS))), HEADS, EXAMPLE_WEIGHTS)

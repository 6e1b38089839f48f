"""Pieces of models.evaluate that need no registry: gains, orderings, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from models.evaluate import EXAMPLE_WEIGHTS, ORDERINGS, EvaluationReport, _order_score, impression_gain


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
    metrics = {h: {"auc": 0.7, "gauc": float("nan") if h == "hate" else 0.55} for h in HEADS}
    return EvaluationReport(
        head_metrics={"light": metrics, "heavy": metrics},
        ndcg={name: 0.5 + i / 10 for i, name in enumerate(ORDERINGS)},
        k=10, weights={h: float(EXAMPLE_WEIGHTS[h]) for h in HEADS}, rows=100, users=10,
        users_with_gain=8, positives={h: 3 for h in HEADS},
        models={"light": "light_ranker v1", "heavy": "heavy_ranker v2"},
    )


def test_report_table_lists_every_head_and_ordering():
    table = _report().to_table()
    for word in (*HEADS, *ORDERINGS, "NDCG@10", "heavy_ranker v2", "hate=-20"):
        assert word in table
    assert "n/a" in table  # NaN is rendered readably


def test_report_json_round_trips_with_nan_as_null(tmp_path):
    path = _report().to_json(tmp_path / "sub" / "report.json")
    data = json.loads(path.read_text())
    assert data["ndcg"]["popularity"] == pytest.approx(0.8)
    assert data["head_metrics"]["heavy"]["hate"]["gauc"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in data["ndcg"].values())

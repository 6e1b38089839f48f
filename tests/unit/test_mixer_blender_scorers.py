"""Light/heavy scorers on a fake ranker handle, and the weighted-sum blender."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from core.schema import ALL_FEATURES, HEADS
from mixer.blenders import WeightedSumBlender
from mixer.candidate import Candidate, Query
from mixer.scorers import HeavyRankerScorer, LightRankerScorer


@dataclass
class FakeHandle:
    """Predicts column j = feature value * (j + 1) / 10 (deterministic, checkable)."""

    feature_names: tuple
    heads: tuple
    version: str = "3"
    bad_shape: bool = False

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        x = frame[self.feature_names[0]].to_numpy()
        out = np.stack([x * (j + 1) / 10 for j in range(len(self.heads))], axis=1).astype(np.float32)
        return out[:, :1] if self.bad_shape else out


Q = Query(1, 1, 0.0, "r", arm="a")


def _frame(values):
    f = pd.DataFrame(np.nan, index=range(len(values)), columns=list(ALL_FEATURES))
    f["user_click_rate"] = values
    return f


def test_light_scorer_uses_named_head_and_reports_version():
    h = FakeHandle(("user_click_rate",), ("engaged", "other"))
    cands = [Candidate(i, "popular") for i in range(3)]
    scorer = LightRankerScorer(h, head="other")
    assert scorer.score(Q, cands, _frame([1.0, 2.0, 3.0])) == "in_process"
    assert [c.light_score for c in cands] == pytest.approx([0.2, 0.4, 0.6])
    assert scorer.version == "3"
    with pytest.raises(ValueError, match="not 'nope'"):
        LightRankerScorer(h, head="nope")


def test_heavy_scorer_sets_heads_and_checks_shape_and_features():
    cands = [Candidate(i, "popular") for i in range(2)]
    assert HeavyRankerScorer(FakeHandle(("user_click_rate",), HEADS)).score(Q, cands, _frame([1.0, 5.0])) == "in_process"
    assert list(cands[1].heads) == list(HEADS)
    assert cands[1].heads["long_view"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        HeavyRankerScorer(FakeHandle(("user_click_rate",), HEADS, bad_shape=True)).score(Q, cands, _frame([1.0, 5.0]))
    with pytest.raises(ValueError, match="does not hydrate"):
        HeavyRankerScorer(FakeHandle(("made_up_feature",), HEADS))


def test_weighted_sum_uses_the_query_arm():
    blender = WeightedSumBlender({"a": {"click": 1.0, "hate": -10.0}, "b": {"like": 2.0}}, HEADS)
    c = Candidate(1, "popular", heads={"click": 0.5, "like": 0.25, "hate": 0.01})
    blender.blend(Query(1, 1, 0.0, "r", arm="a"), [c])
    assert c.score == pytest.approx(0.5 - 0.1)
    blender.blend(Query(1, 1, 0.0, "r", arm="b"), [c])
    assert c.score == pytest.approx(0.5)
    with pytest.raises(KeyError, match="zzz"):
        blender.blend(Query(1, 1, 0.0, "r", arm="zzz"), [c])
    with pytest.raises(ValueError, match="does not predict"):
        WeightedSumBlender({"a": {"like": 1.0}}, ("click",))


def test_blender_is_a_scorer_without_a_model():
    blender = WeightedSumBlender({"a": {"click": 1.0, "hate": -10.0}}, HEADS)
    c = Candidate(1, "popular", heads={"click": 0.5, "hate": 0.01})
    assert blender.score(Q, [c], None) is None and blender.version == ""
    assert c.score == pytest.approx(0.4)
    assert LightRankerScorer(FakeHandle(("user_click_rate",), ("engaged",))).score(Q, [], _frame([])) is None


def test_blender_multiplies_by_the_light_score_to_the_arm_exponent():
    """score = light ** e * sum_h w_h p_h; e = 0 is the plain sum; no light score keeps the sum;
    the light score is floored so a zero does not erase the order."""
    from mixer.blenders.weighted_sum import LIGHT_SCORE_FLOOR

    blender = WeightedSumBlender({"a": {"click": 1.0, "hate": -2.0}, "b": {"click": 1.0}}, HEADS,
                                 {"a": 1.0})
    cands = [Candidate(i, "popular", light_score=ls, heads={"click": 0.5, "hate": 0.1})
             for i, ls in enumerate([0.2, np.nan, 0.0])]
    blender.blend(Q, cands)
    assert [c.score for c in cands] == pytest.approx([0.2 * 0.3, 0.3, LIGHT_SCORE_FLOOR * 0.3])
    blender.blend(Query(1, 1, 0.0, "r", arm="b"), cands)  # arm without an exponent: the plain sum
    assert [c.score for c in cands] == pytest.approx([0.5, 0.5, 0.5])
    squared = WeightedSumBlender({"a": {"click": 1.0}}, HEADS, {"a": 2.0})
    high, low = Candidate(1, "p", light_score=0.4, heads={"click": 0.1}), Candidate(2, "p", light_score=0.1,
                                                                                   heads={"click": 0.3})
    squared.blend(Q, [high, low])
    assert high.score > low.score  # 0.016 > 0.003: the light score outweighs a 3x head probability
    # a negative sum: the likelier post must still rank higher (divided, not multiplied)
    hated = WeightedSumBlender({"a": {"hate": -1.0}}, HEADS, {"a": 1.0})
    likely, unlikely = (Candidate(i, "p", light_score=ls, heads={"hate": 0.1}) for i, ls in ((1, 0.9), (2, 0.01)))
    hated.blend(Q, [likely, unlikely])
    assert likely.score > unlikely.score and likely.score == pytest.approx(-0.1 / 0.9)
    with pytest.raises(ValueError, match="finite and >= 0"):
        WeightedSumBlender({"a": {"click": 1.0}}, HEADS, {"a": -1.0})

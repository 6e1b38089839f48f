"""Scorers: the light ranker scores every candidate, the heavy ranker the top K (one probability per head)."""

from mixer.scorers.heavy_ranker import HeavyRankerScorer
from mixer.scorers.light_ranker import LightRankerScorer
from mixer.scorers.ranker_handle import RankerHandle, check_handle

__all__ = ["HeavyRankerScorer", "LightRankerScorer", "RankerHandle", "check_handle"]

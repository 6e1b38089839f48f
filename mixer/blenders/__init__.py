"""Blenders: one ranking score from the heavy ranker's per-head probabilities."""

from mixer.blenders.weighted_sum import WeightedSumBlender

__all__ = ["WeightedSumBlender"]

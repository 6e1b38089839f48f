"""Candidate sources: each returns posts for a query; the runner calls them in parallel, fail-open."""

from mixer.candidate_sources.base import CandidateSource, SourceResult
from mixer.candidate_sources.coengagement import CoEngagementCandidateSource
from mixer.candidate_sources.embedding import EmbeddingCandidateSource
from mixer.candidate_sources.in_network import InNetworkCandidateSource
from mixer.candidate_sources.parallel_runner import ParallelSourceRunner
from mixer.candidate_sources.popular import PopularCandidateSource
from mixer.candidate_sources.tag_interest import TagInterestCandidateSource
from mixer.candidate_sources.trending import TrendingCandidateSource

__all__ = [
    "CandidateSource", "CoEngagementCandidateSource", "EmbeddingCandidateSource", "SourceResult", "InNetworkCandidateSource", "ParallelSourceRunner",
    "PopularCandidateSource", "TagInterestCandidateSource", "TrendingCandidateSource",
]

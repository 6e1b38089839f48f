"""Candidate hydrators: fill core data (author, creation time) that filters need, before features."""

from mixer.candidate_hydrators.post_metadata import PostMetadataCandidateHydrator

__all__ = ["PostMetadataCandidateHydrator"]

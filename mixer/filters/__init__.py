"""Pre-scoring filters, cheapest first: previously seen, hated author, blocked/muted author, max age,
duplicates.

Each filter has a ``name`` and ``apply(query, candidates) -> kept candidates`` (order preserved).
"""

from mixer.filters.blocked_muted_author import BlockedMutedAuthorFilter
from mixer.filters.duplicate import DuplicateFilter
from mixer.filters.hated_author import HatedAuthorFilter
from mixer.filters.max_age import MaxAgeFilter
from mixer.filters.previously_seen import PreviouslySeenFilter

__all__ = ["BlockedMutedAuthorFilter", "DuplicateFilter", "HatedAuthorFilter", "MaxAgeFilter", "PreviouslySeenFilter"]

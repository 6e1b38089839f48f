"""Pre-scoring filters, cheapest first: previously seen, hated author, blocked/muted author, max age,
duplicates.

Each filter is a ``mixer.components.Filter``: a ``name``, an ``enabled(query)`` gate and
``apply(query, candidates) -> FilterResult(kept, removed)`` (input order preserved in both).
"""

from mixer.filters.blocked_muted_author import BlockedMutedAuthorFilter
from mixer.filters.duplicate import DuplicateFilter
from mixer.filters.hated_author import HatedAuthorFilter
from mixer.filters.max_age import MaxAgeFilter
from mixer.filters.previously_seen import PreviouslySeenFilter

__all__ = ["BlockedMutedAuthorFilter", "DuplicateFilter", "HatedAuthorFilter", "MaxAgeFilter", "PreviouslySeenFilter"]

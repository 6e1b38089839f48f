"""Team-draft interleaving at serving time: the page of an interleaving arm merges two arms'
rankings (``models.interleaving.team_draft``), each post tagged with the team that placed it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mixer.candidate import Candidate, Query
from mixer.components import Selector, SelectorResult
from mixer.selectors.exploration import request_rng
from models.interleaving import TEAM_A, team_draft

if TYPE_CHECKING:
    import pandas as pd


class InterleavingSelector(Selector):
    """Merges the two team arms' rankings of an interleaving arm's candidates into the page.

    Each team's ranking orders the candidates (not served on earlier pages) by
    ``Candidate.team_scores[team]`` (set by ``WeightedSumBlender``), best first; team-draft then
    fills ``query.page_size`` slots, the coin seeded by the request id, and sets ``Candidate.team``
    to the team arm's name. Runs after ``AuthorDiversitySelector`` (whose per-author cap has
    already dropped posts; its score discount is not applied to the team rankings, which are the
    two arms' own orders) and before ``PageSelector``; the candidates not placed follow in the
    first team's order.

    Args:
        teams_by_arm: interleaving arm -> (team arm A, team arm B).
    """

    name = "interleaving"

    def __init__(self, teams_by_arm: dict[str, tuple[str, str]]):
        self.teams_by_arm = dict(teams_by_arm)

    def enabled(self, query: Query) -> bool:
        """True for the interleaving arms' requests."""
        return query.arm in self.teams_by_arm

    def select(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None = None) -> SelectorResult:
        """The interleaved slots first, then the rest; no feature frame (runs after scoring)."""
        a, b = self.teams_by_arm[query.arm]
        earlier = set(query.cursor.served) if query.cursor is not None else set()
        fresh = [c for c in candidates if c.post_id not in earlier]
        rank_a = sorted(fresh, key=lambda c: -c.team_scores.get(a, float("-inf")))
        rank_b = sorted(fresh, key=lambda c: -c.team_scores.get(b, float("-inf")))
        by_id = {id(c): c for c in fresh}
        page = team_draft([id(c) for c in rank_a], [id(c) for c in rank_b], query.page_size,
                          request_rng(query.request_id))
        placed = []
        for key, team in page:
            c = by_id[key]
            c.team = a if team == TEAM_A else b
            placed.append(c)
        chosen = {id(c) for c in placed}
        return SelectorResult(placed + [c for c in rank_a if id(c) not in chosen]
                              + [c for c in candidates if c.post_id in earlier], None)

"""Team-draft interleaving: two rankings merged into one page, each item credited to the ranking
(team) that placed it, and the engagements that follow decide which ranking users prefer.

Sources: Radlinski, Kurup & Joachims 2008, "How does clickthrough data reflect retrieval
quality?" (team-draft, Algorithm 2); Chapelle, Joachims, Radlinski & Yue 2012, "Large-scale
validation and analysis of interleaved search evaluation" (per-query credit, the preference
statistic ``(wins_A + ties/2) / n - 1/2``, and why interleaving needs far fewer queries than A/B).

A user sees one page with items from both rankings, so each request compares the two orders on
the same user at the same moment: the per-user noise that dominates A/B tests cancels.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

TEAM_A = "A"
TEAM_B = "B"


def team_draft(ranking_a: Sequence[Hashable], ranking_b: Sequence[Hashable], k: int,
               rng: np.random.Generator) -> list[tuple[Hashable, str]]:
    """Interleave two rankings into at most ``k`` items, each with its team (Radlinski et al.
    2008, Algorithm 2).

    In each round the team with fewer picks so far (a coin flip when equal) adds its highest-ranked
    item not yet on the page. A team whose ranking is exhausted passes to the other. Every item of
    the result comes from one of the two rankings, no item twice, and after each pick the two teams'
    counts differ by at most one while both rankings still have items.

    Args:
        ranking_a, ranking_b: item ids, best first (duplicates within a ranking are skipped).
        k: page length (>= 1).
        rng: the coin (seed it from the request id for a reproducible page).

    Returns:
        ``[(item, team)]`` in page order, ``team`` in (``TEAM_A``, ``TEAM_B``).

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"an interleaved page needs k >= 1, got {k}")
    placed: set = set()
    out: list[tuple[Hashable, str]] = []
    pos = {TEAM_A: 0, TEAM_B: 0}
    lists = {TEAM_A: ranking_a, TEAM_B: ranking_b}
    count = {TEAM_A: 0, TEAM_B: 0}

    def next_of(team: str):
        lst, i = lists[team], pos[team]
        while i < len(lst) and lst[i] in placed:
            i += 1
        pos[team] = i
        return lst[i] if i < len(lst) else None

    while len(out) < k:
        if count[TEAM_A] < count[TEAM_B] or (count[TEAM_A] == count[TEAM_B] and rng.random() < 0.5):
            order = (TEAM_A, TEAM_B)
        else:
            order = (TEAM_B, TEAM_A)
        for team in order:
            item = next_of(team)
            if item is not None:
                break
        else:
            break  # both rankings exhausted
        placed.add(item)
        count[team] += 1
        out.append((item, team))
    return out


@dataclass(frozen=True)
class InterleavingResult:
    """The outcome of an interleaving experiment.

    Attributes:
        wins_a, wins_b, ties: units (requests or users) where team A's items got more engaged
            credit, team B's did, or neither / equal (ties include units with no engagement only if
            ``count_empty`` was set).
        preference: ``(wins_a + ties/2) / (wins_a + wins_b + ties) - 1/2`` (Chapelle et al. 2012,
            sect. 4): > 0 means A is preferred; in [-0.5, 0.5].
        ci_low, ci_high: 95 % bootstrap interval of ``preference`` over units.
        p_value: two-sided sign test of wins A vs wins B (ties left out; exact binomial).
    """

    wins_a: int
    wins_b: int
    ties: int
    preference: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def winner(self) -> str | None:
        """``TEAM_A`` / ``TEAM_B`` when the interval excludes 0, else None (no decision)."""
        if self.ci_low > 0:
            return TEAM_A
        if self.ci_high < 0:
            return TEAM_B
        return None

    def to_dict(self) -> dict:
        """The fields and the winner as a JSON-ready dict."""
        return {**self.__dict__, "winner": self.winner}


def interleaving_credit(units: Sequence[Hashable], teams: Sequence[str], engaged: Sequence[float], *,
                        count_empty: bool = False, n_boot: int = 2000, seed: int = 0) -> InterleavingResult:
    """Credit engagements to teams per unit and compare (Chapelle et al. 2012).

    Args:
        units: (n,) the unit of comparison of each served item: the request id (per-query credit)
            or the user id (per-user credit, Chapelle et al.'s choice against heavy users).
        teams: (n,) ``TEAM_A`` or ``TEAM_B`` per item, as logged when it was served.
        engaged: (n,) credit of each item (0/1 engagement, or a weighted sum of heads).
        count_empty: count units without any engagement as ties (default: left out, as in the
            paper: they carry no preference and only dilute the statistic).
        n_boot: bootstrap resamples of units for the interval.
        seed: the bootstrap's seed.

    Raises:
        ValueError: lengths differ, a team is not A/B, or no unit has engagements.
    """
    from scipy.stats import binomtest

    units = np.asarray(units)
    teams = np.asarray(teams)
    credit = np.asarray(engaged, dtype="float64")
    if not (len(units) == len(teams) == len(credit)):
        raise ValueError(f"units, teams and engaged must have one value per served item; got {len(units)}, "
                         f"{len(teams)}, {len(credit)}")
    bad = set(np.unique(teams).tolist()) - {TEAM_A, TEAM_B}
    if bad:
        raise ValueError(f"teams must be {TEAM_A!r} or {TEAM_B!r}, got {sorted(map(str, bad))}")
    _, unit_index = np.unique(units, return_inverse=True)
    m = unit_index.max() + 1 if len(unit_index) else 0
    a = np.bincount(unit_index, weights=credit * (teams == TEAM_A), minlength=m)
    b = np.bincount(unit_index, weights=credit * (teams == TEAM_B), minlength=m)
    keep = np.ones(m, dtype=bool) if count_empty else (a + b) > 0
    a, b = a[keep], b[keep]
    if len(a) == 0:
        raise ValueError("no unit has an engagement: nothing to credit yet")
    outcome = np.sign(a - b)  # +1 A wins, -1 B wins, 0 tie

    def preference(o: np.ndarray) -> float:
        return float(((o > 0).sum() + 0.5 * (o == 0).sum()) / len(o) - 0.5)

    rng = np.random.default_rng(seed)
    boots = np.array([preference(outcome[rng.integers(0, len(outcome), len(outcome))]) for _ in range(n_boot)])
    wins_a, wins_b = int((outcome > 0).sum()), int((outcome < 0).sum())
    p = binomtest(wins_a, wins_a + wins_b, 0.5).pvalue if wins_a + wins_b else 1.0
    return InterleavingResult(wins_a, wins_b, int((outcome == 0).sum()), preference(outcome),
                              float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)), float(p))

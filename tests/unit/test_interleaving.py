"""Team-draft interleaving (models.interleaving): the merge's invariants, and credit assignment
on simulated users whose preferences are known."""

from __future__ import annotations

import numpy as np
import pytest

from models.interleaving import TEAM_A, TEAM_B, interleaving_credit, team_draft


@pytest.mark.parametrize("seed", range(20))
def test_team_draft_keeps_each_rankings_order_and_balances_the_teams(seed):
    rng = np.random.default_rng(seed)
    a = list(rng.permutation(30)[:20])
    b = list(rng.permutation(30)[:12])
    page = team_draft(a, b, 25, rng)
    items = [i for i, _ in page]
    assert len(items) == len(set(items)) == min(25, len(set(a) | set(b)))
    for team, ranking in ((TEAM_A, a), (TEAM_B, b)):
        mine = [i for i, t in page if t == team]
        assert mine == sorted(mine, key=ranking.index)  # a team's items keep its ranking's order
    # every pick is that team's best item not yet placed
    placed: set = set()
    for item, team in page:
        ranking = a if team == TEAM_A else b
        assert item == next((x for x in ranking if x not in placed), item)
        placed.add(item)
    # the counts differ by at most one while both rankings still have items to give
    na = nb = 0
    seen: set = set()
    for item, team in page:
        seen.add(item)
        na, nb = na + (team == TEAM_A), nb + (team == TEAM_B)
        if any(x not in seen for x in a) and any(x not in seen for x in b):
            assert abs(na - nb) <= 1


def test_identical_rankings_interleave_to_the_same_ranking():
    r = list(range(10))
    page = team_draft(r, r, 10, np.random.default_rng(3))
    assert [i for i, _ in page] == r
    assert {t for _, t in page} == {TEAM_A, TEAM_B}


def test_the_coin_decides_who_starts():
    firsts = {team_draft([1, 2], [3, 4], 2, np.random.default_rng(s))[0][1] for s in range(20)}
    assert firsts == {TEAM_A, TEAM_B}
    with pytest.raises(ValueError, match="k >= 1"):
        team_draft([1], [2], 0, np.random.default_rng(0))


def simulate_users(seed: int, n_users: int, b_is_random: bool):
    """Each user has a true relevance per post; A ranks by it (plus noise), B by noise (or as A
    does); the user examines the page top down (position bias 1/(1+pos)) and engages with
    probability relevance x examination."""
    rng = np.random.default_rng(seed)
    units, teams, engaged = [], [], []
    for u in range(n_users):
        relevance = rng.beta(1, 6, 60)
        a = list(np.argsort(-(relevance + rng.normal(0, 0.05, 60))))
        b = list(rng.permutation(60)) if b_is_random else list(np.argsort(-(relevance + rng.normal(0, 0.05, 60))))
        for pos, (item, team) in enumerate(team_draft(a, b, 10, rng)):
            units.append(u)
            teams.append(team)
            engaged.append(float(rng.random() < relevance[item] / (1 + 0.3 * pos)))
    return units, teams, engaged


def test_a_worse_ranking_loses_with_the_right_sign():
    res = interleaving_credit(*simulate_users(1, 300, b_is_random=True))
    assert res.winner == TEAM_A and res.preference > 0.1 and res.p_value < 1e-4
    assert res.wins_a > res.wins_b


def test_equal_rankings_are_no_decision_in_most_seeds():
    decided = sum(interleaving_credit(*simulate_users(s, 150, b_is_random=False), n_boot=500).winner is not None
                  for s in range(20))
    assert decided <= 3  # a 95 % interval excludes 0 in about 1 of 20 A/A runs


def test_credit_counts_per_unit_and_leaves_out_units_without_engagement():
    units = [1, 1, 1, 2, 2, 3, 3]
    teams = [TEAM_A, TEAM_B, TEAM_A, TEAM_B, TEAM_A, TEAM_A, TEAM_B]
    engaged = [1, 1, 1, 1, 0, 0, 0]
    res = interleaving_credit(units, teams, engaged, n_boot=100)
    assert (res.wins_a, res.wins_b, res.ties) == (1, 1, 0)  # unit 3 has no engagement
    with_empty = interleaving_credit(units, teams, engaged, count_empty=True, n_boot=100)
    assert with_empty.ties == 1 and with_empty.preference == pytest.approx(0.0)


def test_bad_logs_are_refused():
    with pytest.raises(ValueError, match="one value per served item"):
        interleaving_credit([1, 2], [TEAM_A], [1, 0])
    with pytest.raises(ValueError, match="teams must be"):
        interleaving_credit([1, 2], [TEAM_A, "C"], [1, 0])
    with pytest.raises(ValueError, match="no unit has an engagement"):
        interleaving_credit([1, 2], [TEAM_A, TEAM_B], [0, 0])

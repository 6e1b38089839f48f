"""Interleaving arms at serving time: config validation, both teams' scores in the blender, and
the team-draft page of InterleavingSelector; and their credit in the experiment readout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydantic
import pytest

from mixer.blenders import WeightedSumBlender
from mixer.candidate import Candidate, Query
from mixer.config import ExperimentSettings
from mixer.selectors import InterleavingSelector, PageSelector
from monitoring.experiment_report import readout

W_A = {"click": 1.0}
W_B = {"like": 1.0}


def _experiment(**inter):
    arms = [{"name": "a", "traffic_share": 0.0, "weights": W_A}, {"name": "b", "traffic_share": 0.0, "weights": W_B},
            {"name": "ab", "traffic_share": 1.0, "interleave": ["a", "b"], **inter}]
    return ExperimentSettings(salt="s", arms=arms)


def test_interleaving_arms_are_validated():
    assert _experiment().arms[2].interleave == ("a", "b")
    with pytest.raises(pydantic.ValidationError, match="takes no weights"):
        _experiment(weights=W_A)
    with pytest.raises(pydantic.ValidationError, match="cannot both interleave and explore"):
        _experiment(exploration={"policy": "softmax"})
    with pytest.raises(pydantic.ValidationError, match="not an arm of the experiment"):
        ExperimentSettings(salt="s", arms=[{"name": "ab", "traffic_share": 1.0, "interleave": ["a", "b"]}])
    with pytest.raises(pydantic.ValidationError, match="with itself"):
        _experiment(interleave=["a", "a"])
    with pytest.raises(pydantic.ValidationError, match="at least one head weight"):
        ExperimentSettings(salt="s", arms=[{"name": "x", "traffic_share": 1.0}])


def _cands(n=12):
    rng = np.random.default_rng(0)
    return [Candidate(post_id=i, source="popular", heads={"click": float(rng.random()), "like": float(rng.random())})
            for i in range(n)]


def test_the_page_merges_both_teams_rankings_and_names_each_posts_team():
    blender = WeightedSumBlender({"a": W_A, "b": W_B}, ["click", "like"], interleaving={"ab": ("a", "b")})
    sel = InterleavingSelector({"ab": ("a", "b")})
    teams_seen = set()
    for r in range(30):
        q = Query(user_id=1, page_size=6, now_s=0, request_id=f"r{r}", arm="ab")
        cands = _cands()
        blender.blend(q, cands)
        assert all(set(c.team_scores) == {"a", "b"} for c in cands)
        page = PageSelector().select(q, sel.select(q, cands, None).candidates, None).candidates
        assert len(page) == 6 and len({c.post_id for c in page}) == 6
        for team, head in (("a", "click"), ("b", "like")):
            mine = [c for c in page if c.team == team]
            # each team's posts are its ranking's best not taken by the other team, in its order
            assert [c.heads[head] for c in mine] == sorted((c.heads[head] for c in mine), reverse=True)
            teams_seen.add(team)
        assert abs(sum(c.team == "a" for c in page) - 3) <= 1
    assert teams_seen == {"a", "b"}


def test_the_readout_credits_the_better_team():
    rng = np.random.default_rng(1)
    rows = []
    for u in range(400):
        for r in range(3):
            for pos in range(6):
                team = "a" if (pos + r + u) % 2 == 0 else "b"
                p = 0.3 if team == "a" else 0.2  # team a's posts get more clicks
                rows.append((f"{u}-{r}", u, "ab", team, float(rng.random() < p), 0.0, 20.0))
    f = pd.DataFrame(rows, columns=["request_id", "user_id", "arm", "team", "click", "like", "pipeline_ms"])
    f["degraded"], f["fallback"], f["labelled"] = "", 0, True
    r = readout(f, {"a": 0.0, "b": 0.0, "ab": 1.0}, experiment="x", control="ab", heads=("click", "like"))
    ab = r.arms[0]
    assert ab.teams == ("a", "b")
    assert ab.interleaving["click"].winner == "A" and ab.interleaving["click"].preference > 0
    assert "like" not in ab.interleaving  # no engagement on that head: nothing to credit

"""The Lua seam without a server: every script's named KEYS / ARGV agree with its ``.lua`` file, the
records are built in field order, and the files ship as package data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from core import online_layout as keys
from core import realtime
from core.lua import LuaScript, LuaScriptSpec, declared_names
from pipelines.streaming import scripts as S

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", S.ALL_SPECS, ids=lambda s: s.name)
def test_each_script_declares_the_keys_and_args_of_its_records(spec):
    source = spec.check()  # raises if unpack(KEYS) / unpack(ARGV) differ from the records' fields
    assert declared_names(source, "KEYS") == spec.keys._fields
    assert declared_names(source, "ARGV") == spec.args._fields
    for helper in spec.helpers:  # helpers come first: they define local functions the script calls
        assert source.index("local function") < source.index("unpack(KEYS)"), helper


@pytest.mark.parametrize("spec", [S.ENGAGEMENT, S.SOCIAL], ids=lambda s: s.name)
def test_the_type_guard_names_one_type_per_key(spec):
    import re

    types = re.search(r"guard_key_types\(\{([^}]*)\}\)", spec.source).group(1)
    types = [t.strip().strip("'") for t in types.split(",")]
    assert len(types) == len(spec.keys._fields) and set(types) <= {"string", "hash", "zset", "set"}
    assert types[0] == "string" and spec.keys._fields[0] == "seen"  # the seen marker, set by mark_seen


def test_a_script_that_disagrees_with_its_records_fails_at_load():
    spec = S.ENGAGEMENT
    swapped = spec.source.replace("local seen, counts, rt_meta,", "local seen, rt_meta, counts,")
    with pytest.raises(ValueError, match=r"unpack\(KEYS\) names .* differ from EngagementKeys fields"):
        spec.check(swapped)
    with pytest.raises(ValueError, match="ARGV"):
        LuaScriptSpec("pipelines.streaming", "social.lua", S.SocialKeys, S.CoverageStampArgs,
                      helpers=("guard.lua",)).check()


def test_engagement_records_built_positionally_equal_the_keyword_form():
    k = S.EngagementKeys.of("e1", user_id=3, post_id=10, author_id=7)
    assert k == S.EngagementKeys(
        seen=keys.rt_seen_event("e1"), counts=keys.rt_post_counts(10), rt_meta=keys.rt_post_meta(10),
        post_score=keys.rt_post_score(10), author_score=keys.rt_author_score(7),
        recent_posts=keys.rt_user_recent_posts(3), recent_authors=keys.rt_user_recent_authors(3),
        hated=keys.hated_authors(3), follows=keys.follows(3), social_ts=keys.rt_social_ts(3),
        index_post_meta=keys.POST_META, trending_posts=keys.RT_TRENDING_POSTS, trending_tags=keys.RT_TRENDING_TAGS,
        coverage=keys.RT_COVERAGE, action_sequence=keys.action_sequence(3))
    a = S.EngagementArgs.of("like", 1_651_406_500.25, 1_651_406_501.5, 10, 7, seen_ttl=99)
    assert a == S.EngagementArgs(
        seen_ttl=99, kind="like", bucket_start=1_651_406_400, event_ts="1651406500.250000",
        write_ts="1651406501.500000", weight=repr(realtime.kind_weight("like")), post_id=10, author_id=7, positive=1,
        engaged=1, half_life=repr(realtime.HALF_LIFE_S), counts_ttl=realtime.COUNTS_TTL_S, score_ttl=realtime.SCORE_TTL_S,
        recent_cap=realtime.RECENT_CAP, retention_s=realtime.RETENTION_S, bucket_s=realtime.BUCKET_S,
        trending_half_life=repr(realtime.TRENDING_HALF_LIFE_S), trending_cap=realtime.TRENDING_CAP,
        out_of_order_s=realtime.OUT_OF_ORDER_S, sequence_cap=128)
    assert S.EngagementArgs.of("impression", 0.0, 0.0, 1, 2, 1).positive == 0
    click = S.EngagementArgs.of("click", 0.0, 0.0, 1, 2, 1)
    assert click.positive == 1 and click.engaged == 0  # a click is not in the action sequence
    with pytest.raises(ValueError, match="unknown kind"):
        S.EngagementArgs.of("retweet", 0.0, 0.0, 1, 2, 1)


def test_a_call_with_another_record_is_refused():
    class FakeScript:
        def __call__(self, keys, args, client):
            return keys, args

    script = LuaScript(S.SOCIAL, FakeScript())
    k, a = S.SocialKeys.of("e", 3), S.SocialArgs(seen_ttl=1, action="mute", author_id=4, event_ts="1.000000")
    assert script(k, a) == (k, a)  # the records are the positional lists
    with pytest.raises(TypeError, match="expected a SocialArgs"):
        script(k, tuple(a))


def test_the_lua_files_ship_as_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.resolve() for pkg, globs in data.items() for g in globs
               for p in (ROOT / pkg.replace(".", "/")).glob(g)}
    lua = {p.resolve() for d in ("pipelines", "mixer") for p in (ROOT / d).rglob("*.lua")}
    assert lua and lua <= shipped

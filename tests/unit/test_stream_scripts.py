"""The Lua seam without a server: every script's named KEYS / ARGV agree with its ``.lua`` file, the
records are built in field order, and the files ship as package data."""

from __future__ import annotations

import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from core import online_layout as keys
from core import realtime
from core.lua import LuaScript, LuaScriptSpec, declared_names
from pipelines.streaming import scripts as S
from pipelines.streaming.events import EngagementEvent

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", S.ALL_SPECS, ids=lambda s: s.name)
def test_each_script_declares_the_keys_and_args_of_its_records(spec):
    source = spec.check()  # raises if unpack(KEYS) / unpack(ARGV) differ from the records' fields
    assert declared_names(source, "KEYS") == spec.keys._fields
    assert declared_names(source, "ARGV") == spec.args._fields
    for helper in spec.helpers:  # helpers come first: they define local functions the script calls
        assert source.index("local function") < source.index("unpack(KEYS)"), helper


def test_the_social_type_guard_names_one_type_per_key():
    import re

    spec = S.SOCIAL
    types = re.search(r"guard_key_types\(\{([^}]*)\}\)", spec.source).group(1)
    types = [t.strip().strip("'") for t in types.split(",")]
    assert len(types) == len(spec.keys._fields) and set(types) <= {"string", "hash", "zset", "set"}
    assert types[0] == "string" and spec.keys._fields[0] == "seen"  # the seen marker, set by mark_seen


def test_a_script_that_disagrees_with_its_records_fails_at_load():
    spec = S.ENGAGEMENT_BATCH
    swapped = spec.source.replace("local index_post_meta, trending_posts,", "local trending_posts, index_post_meta,")
    assert swapped != spec.source
    with pytest.raises(ValueError, match=r"unpack\(KEYS\) names .* differ from EngagementBatchKeys fields"):
        spec.check(swapped)
    # the head form must name as many values as it unpacks
    with pytest.raises(ValueError, match=r"unpack\(KEYS, 1, 5\) assigned to 4 names"):
        spec.check(spec.source.replace("unpack(KEYS, 1, 4)", "unpack(KEYS, 1, 5)"))
    with pytest.raises(ValueError, match="ARGV"):
        LuaScriptSpec("pipelines.streaming", "social.lua", S.SocialKeys, S.CoverageStampArgs,
                      helpers=("guard.lua",)).check()


def _eng(eid, kind, user, post, author, ts):
    return EngagementEvent(event_id=eid, kind=kind, user_id=user, post_id=post, author_id=author,
                           event_ts=datetime.fromtimestamp(ts, tz=timezone.utc))


def test_the_engagement_batch_layout_names_each_key_once_in_its_section():
    events = [_eng("e1", "impression", 3, 10, 7, 1_651_406_500.25), _eng("e2", "like", 3, 10, 7, 1_651_406_501.5),
              _eng("e3", "hate", 4, 11, 7, 1_651_406_399.0), _eng("e1", "impression", 3, 10, 7, 1_651_406_500.25)]
    k, a, ets = S.EngagementBatchScript.layout(events, 1_651_406_600.0, seen_ttl=99)
    head = S.EngagementBatchArgs(99, "1651406600.000000", 4, 2, 1, 2, 2)
    assert k == [keys.POST_META, keys.RT_TRENDING_POSTS, keys.RT_TRENDING_TAGS, keys.RT_COVERAGE,
                 # one idempotency set per event hour, in order of first use (e3 is a second before e1's hour)
                 keys.rt_seen_set(1_651_406_400), keys.rt_seen_set(1_651_402_800),
                 keys.rt_post_counts(10), keys.rt_post_counts(11),
                 keys.rt_author_score(7),
                 # the impression touches no user key: user 3 comes with the like, 4 with the hate
                 keys.rt_user_recent_posts(3), keys.rt_user_recent_authors(3), keys.hated_authors(3),
                 keys.follows(3), keys.rt_social_ts(3), keys.action_sequence(3),
                 keys.rt_user_recent_posts(4), keys.rt_user_recent_authors(4), keys.hated_authors(4),
                 keys.follows(4), keys.rt_social_ts(4), keys.action_sequence(4)]
    assert a == [*head, 10, 11, 7,
                 "impression", "1651406500.250000", 1, 1, 0, "e1", 1, "like", "1651406501.500000", 1, 1, 1, "e2", 1,
                 "hate", "1651406399.000000", 2, 1, 2, "e3", 2, "impression", "1651406500.250000", 1, 1, 0, "e1", 1]
    assert ets == [1_651_406_500.25, 1_651_406_501.5, 1_651_406_399.0, 1_651_406_500.25]
    assert head.sequence_cap == 128 and head.recent_cap == realtime.RECENT_CAP
    # the kind table: weight, positive head, engaged head (user action sequence)
    table = dict((n, (w, p, e)) for n, w, p, e in zip(*[iter(head.kinds.split())] * 4))
    assert table["impression"] == ("0.0", "0", "0") and table["hate"] == ("0.0", "0", "0")
    assert table["click"] == (repr(realtime.kind_weight("click")), "1", "0")  # a click is not in the sequence
    assert table["like"] == (repr(realtime.kind_weight("like")), "1", "1")
    assert set(table) == set(realtime.ENGAGEMENT_KINDS)


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

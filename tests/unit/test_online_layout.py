"""The online-store layout module is the only place that spells a Redis key, and it documents each.

1. Every key ``core.online_layout`` builds (found by calling its public functions and reading its
   constants, not from a list that could go stale) has a row in the module docstring's tables,
   with a Redis type, and the row's key template renders to what the builder returns; every row
   names a builder that exists.
2. The keys are the documented ones, byte for byte (``GOLDEN``), each per-entity key with its
   entity's Redis Cluster hash tag. This file and the layout module are the only two that may spell
   an ``hm:`` literal.
3. No other module, test, benchmark or Lua script spells an ``hm:`` key (a scan of every string
   literal outside docstrings in the source tree).
"""

from __future__ import annotations

import ast
import inspect
import re
import typing
from pathlib import Path

import numpy as np
import pytest

from core import online_layout as layout

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("core", "feature_repo", "pipelines", "models", "serving", "mixer", "monitoring", "home_mixer",
               "bench", "tests", "scripts")
ALLOWED = {ROOT / "core" / "online_layout.py", Path(__file__).resolve()}
REDIS_TYPES = ("string", "hash", "zset", "set", "stream")
SAMPLE = {int: 7, str: "t"}

# builder -> (arguments, the key written since the Redis Cluster hash tags (issue 21); a store written
# by an older version is rebuilt: the index by its builder, the real-time keys by replaying the stream)
GOLDEN: dict[str, tuple[tuple, str]] = {
    "POST_META": ((), "hm:{rt}:post_meta"),
    "INDEX_META": ((), "hm:index_meta"),
    "author_posts": ((11,), "hm:{a:11}:author_posts"),
    "action_sequence": ((11,), "hm:{u:11}:seq"),
    "coengagement": ((11,), "hm:{p:11}:coeng"),
    "popular": (("24h",), "hm:popular:24h"),
    "tag_posts": ((5,), "hm:tag_posts:5"),
    "engaged_authors": ((3,), "hm:{u:3}:engaged_authors"),
    "tag_interest": ((3,), "hm:{u:3}:tag_interest"),
    "seen_posts": ((3,), "hm:{u:3}:seen_posts"),
    "follows": ((3,), "hm:{u:3}:follows"),
    "hated_authors": ((3,), "hm:{u:3}:hated_authors"),
    "blocked_authors": ((3,), "hm:{u:3}:blocked_authors"),
    "muted_authors": ((3,), "hm:{u:3}:muted_authors"),
    "served_posts": ((3,), "hm:{u:3}:served"),
    "SERVED_IMPRESSIONS": ((), "hm:served_impressions"),
    "SERVED_FEATURES": ((), "hm:served_features"),
    "DRIFT_SAMPLE": ((), "hm:drift_sample"),
    "EXPLORATION_LOG": ((), "hm:exploration"),
    "SHADOW_LOG": ((), "hm:shadow"),
    "rt_seen_set": ((1_651_406_400,), "hm:{rt}:seen_h:1651406400"),
    "rt_post_seen_set": ((10, 3600), "hm:{p:10}:rt:seen_h:3600"),
    "rt_author_seen_set": ((7, 3600), "hm:{a:7}:rt:seen_h:3600"),
    "rt_user_seen_set": ((3, 3600), "hm:{u:3}:rt:seen_h:3600"),
    "rt_user_seen_event": ((3, "e-1"), "hm:{u:3}:rt:seen:e-1"),
    "rt_post_counts": ((10,), "hm:{p:10}:rt:counts"),
    "rt_author_score": ((7,), "hm:{a:7}:rt:score"),
    "rt_user_recent_posts": ((3,), "hm:{u:3}:rt:posts"),
    "rt_user_recent_authors": ((3,), "hm:{u:3}:rt:authors"),
    "rt_social_ts": ((3,), "hm:{u:3}:rt:social_ts"),
    "RT_TRENDING_POSTS": ((), "hm:{rt}:trending:posts"),
    "RT_TRENDING_TAGS": ((), "hm:{rt}:trending:tags"),
    "FEATURE_VERSION": ((), "hm:feature_version"),
    "RT_COVERAGE": ((), "hm:{rt}:coverage"),
    "event_stream": (("engagements",), "hm:events:{engagements}"),
    "dead_letter_stream": (("engagements",), "hm:events:{engagements}:dead"),
    "graph_followees": ((3,), "hm:{u:3}:followees"),
    "graph_followers": ((3,), "hm:{u:3}:followers"),
    "graph_edge_ts": ((3,), "hm:{u:3}:edge_ts"),
    "graph_seen_event": ((3, "e-1"), "hm:{u:3}:seen:e-1"),
    "home_timeline": ((3,), "hm:{u:3}:timeline"),
    "user_posts": ((3,), "hm:{u:3}:posts"),
    "fanout_progress": ((10,), "hm:{p:10}:fanout"),
    "DELETED_POSTS": ((), "hm:deleted_posts"),
    "FANOUT_CELEBRITIES": ((), "hm:fanout:celebrities"),
}


def _built_keys() -> dict[str, tuple[tuple, str]]:
    """Every key the module builds: ``name -> (sample args, key)`` for its ``hm:`` constants (not
    prefixes ending in ``:`` nor ``*`` patterns) and for every public function that, called with
    sample arguments (int 7, str "t"), returns an ``hm:`` string."""
    out = {}
    for name, obj in vars(layout).items():
        if name.startswith("_"):
            continue
        if isinstance(obj, str) and obj.startswith(layout.PREFIX) and not obj.endswith(":") and "*" not in obj:
            out[name] = ((), obj)
        elif inspect.isfunction(obj) and obj.__module__ == layout.__name__:
            params = inspect.signature(obj).parameters.values()
            hints = typing.get_type_hints(obj)
            args = tuple(SAMPLE.get(hints.get(p.name), "t") for p in params)
            try:
                key = obj(*args)
            except (TypeError, ValueError):
                continue
            if isinstance(key, str) and key.startswith(layout.PREFIX):
                out[name] = (args, key)
    return out


def _table_rows() -> dict[str, list[str]]:
    """First cell's builder name -> the row's cells, for every table row of the module docstring."""
    rows = {}
    for line in layout.__doc__.splitlines():
        if not line.startswith("| ``"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        name = re.match(r"``([\w.]+)", cells[0]).group(1)
        rows[name] = cells
    return rows


def test_the_builders_are_found():
    built = _built_keys()
    assert {"author_posts", "rt_post_counts", "event_stream", "RT_COVERAGE", "POST_META"} <= built.keys()
    assert "encode_post_meta" not in built and "EVENT_STREAM_PREFIX" not in built


def test_every_key_the_layout_builds_has_a_documented_row_with_its_type_and_template():
    rows = _table_rows()
    for name, (args, key) in _built_keys().items():
        assert name in rows, f"core/online_layout.py builds {key!r} ({name}) but its docstring table has no row for it"
        cells = rows[name]
        assert len(cells) >= 5, f"row of {name} needs builder | key | type | ... | writer | readers: {cells}"
        assert any(re.match(rf"{t}\b", cells[2]) for t in REDIS_TYPES), f"row of {name}: no Redis type in {cells[2]!r}"
        template = re.match(r"``([^`]+)``", cells[1]).group(1)
        params = list(inspect.signature(getattr(layout, name)).parameters) if callable(getattr(layout, name)) else []
        rendered = template
        for p, a in zip(params, args):
            rendered = rendered.replace("{" + p + "}", str(a))
        assert rendered == key, f"row of {name} documents {template!r}, the builder returns {key!r}"
    # and the other way round: every row names something the module has
    for name in rows:
        obj = layout
        for part in name.split("."):
            obj = getattr(obj, part, None)
            assert obj is not None, f"the docstring table documents {name}, which core.online_layout does not define"
    assert "FeastRedisLayout.key" in rows


def test_keys_are_the_documented_ones_byte_for_byte():
    built = _built_keys()
    assert built.keys() == GOLDEN.keys(), "a key was added or removed: add it to GOLDEN (and the docstring table)"
    for name, (args, want) in GOLDEN.items():
        obj = getattr(layout, name)
        assert (obj(*args) if callable(obj) else obj) == want
    assert layout.INDEX_KEY_PATTERNS == (
        "hm:{a:*}:author_posts", "hm:popular:*", "hm:tag_posts:*", "hm:{u:*}:follows", "hm:{u:*}:engaged_authors",
        "hm:{u:*}:tag_interest", "hm:{u:*}:hated_authors", "hm:{u:*}:seen_posts", "hm:{u:*}:seq", "hm:{p:*}:coeng")
    assert layout.RT_KEY_PATTERNS == (
        "hm:{rt}:trending:*", "hm:{rt}:coverage", "hm:{rt}:seen:*", "hm:{rt}:seen_h:*", "hm:{p:*}:rt:*", "hm:{a:*}:rt:*",
        "hm:{u:*}:rt:*", "hm:{u:*}:follows", "hm:{u:*}:hated_authors", "hm:{u:*}:blocked_authors",
        "hm:{u:*}:muted_authors")
    with pytest.raises(ValueError, match="bad topic"):
        layout.event_stream("a:b")  # a ':' would collide with the dead-letter suffix


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _hm_literals(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docs = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docs:
            v = node.value
            if (isinstance(v, str) and "hm:" in v) or (isinstance(v, bytes) and b"hm:" in v):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {v!r}")
    return found


def test_no_module_outside_the_layout_spells_an_hm_key():
    files = [p for d in SOURCE_DIRS if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    offenders = [hit for p in files if p.resolve() not in ALLOWED for hit in _hm_literals(p)]
    assert not offenders, ("build these keys with core.online_layout instead of spelling them:\n"
                           + "\n".join(offenders))
    # Lua scripts take every key in KEYS (the wrappers build them with the layout module)
    lua = [p for d in SOURCE_DIRS if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.lua")]
    assert len(lua) >= 7
    assert not [p for p in lua if "hm:" in p.read_text(encoding="utf-8")]


def test_the_scan_sees_literals_but_not_docstrings(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""mentions ``hm:x`` in a docstring"""\n'
                     'def f(u):\n    """hm:doc"""\n    return f"hm:follows:{u}", "ok", b"hm:b"\n')
    hits = _hm_literals(probe, root=tmp_path)
    assert sorted(hits) == ["probe.py:4: 'hm:follows:'", "probe.py:4: b'hm:b'"]


def test_neighbour_lists_pack_best_first_and_read_back_exactly():
    ids, sims = [7, 3, 9, 4], [0.25, 0.5, 0.25, 0.125]
    raw = layout.encode_neighbours(ids, sims)
    assert len(raw) == 4 * layout.NEIGHBOUR_DTYPE.itemsize
    got_ids, got_sims = layout.decode_neighbours(raw)
    assert got_ids.tolist() == [3, 7, 9, 4] and got_sims.tolist() == [0.5, 0.25, 0.25, 0.125]  # ties by id
    assert got_ids.dtype == np.int64 and got_sims.dtype == np.float64
    top2 = layout.decode_neighbours(raw[: 2 * layout.NEIGHBOUR_DTYPE.itemsize])  # what GETRANGE returns
    assert top2[0].tolist() == [3, 7]
    assert [len(a) for a in layout.decode_neighbours(None)] == [0, 0] == [len(a) for a in layout.decode_neighbours(b"")]
    with pytest.raises(ValueError, match="rebuild it"):
        layout.decode_neighbours(raw[:-1])
    with pytest.raises(ValueError, match="aligned"):
        layout.encode_neighbours([1, 2], [0.5])
    with pytest.raises(ValueError, match="finite"):
        layout.encode_neighbours([1], [float("nan")])

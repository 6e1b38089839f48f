"""The social graph's offline parts: the synthetic generator (Twitter's follower power law, seeded),
SNAP edge lists (comments, gzip, bad lines named), KuaiRand's graph rule, the fan-out settings and
the read-side timeline filter. No Redis here (tests/integration/test_graph_fanout.py has it)."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from core import online_layout as keys
from core.state import StateDir
from pipelines.graph.config import FanoutConfigError, FanoutSettings, load_fanout_config
from pipelines.graph.edges import EdgeListError, read_edge_list, write_edge_list, write_follow_graph
from pipelines.graph.generator import KWAK_FOLLOWER_EXPONENT, fit_power_law_exponent, generate_follow_graph
from pipelines.graph.kuairand import kuairand_follow_graph, post_created_events
from pipelines.graph.timeline import HomeTimelineReader, TimelineEntry, filter_timeline


# ---------------------------------------------------------------- generator
@pytest.fixture(scope="module")
def graph():
    return generate_follow_graph(100_000, 30, seed=7)


def test_the_in_degree_tail_fits_kwaks_exponent(graph):
    # the MLE fit of the followers' tail recovers the exponent the graph was drawn with (Kwak et al. 2010)
    alpha = fit_power_law_exponent(graph.in_degree(), k_min=50)
    assert abs(alpha - KWAK_FOLLOWER_EXPONENT) < 0.12, alpha
    # a graph drawn with another exponent fits to that one, not to Kwak's: the fit sees the difference
    steep = generate_follow_graph(100_000, 30, seed=7, alpha=3.0, celebrities=0)
    assert abs(fit_power_law_exponent(steep.in_degree(), k_min=50) - 3.0) < 0.2


def test_the_graph_has_a_celebrity_tail_and_the_asked_mean(graph):
    ind = graph.in_degree()
    assert 27 <= graph.mean_followees <= 30.5  # duplicates and self-follows dropped
    assert ind.max() >= 0.01 * graph.n_users  # an account followed by >= 1 % of users
    assert np.median(ind) < 30 < ind.mean() * 1.5  # most users have few followers
    # edges are unique, without self-follows, sorted by follower then followee
    key = graph.follower * graph.n_users + graph.followee
    assert (np.diff(key) > 0).all() and not (graph.follower == graph.followee).any()


def test_the_same_seed_gives_the_same_graph_and_another_seed_another():
    a, b = generate_follow_graph(5_000, 10, seed=3), generate_follow_graph(5_000, 10, seed=3)
    c = generate_follow_graph(5_000, 10, seed=4)
    assert np.array_equal(a.follower, b.follower) and np.array_equal(a.followee, b.followee)
    assert a.n_edges != c.n_edges or not np.array_equal(a.followee, c.followee)


@pytest.mark.parametrize("kwargs, match", [
    ({"users": 1, "mean_followees": 1}, "users must be"),
    ({"users": 10, "mean_followees": 10}, "mean_followees"),
    ({"users": 10, "mean_followees": 2, "alpha": 2.0}, "alpha must be > 2"),
])
def test_bad_generator_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_follow_graph(**kwargs)


# ---------------------------------------------------------------- SNAP edge lists
def test_an_edge_list_with_comments_blank_lines_and_tabs_reads(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("# Directed graph\n# FromNodeId\tToNodeId\n1\t2\n\n3 4\n  # indented comment\n5\t1\n")
    follower, followee = read_edge_list(path)
    assert follower.tolist() == [1, 3, 5] and followee.tolist() == [2, 4, 1]
    assert follower.dtype == np.int64


def test_a_gzipped_edge_list_round_trips(tmp_path):
    g = generate_follow_graph(2_000, 5, seed=1)
    path = write_edge_list(tmp_path / "g.txt.gz", g.follower, g.followee, header="test graph\nsecond line")
    with gzip.open(path, "rt") as fh:
        assert fh.readline() == "# test graph\n"
    follower, followee = read_edge_list(path)
    assert np.array_equal(follower, g.follower) and np.array_equal(followee, g.followee)


@pytest.mark.parametrize("bad, line", [("1 2\n3\n", 2), ("1 2\n# c\n3 x\n", 3), ("1 2 3\n", 1), ("1 -2\n", 1)])
def test_a_bad_line_is_named_with_its_number(tmp_path, bad, line):
    path = tmp_path / "bad.txt"
    path.write_text(bad)
    with pytest.raises(EdgeListError, match=rf"bad.txt:{line}: expected 'follower followee'"):
        read_edge_list(path)


def test_a_missing_edge_list_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_edge_list(tmp_path / "nope.txt")


def test_the_canonical_follow_graph_table(tmp_path):
    state = StateDir(tmp_path).ensure()
    path = write_follow_graph(state, np.array([1, 2]), np.array([2, 3]), "snap:g.txt")
    frame = pq.read_table(path).to_pandas()
    assert list(frame.columns) == ["user_id", "author_id", "event_ts", "source"]
    assert frame["user_id"].tolist() == [1, 2] and frame["author_id"].tolist() == [2, 3]
    assert str(frame["event_ts"].dtype) == "datetime64[us, UTC]" and set(frame["source"]) == {"snap:g.txt"}


# ---------------------------------------------------------------- KuaiRand
def _edges(rows):
    return pd.DataFrame(rows, columns=["user_id", "author_id", "event_ts", "edge_type", "weight"]).assign(
        event_ts=lambda f: pd.to_datetime(f["event_ts"], utc=True))


def test_kuairand_graph_keeps_follows_and_engaged_authors_above_the_weight():
    edges = _edges([
        (1, 10, "2022-04-08", "follow", 1.0),         # explicit follow: in, weight 5
        (1, 11, "2022-04-08", "engagement", 1.0),     # a click alone: out
        (1, 12, "2022-04-08", "engagement", 2.0),     # clicked and watched through: in
        (1, 12, "2022-04-09", "engagement", 3.0),     # weights add up: 5
        (2, 12, "2022-05-01", "engagement", 9.0),     # after as_of: out
        (3, 3, "2022-04-08", "follow", 1.0),          # self: out
    ])
    g = kuairand_follow_graph(edges, as_of="2022-04-20")
    assert list(zip(g["user_id"], g["author_id"], g["weight"], g["kind"])) == [
        (1, 10, 5.0, "follow"), (1, 12, 5.0, "engagement")]
    assert len(kuairand_follow_graph(edges, as_of="2022-04-20", min_weight=6)) == 1  # the follow alone


def test_post_created_events_come_in_creation_order_with_stable_ids():
    posts = pd.DataFrame({"post_id": [5, 6, 7], "author_id": [1, 1, 2],
                          "created_ts": pd.to_datetime(["2022-04-02", "2022-04-01", None], utc=True),
                          "duration_ms": [1000.0, float("nan"), 3.0], "tags": ["3,4", "", "1"]})
    events = post_created_events(posts)
    assert [(e.post_id, e.event_id, e.tags, e.duration_ms) for e in events] == [
        (6, "post_created:6", (), None), (5, "post_created:5", (3, 4), 1000)]


# ---------------------------------------------------------------- settings
def test_fanout_settings_default_and_file_and_errors(tmp_path):
    s = load_fanout_config()
    assert (s.celebrity_threshold, s.timeline_length, s.page_size) == (10_000, 800, 500)
    assert s == FanoutSettings()  # the YAML's defaults are the model's (the mixer's config embeds the model)
    path = tmp_path / "f.yaml"
    path.write_text("fanout:\n  celebrity_threshold: 100\n")
    assert load_fanout_config(path).celebrity_threshold == 100
    assert load_fanout_config(path).timeline_length == 800  # defaults kept
    path.write_text("fanout:\n  timeline_lenght: 5\n")
    with pytest.raises(FanoutConfigError, match="fanout.timeline_lenght"):
        load_fanout_config(path)
    with pytest.raises(FanoutConfigError, match="fanout.page_size"):
        load_fanout_config(page_size=0)
    path.write_text("other: 1\n")
    with pytest.raises(FanoutConfigError, match="no 'fanout:' mapping"):
        load_fanout_config(path)


# ---------------------------------------------------------------- the read-side filter
def test_the_filter_drops_deleted_unfollowed_blocked_and_hides_muted():
    e = keys.encode_timeline_entry
    members = [(e(1, 10).encode(), 5.0), (e(2, 11), 4.0), (e(3, 12), 3.0), (e(4, 13), 2.0), (e(5, 14), 1.0)]
    res = filter_timeline(members, followed={10, 11, 12, 13}, deleted={2}, blocked={12}, muted={13})
    assert [(k.post_id, k.author_id, k.created_ts) for k in res.kept] == [(1, 10, 5.0)]
    # deleted (2), blocked (12) and unfollowed (14) are removed for good; muted is hidden, kept stored
    assert res.stale == [e(2, 11), e(3, 12), e(5, 14)] and res.hidden == 1
    with pytest.raises(ValueError, match="expected 'post|author'"):
        filter_timeline([(b"17", 1.0)], followed=set(), deleted=set())


def test_the_lazy_celebrity_merge_equals_decoding_every_pulled_post():
    # the read decodes only the pulled posts that can reach the newest ``limit``; on random
    # timelines, pulls, ties and posts both pushed and pulled it must equal the full decode
    rng = np.random.default_rng(3)
    e = keys.encode_timeline_entry
    for trial in range(300):
        limit = int(rng.integers(1, 30))
        created = rng.integers(0, 40, size=500).astype(float)  # a post's time is its own: ties, no clashes
        author_of = rng.integers(1, 8, size=500)  # author 1 is pushed; 2..7 are pulled
        kept = sorted((TimelineEntry(int(p), int(author_of[p]), created[p])
                       for p in rng.choice(500, size=int(rng.integers(0, 40)), replace=False)),
                      key=lambda t: -t.created_ts)
        lists = []
        for author in range(2, 8):
            posts = [p for p in np.flatnonzero(author_of == author) if rng.random() < 0.3]
            # newest first; some of them also pushed (an author who crossed the threshold)
            lists.append(sorted(((e(int(p), author).encode(), created[p]) for p in posts), key=lambda ms: -ms[1]))
        want, have = list(kept), {t.post_id for t in kept}
        for members in lists:
            for m, s in members:
                post, author = keys.decode_timeline_entry(m)
                if post not in have:
                    have.add(post)
                    want.append(TimelineEntry(post, author, s))
        order = lambda t: (-t.created_ts, -t.post_id)  # noqa: E731
        got = list(kept)
        pulled = HomeTimelineReader._merge_pulled(got, lists, limit)
        assert sorted(got, key=order)[:limit] == sorted(want, key=order)[:limit], trial
        assert pulled == {t.post_id for t in got} - {t.post_id for t in kept}

"""The Redis Cluster online store (issue 21, must-have 2): ``home-mixer services start --cluster 3``
starts 3 primaries and 3 replicas of Debian's ``redis-server`` joined by ``redis-cli --cluster
create``, and every client reaches it through ``redis+cluster://`` (redis-py's ``RedisCluster``).

Everything is real: the session's cluster (``tests/conftest.py``'s ``redis_cluster``), the CLI, and
the clients of ``core.online_store.connect``.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest

from core.online_store import connect, parse_address
from core.services import CLUSTER_SLOTS, RedisCluster, ServiceError
from core.state import StateDir
from tests.integration.test_mixer_api import known_users  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def _cli(state: StateDir, *argv) -> tuple[int, str, str]:
    from home_mixer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--state", str(state.root), *argv])
    return code, out.getvalue(), err.getvalue()


def _roles(status: dict) -> dict[int, str]:
    return {m["ports"]["port"]: m["role"] for m in status["members"]}


def test_services_cluster_status_stop_and_restart_keep_roles_slots_and_data(redis_cluster):
    """``status`` shows 3 primaries + 3 replicas with every slot served; after ``stop`` and ``start
    --cluster 3`` every node is back on its recorded port with its role (nodes.conf kept), and an
    acknowledged write is still there (AOF)."""
    state = redis_cluster.state
    code, out, _ = _cli(state, "services", "status", "--json")
    before = json.loads(out)
    assert code == 0 and before["ready"] and before["shards"] == 3, before
    roles = _roles(before)
    assert sorted(roles.values()) == ["master"] * 3 + ["slave"] * 3
    address = before["address"]
    assert parse_address(address).cluster_nodes == tuple(("127.0.0.1", p) for p in roles)
    client = connect(address)
    slots = client.cluster_slots()
    assert sum(end - start + 1 for start, end in slots) == CLUSTER_SLOTS
    # keys land on every primary (no node left idle), and a write is acknowledged
    for i in range(30):
        client.set(f"restart-probe-{i}", i)
    owners = {client.get_node_from_key(f"restart-probe-{i}").port for i in range(30)}
    assert owners == {p for p, r in roles.items() if r == "master"}
    client.wait(1, 2000)  # in the replicas too, before the stop
    client.close()

    code, out, _ = _cli(state, "services", "stop")
    assert code == 0 and "redis cluster stopped (6 nodes)" in out
    assert RedisCluster.find(state) is None
    code, out, _ = _cli(state, "services", "status")
    assert code == 1 and "redis: stopped" in out
    # one online store per state folder, and one cluster size per state folder
    with pytest.raises(ServiceError, match="holds a cluster of 3 primaries, not 4"):
        RedisCluster(state, shards=4)

    code, out, err = _cli(state, "services", "start", "--cluster", "3")
    assert code == 0 and out.startswith(f"redis cluster started: {address} "), (out, err)
    code, out, _ = _cli(state, "services", "status", "--json")
    after = json.loads(out)
    assert after["ready"] and _roles(after) == roles
    client = connect(address)
    assert [int(client.get(f"restart-probe-{i}")) for i in range(30)] == list(range(30))
    code, _, err = _cli(state, "services", "start")
    assert code == 2 and "Redis Cluster runs for" in err  # the single Redis is refused meanwhile
    client.close()


def test_cluster_client_reads_from_replicas_and_refuses_cross_slot_scripts(cluster_client, redis_cluster):
    """``replica_reads`` spreads reads over primaries and replicas (redis-py's round-robin load
    balancing, its ``read_from_replicas``); a script over two slots is refused
    by the client before it reaches a node (so no half-applied script), one over one hash tag runs."""
    import redis

    reading = connect(redis_cluster.address, replica_reads=True)
    from redis.cluster import LoadBalancingStrategy

    assert reading.load_balancing_strategy is LoadBalancingStrategy.ROUND_ROBIN
    assert connect(redis_cluster.address).load_balancing_strategy is None
    cluster_client.set("{u:1}:a", "1")
    cluster_client.wait(1, 2000)
    assert reading.get("{u:1}:a") == b"1"
    with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
        cluster_client.eval("return 1", 2, "probe-a", "probe-b")
    assert cluster_client.eval("return redis.call('GET', KEYS[1])", 2, "{u:1}:a", "{u:1}:b") == b"1"
    reading.close()


# ---------------------------------------------------------------- the Redis behaviours, on the cluster
# The single-Redis tests of these behaviours take a client and assert on what it holds: they run
# unchanged against a RedisCluster client (the scripts split by slot, reads through cluster pipelines).
def _cases():
    from tests.integration import test_event_bus as bus
    from tests.integration import test_graph_fanout as graph
    from tests.integration import test_stream_processor as sp

    return [
        sp.test_window_counts_for_a_crafted_sequence,
        sp.test_duplicate_event_ids_are_applied_once,
        sp.test_decayed_scores_match_closed_form_for_posts_and_authors,
        sp.test_crashed_consumer_entries_are_reclaimed_without_loss_or_double_count,
        sp.test_social_events_update_the_mixers_keys,
        sp.test_user_recent_is_capped_and_run_stops_on_event,
        sp.test_trending_posts_and_tags_match_the_closed_form_and_coverage_starts_near_the_first_event,
        sp.test_coverage_ignores_stragglers_and_events_from_a_skewed_clock,
        sp.test_the_liveness_stamp_comes_from_the_bus_applied_until,
        bus.test_publish_consume_ack_in_order_and_groups_are_independent,
        bus.test_malformed_entries_go_to_dead_letters_while_valid_ones_flow,
        bus.test_entry_trimmed_while_pending_is_reported_not_lost_silently,
        graph.test_social_events_land_in_both_directions_idempotently,
        graph.test_fanout_pushes_once_caps_the_timeline_and_skips_celebrities,
        graph.test_the_bus_drives_fanout_and_the_reader_honours_deletes_unfollows_blocks_and_mutes,
        graph.test_post_deletes_arrive_on_the_bus_and_are_applied_once,
        graph.test_the_in_network_source_merges_the_pushed_timeline_with_celebrity_pulls,
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda f: f"{f.__module__.rsplit('.', 1)[-1]}::{f.__name__}")
def test_single_redis_behaviour_holds_on_the_cluster(case, cluster_client):
    case(cluster_client)


def test_the_processor_writes_on_the_cluster_exactly_what_it_writes_on_one_redis(redis_client, cluster_client):
    """Random events (out of order, beyond the window, ahead of the clock, duplicate ids within and
    across batches) through ``StreamProcessor.apply_many``: the cluster, where each batch is one
    script call per hash tag, ends with every real-time key equal to one Redis's; a replay applies
    nothing; a batch cut off after some of its parts (a crash between the parts) is completed by
    its redelivery, the parts applied before not applied twice. The mixer's window sums read the
    same from both."""
    import random

    from core import online_layout as keys
    from core.realtime import ENGAGEMENT_KINDS
    from mixer.feature_hydrators.realtime_reader import WindowSumsScript
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.processor import StreamProcessor
    from pipelines.streaming.scripts import EngagementBatchScript
    from tests.integration.test_stream_batch_script import NOW, POSTS, _author, _differ, _dump, _random_events

    rng = random.Random(29)
    meta = {str(p): keys.encode_post_meta(_author(p), 0, rng.sample(range(1, 6), rng.randrange(0, 3))) for p in POSTS}
    procs = {}
    for name, client in (("single", redis_client), ("cluster", cluster_client)):
        client.hset(keys.POST_META, mapping=meta)
        procs[name] = StreamProcessor(client, RedisStreamsBus(client), clock=lambda: NOW)
    assert procs["cluster"]._batch.cluster and not procs["single"]._batch.cluster
    events = _random_events(rng, 400)
    deliveries = [e for e in events for _ in range(2 if rng.random() < 0.1 else 1)]
    batches = [deliveries[i:i + 60] for i in range(0, len(deliveries), 60)]
    for batch in batches:
        got = {name: p.apply_many(batch) for name, p in procs.items()}
        assert got["cluster"] == got["single"]  # per event: applied now or a duplicate, alike
    assert not _differ(_dump(cluster_client, []), _dump(redis_client, []))
    assert procs["cluster"].stats["applied"] == procs["single"].stats["applied"] == len(events)

    before = _dump(cluster_client, [])
    assert not any(any(r is True for r in procs["cluster"].apply_many(b)) for b in batches)  # a replay
    assert not _differ(_dump(cluster_client, []), before)

    # a crash after the post and user parts of a batch: its redelivery applies the rest, once
    more = [e.model_copy(update={"event_id": f"m{i}"}) for i, e in enumerate(_random_events(rng, 80))]
    script = EngagementBatchScript(cluster_client)
    pipe = cluster_client.pipeline(transaction=False)
    for parts, idx, seen_key in script.split(more):
        if parts in ("p", "u"):
            k, a, _ = script.layout([more[i] for i in idx], NOW, 3600, parts=parts, seen_key=seen_key)
            pipe.execute_command("EVALSHA", script.sha, len(k), *k, *a)
    pipe.execute()
    procs["single"].apply_many(more)
    assert any(r is True for r in procs["cluster"].apply_many(more))
    assert not _differ(_dump(cluster_client, []), _dump(redis_client, []))

    bounds, kinds = [(int(NOW) - 86400, int(NOW)), (int(NOW) - 3600, int(NOW))], list(ENGAGEMENT_KINDS)
    single_sums = WindowSumsScript(redis_client)(list(POSTS), bounds, kinds)
    assert single_sums.sum() > 0
    assert (WindowSumsScript(cluster_client)(list(POSTS), bounds, kinds) == single_sums).all()


def test_feast_redis_cluster_store_serves_the_mixers_features(redis_cluster, cluster_client, tmp_path):
    """Feast's online store with ``redis_type: redis_cluster`` (``feast_online_store`` of the
    cluster address): rows written by Feast are read by the mixer's direct reader (one script
    call per node, or slot-routed HMGETs when a node refuses) exactly as the Feast SDK reads them, and the project's materialisation
    writer (``write_views``, routed by slot to each primary) leaves the same values."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.online_layout import FeastRedisLayout
    from core.schema import FEATURE_VIEWS
    from feature_repo import store as fs
    from feature_repo.online_writer import write_views
    from mixer.candidate import Query
    from mixer.feature_hydrators import FeastLayoutFeatureHydrator, FeastSdkFeatureHydrator
    from tests.integration.test_mixer_feast_online import NOW, _candidates, _synthetic_rows

    state = StateDir(tmp_path / "state").ensure()
    store = fs.open_store(state, redis_cluster.address)
    assert str(getattr(store.config.online_store.redis_type, "value", "")) == "redis_cluster"
    rows = _synthetic_rows(np.random.default_rng(11))
    for spec in FEATURE_VIEWS:
        pq.write_table(pa.Table.from_pandas(rows[spec.name], preserve_index=False), state.table(spec.table),
                       coerce_timestamps="us")
    fs.apply(store, state.tables)
    for spec in FEATURE_VIEWS:
        store.write_to_online_store(spec.name, rows[spec.name])
    direct = FeastLayoutFeatureHydrator(cluster_client, FeastRedisLayout("home_mixer"))
    query = Query(user_id=3, page_size=20, now_s=NOW.timestamp(), request_id="t")
    cands = _candidates([5, 180, 5, 77, 151, 2, 199, 40, 13, 44, 26])
    by_feast = direct.hydrate(query, cands)
    pd.testing.assert_frame_equal(by_feast, FeastSdkFeatureHydrator(store).hydrate(query, cands), check_exact=True)
    assert by_feast["user_register_days"].notna().all() and by_feast["post_created_ts"].notna().any()

    # the fast path: one hmget_node.lua call per primary holding keys, no HMGET sent on its own
    cluster_client.config_resetstat(target_nodes="primaries")
    pd.testing.assert_frame_equal(direct.hydrate(query, cands), by_feast, check_exact=True)
    stats = [cluster_client.get_redis_connection(n).info("commandstats") for n in cluster_client.get_primaries()]
    assert 1 <= sum(s.get("cmdstat_evalsha", {}).get("calls", 0) for s in stats) <= len(stats)
    assert sum(s.get("cmdstat_hmget", {}).get("calls", 0) for s in stats) > 11  # inside the scripts
    # a primary without the script (restarted, failed over) gets it loaded; a stale slot map (a slot
    # moved) makes a node refuse a key it does not own: the reads go slot-routed, same values
    for node in cluster_client.get_primaries():
        cluster_client.get_redis_connection(node).script_flush()
    pd.testing.assert_frame_equal(direct.hydrate(query, cands), by_feast, check_exact=True)
    user_key = FeastRedisLayout("home_mixer").key("user_features", user_id=3)
    slot = cluster_client.keyslot(user_key)
    right = cluster_client.nodes_manager.slots_cache[slot][0]
    cluster_client.nodes_manager.slots_cache[slot] = [
        next(n for n in cluster_client.get_primaries() if n.name != right.name)]
    pd.testing.assert_frame_equal(direct.hydrate(query, cands), by_feast, check_exact=True)
    cluster_client.nodes_manager.initialize()

    cluster_client.flushall(target_nodes="primaries")
    assert direct.hydrate(query, cands)["post_created_ts"].isna().all()
    written = write_views(cluster_client, state.tables, (NOW - pd.Timedelta(days=30)).to_pydatetime(),
                          (NOW + pd.Timedelta(seconds=1)).to_pydatetime(), batch_keys=37)
    assert sum(w.rows for w in written) > 0
    pd.testing.assert_frame_equal(direct.hydrate(query, cands), by_feast, check_exact=True)


def test_routed_pipelines_follow_a_moved_slot_and_apply_each_write_once(cluster_client):
    """The slot-routed pipeline and ``cluster_read`` send each command to the primary their slot map
    names; with a stale map (as after a resharding) the node answers MOVED, the command is sent
    again through redis-py's ClusterPipeline, which follows it: each write applied once. Keyless
    commands take redis-py's routing."""
    from core.online_store import SlotRoutedPipeline, cluster_read

    key, other = "{u:42}:probe", "{u:7}:probe"
    slot = cluster_client.keyslot(key)
    right = cluster_client.nodes_manager.slots_cache[slot][0]
    wrong = next(n for n in cluster_client.get_primaries() if n.name != right.name)
    cluster_client.nodes_manager.slots_cache[slot] = [wrong]  # stale: the slot "moved" to `right`
    pipe = cluster_client.pipeline()
    assert isinstance(pipe, SlotRoutedPipeline)
    pipe.incr(key)
    pipe.set(other, "x")
    pipe.execute_command("TIME")
    got = pipe.execute()
    assert got[:2] == [1, True] and len(got[2]) == 2
    cluster_client.nodes_manager.slots_cache[slot] = [wrong]
    assert cluster_read(cluster_client, [("GET", key), ("GET", other)]) == [b"1", b"x"]
    assert int(cluster_client.get(key)) == 1
    with pytest.raises(ValueError, match="single-key commands"):
        cluster_read(cluster_client, [("MGET", key, other)])
    bad = cluster_client.pipeline()
    bad.incr(other)  # "x" is not an integer: a command error, raised after the others ran
    bad.set(key, "2")
    with pytest.raises(Exception, match="not an integer"):
        bad.execute()
    assert cluster_client.get(key) == b"2"


# ---------------------------------------------------------------- the mixer on the cluster (last: it keeps its data)
@pytest.fixture(scope="module")
def cluster_mixer(redis_cluster, data_dir, known_users, tmp_path_factory):
    """A mixer (``python -m mixer.api``) on the cluster address: the candidate index built into the
    cluster, tiny real rankers in MLflow, and the known users' features written by Feast's
    ``redis_cluster`` online store (``test_mixer_api``'s served state, on the cluster)."""
    from core.schema import FEATURE_VIEWS
    from feature_repo import store as fs
    from pipelines.candidate_index import build_candidate_index
    from tests.integration.test_mixer_api import AS_OF, _canonical, _latest_rows, _train_rankers, serve_mixer

    state = StateDir(tmp_path_factory.mktemp("cluster_mixer_state")).ensure()
    client = connect(redis_cluster.address)
    client.flushall(target_nodes="primaries")
    build_candidate_index(state, redis_cluster.address, AS_OF, tables=_canonical(data_dir))
    frame = _train_rankers(data_dir, state)
    store = fs.open_store(state, redis_cluster.address)
    fs.apply(store, state.tables)
    scoped = frame[frame.user_id.isin(known_users)]
    for spec in FEATURE_VIEWS:
        store.write_to_online_store(spec.name, _latest_rows(frame if spec.join_keys == ("post_id",) else scoped, spec))
    yield from serve_mixer(state, redis_cluster.address, client)


def test_the_mixer_answers_from_the_cluster(cluster_mixer, known_users, data_dir):
    """``POST /v1/home-timeline`` on the cluster store: ``test_mixer_api``'s checks of a known
    user's ranked, diverse page (features, served record and impression log on the cluster), of the
    cursor's next page, and of a cold-start user; nothing degraded."""
    from tests.integration import test_mixer_api as api

    api.test_known_user_gets_a_ranked_diverse_page(cluster_mixer, known_users, data_dir)
    api.test_next_page_via_cursor_has_no_repeats(cluster_mixer, known_users)
    api.test_cold_start_user_gets_popular_posts(cluster_mixer)
    http, _ = cluster_mixer
    page = http.post("/v1/home-timeline", json={"user_id": known_users[2], "limit": 20}).json()
    assert page["degraded"] == [] and len(page["items"]) == 20

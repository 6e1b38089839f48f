"""Which node the HA set treats as its primary when its Sentinels disagree (right after a
failover the leader has switched and the others have not yet heard its new epoch)."""
from __future__ import annotations

from core.state import StateDir
from core.services import RedisHA, _last_monitored_port


def _sentinel_config(path, port: int, epoch: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["port 26379", f"sentinel monitor home-mixer 127.0.0.1 {port} 2"]
    if epoch is not None:
        lines.append(f"sentinel config-epoch home-mixer {epoch}")
    path.write_text("\n".join(lines) + "\n")


def test_the_newest_epoch_names_the_primary_among_live_sentinels(tmp_path, monkeypatch):
    ha = RedisHA(StateDir(tmp_path).ensure())
    # a stale Sentinel answers first: before, its (old) port won; the leader's epoch must
    monkeypatch.setattr(RedisHA, "sentinel_views", lambda self: [(3, 7001), (4, 7002), (3, 7001)])
    assert ha.primary_port() == 7002


def test_sentinel_configs_are_read_with_their_epoch(tmp_path):
    config = tmp_path / "s.conf"
    _sentinel_config(config, 7001, 5)
    assert _last_monitored_port(config) == (5, 7001)
    _sentinel_config(config, 7002, None)  # a config never rewritten by a failover has no epoch
    assert _last_monitored_port(config) == (0, 7002)
    assert _last_monitored_port(tmp_path / "missing.conf") is None
    config.write_text("sentinel monitor home-mixer 127.0.0.1 not-a-port 2\n")
    assert _last_monitored_port(config) is None


def test_with_nothing_running_the_newest_config_names_the_primary(tmp_path, monkeypatch):
    ha = RedisHA(StateDir(tmp_path).ensure())
    nodes = ha.nodes()
    for node, port in zip(nodes, (7001, 7002)):
        node.port = port
    monkeypatch.setattr(RedisHA, "nodes", lambda self: nodes)
    sentinels = ha.sentinels()
    # sentinel 1 was down during the failover; 2 and 3 rewrote their configs at epoch 1
    _sentinel_config(sentinels[0].config_file, 7001, None)
    _sentinel_config(sentinels[1].config_file, 7002, 1)
    _sentinel_config(sentinels[2].config_file, 7002, 1)
    assert ha.sentinel_views() == []  # none runs
    assert ha.primary_port() == 7002

"""The front door's settings and generated HAProxy config: validation with clear errors, the
per-replica bound against the mixer's in-flight bound, and a config Debian's haproxy 2.6 accepts
(``haproxy -c``, the binary's own parser)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from core.services import ServiceError
from mixer.config import ConfigError, default_config_text, load_config
from mixer.haproxy import (BACKEND, Backend, FrontDoorSettings, check_config, parse_stats_csv,
                           render_config)

needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None,
                                   reason="haproxy not on PATH: install Debian's haproxy (scripts/setup.sh does it)")

BACKENDS = [Backend("mixer-replica-1", "127.0.0.1", 41001), Backend("mixer-replica-2", "127.0.0.1", 41002)]


def _config(settings: FrontDoorSettings | None = None, maxconn: int = 1) -> str:
    return render_config(settings or FrontDoorSettings(), BACKENDS, bind_host="127.0.0.1", port=40000,
                         stats_port=40001, maxconn=maxconn)


def _lines(text: str, section: str) -> list[str]:
    """The lines of one config section (``backend mixers``, ``defaults``...), stripped."""
    out, inside = [], False
    for line in text.splitlines():
        if line and not line.startswith(" "):
            inside = line.strip() == section
            continue
        if inside and line.strip():
            out.append(line.strip())
    return out


def test_the_embedded_defaults_are_the_documented_ones():
    """``mixer.yaml``'s front_door section states every default of ``FrontDoorSettings``."""
    written = yaml.safe_load(default_config_text())["front_door"]
    assert FrontDoorSettings.model_validate(written) == FrontDoorSettings()
    assert set(written) == set(FrontDoorSettings.model_fields)
    assert set(written["health"]) == set(FrontDoorSettings.model_fields["health"].annotation.model_fields)


def test_maxconn_per_replica_stays_within_the_mixers_bound(tmp_path):
    cfg = load_config()
    # default: the mixer's max_concurrent (every waiting request queues in HAProxy)
    assert cfg.front_door.maxconn(cfg.overload.max_in_flight, cfg.overload.max_concurrent) == 1
    assert FrontDoorSettings(maxconn_per_replica=3).maxconn(3, 1) == 3
    assert FrontDoorSettings().maxconn(0, 2) == 2  # no bound: max_concurrent
    assert FrontDoorSettings().maxconn(1, 2) == 1  # never above the bound
    with pytest.raises(ValueError, match="above overload.max_in_flight"):
        FrontDoorSettings(maxconn_per_replica=4).maxconn(3, 1)
    path = tmp_path / "m.yaml"
    path.write_text("front_door:\n  maxconn_per_replica: 4\n")
    with pytest.raises(ConfigError, match=r"front_door.maxconn_per_replica is 4, above overload.max_in_flight \(3\)"):
        load_config(path)
    path.write_text("front_door:\n  maxconn_per_replica: 4\noverload:\n  max_in_flight: 4\n")
    assert load_config(path).front_door.maxconn_per_replica == 4


@pytest.mark.parametrize("text, needle", [
    ("front_door:\n  retry_on: [conn-failure, on-crash]\n", "front_door.retry_on"),
    ("front_door:\n  retry_on: []\n", "front_door.retry_on"),
    ("front_door:\n  balance: random\n", "front_door.balance"),
    ("front_door:\n  max_queue: 0\n", "front_door.max_queue"),
    ("front_door:\n  health:\n    path: healthz\n", "front_door.health.path"),
    ("front_door:\n  health:\n    intervall_ms: 5\n", "front_door.health.intervall_ms"),
])
def test_bad_front_door_values_name_the_key(tmp_path, text, needle):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(path)


def test_the_config_queues_retries_checks_and_exports():
    text = _config(maxconn=2)
    backend, defaults = _lines(text, f"backend {BACKEND}"), _lines(text, "defaults")
    assert "option httpchk GET /healthz" in backend and "http-check expect status 200" in backend
    server_defaults = next(line for line in backend if line.startswith("default-server"))
    for part in ("check", "maxconn 2", "fall 2", "rise 2", "inter 1000ms", "observe layer4 error-limit 1 on-error mark-down"):
        assert part in server_defaults, (part, server_defaults)
    assert [line for line in backend if line.startswith("server ")] == [
        "server mixer-replica-1 127.0.0.1:41001", "server mixer-replica-2 127.0.0.1:41002"]
    assert any(line.startswith("http-request return status 503") and line.endswith("if { queue() ge 64 }")
               and "hdr Retry-After 1" in line for line in backend)
    assert "timeout queue 1000ms" in defaults
    assert "option http-buffer-request" in defaults  # a request is retried only if held whole
    for line in ("retries 3", "retry-on conn-failure empty-response", "option redispatch 1"):
        assert line in backend
    # the retry tier: a replica's reset (which HAProxy 2.6 does not retry) comes back a 502 from
    # the replica tier, retried here; both tiers meet on one abstract socket named by the port
    retry, inner = _lines(text, "backend retry"), _lines(text, "frontend replica_tier")
    assert "retry-on conn-failure empty-response 502" in retry and "retries 3" in retry
    assert any(line.startswith("option http-server-close") for line in retry)  # first on its connection
    assert "server replicas abns@home-mixer-front-door-40000" in retry
    assert "bind abns@home-mixer-front-door-40000" in inner and f"default_backend {BACKEND}" in inner
    stats = _lines(text, "frontend stats")
    assert "bind 127.0.0.1:40001" in stats
    assert "http-request use-service prometheus-exporter if { path /metrics }" in stats
    front = _lines(text, "frontend mixer")
    assert "bind 127.0.0.1:40000" in front and "default_backend retry" in front
    assert "http-request set-header X-Request-Start t=%[date(0,us)]" in front  # mixer.admission.upstream_wait_s
    no_observe = _config(FrontDoorSettings.model_validate({"health": {"error_limit": 0}}))
    assert "observe" not in no_observe


def test_render_refuses_no_or_duplicate_replicas():
    with pytest.raises(ValueError, match="at least one"):
        render_config(FrontDoorSettings(), [], bind_host="127.0.0.1", port=1, stats_port=2, maxconn=1)
    with pytest.raises(ValueError, match="distinct"):
        render_config(FrontDoorSettings(), [BACKENDS[0], BACKENDS[0]], bind_host="127.0.0.1", port=1,
                      stats_port=2, maxconn=1)


@needs_haproxy
def test_haproxy_accepts_the_generated_config(tmp_path):
    """Debian's haproxy parses every variant: defaults, other keywords, no observing."""
    for settings in (FrontDoorSettings(),
                     FrontDoorSettings.model_validate({"balance": "roundrobin", "retry_on": ["all-retryable-errors"],
                                                       "redispatch_every": 0, "health": {"error_limit": 0}})):
        path = tmp_path / "front-door.cfg"
        path.write_text(_config(settings))
        check_config(path)


@needs_haproxy
def test_a_config_haproxy_rejects_is_an_error_with_its_message(tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text(_config().replace("balance leastconn", "balance fastest"))
    with pytest.raises(ServiceError, match=r"bad.cfg:\d+\] : balance only supports"):
        check_config(path)


def test_stats_csv_rows():
    text = ("# pxname,svname,qcur,qmax,scur,status,check_status\n"
            "mixer,FRONTEND,,,3,OPEN,\n"
            "mixers,mixer-replica-1,0,2,1,UP,L7OK\n"
            "mixers,mixer-replica-2,0,0,0,DOWN,L7STS\n"
            "mixers,BACKEND,4,9,1,UP,\n")
    rows = parse_stats_csv(text)
    assert [(r["svname"], r["status"], r["check_status"]) for r in rows if r["pxname"] == "mixers"] == [
        ("mixer-replica-1", "UP", "L7OK"), ("mixer-replica-2", "DOWN", "L7STS"), ("BACKEND", "UP", "")]
    with pytest.raises(ValueError, match="not HAProxy stats CSV"):
        parse_stats_csv("<html>")


@pytest.mark.parametrize("argv, needle", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2", "--workers", "2"], "--workers does not combine with --replicas"),
])
def test_the_cli_refuses_bad_replica_flags_before_starting_anything(tmp_path, monkeypatch, capsys, argv, needle):
    from home_mixer.cli import main

    monkeypatch.setenv("HOME_MIXER_STATE", str(tmp_path))
    assert main(["--state", str(tmp_path), "serve", "mixer", "start", *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.json"))

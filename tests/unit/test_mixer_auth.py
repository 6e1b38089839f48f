"""Bearer-token authentication of the mixer API (``mixer/auth.py``): 401 without a token, 403 with a
wrong one, any of several tokens accepted, ``/healthz`` open, ``/metrics`` per config, the state
folder's generated token, and tokens never in logs or error messages.

The app runs on a stub pipeline (no Redis, no models), as in ``test_mixer_api.py``.
"""

from __future__ import annotations

import logging
import stat
from types import SimpleNamespace

import pytest
import redis
from fastapi.testclient import TestClient

from core.state import StateDir
from mixer.api import create_app
from mixer.auth import (TOKENS_ENV, AuthConfigError, TokenVerifier, accepted_tokens, auth_headers, client_token,
                        state_token, state_token_path)
from mixer.config import ConfigError, load_config, parse_config
from tests.unit.test_mixer_api import StubPipeline

OLD = "old-token-0123456789abcdef"
NEW = "new-token-fedcba9876543210"
PATH = "/v1/home-timeline"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _app(config=None, tokens=(OLD, NEW), pipeline=None):
    app = create_app(config or load_config(), api_tokens=tokens)
    resources = SimpleNamespace(pipeline=pipeline or StubPipeline(),
                                client=SimpleNamespace(ping=lambda: True, hget=lambda *a: None))
    resources.pipeline.model_versions = {}
    app.state.resources = resources
    return TestClient(app)


@pytest.fixture(autouse=True)
def _no_env_tokens(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    monkeypatch.setenv("HOME_MIXER_STATE", str(tmp_path / "state"))
    for name in ("mixer.api", "mixer.auth"):  # an earlier import's logging.config may have disabled them
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)


def test_no_token_is_401_with_a_bearer_challenge():
    http = _app()
    for headers in ({}, {"Authorization": f"Basic {OLD}"}, {"Authorization": "Bearer"}, {"Authorization": OLD}):
        r = http.post(PATH, json={"user_id": 1}, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in r.json()["message"]


def test_wrong_token_is_403():
    http = _app()
    for token in ("wrong-token-0123456789abcdef", OLD[:-1], OLD + "x", OLD.upper()):
        r = http.post(PATH, json={"user_id": 1}, headers=bearer(token))
        assert r.status_code == 403, (token, r.text)
        assert r.json()["message"] and token not in r.text
    r = http.post(PATH, json={"user_id": 1}, headers={"Authorization": ("Bearer " + "é" * 20).encode()})
    assert r.status_code == 403, r.text  # bytes beyond ASCII are just another wrong token


def test_any_configured_token_is_accepted_so_keys_rotate():
    http = _app()
    for token in (OLD, NEW):
        r = http.post(PATH, json={"user_id": 1}, headers=bearer(token))
        assert r.status_code == 200, r.text


def test_auth_comes_before_body_validation():
    http = _app()
    assert http.post(PATH, json={"user_id": False}).status_code == 401
    assert http.post(PATH, json={"user_id": False}, headers=bearer("x" * 20)).status_code == 403
    assert http.post(PATH, json={"user_id": False}, headers=bearer(OLD)).status_code == 422


def test_healthz_is_open_and_metrics_are_open_by_default():
    http = _app()
    assert http.get("/healthz").status_code == 200
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_metrics_can_be_protected():
    http = _app(load_config().with_overrides(auth={"protect_metrics": True}))
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers=bearer("x" * 20)).status_code == 403
    assert http.get("/metrics", headers=bearer(NEW)).status_code == 200
    assert http.get("/healthz").status_code == 200
    spec = http.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert spec["security"] == [{"bearer": []}] and {"401", "403"} <= set(spec["responses"])


def test_disabled_auth_serves_without_a_token_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="mixer.api"):
        http = _app(load_config().with_overrides(auth={"enabled": False}), tokens=None)
    assert "AUTHENTICATION IS OFF" in caplog.text
    assert http.post(PATH, json={"user_id": 1}).status_code == 200
    assert "security" not in http.get("/openapi.json").json()["paths"][PATH]["post"]


def test_tokens_never_reach_the_logs(caplog):
    class FailingPipeline(StubPipeline):
        def run(self, *args, **kwargs):
            raise redis.ConnectionError("Redis went away")

    http = _app(pipeline=FailingPipeline())
    wrong = "wrong-secret-0123456789abcdef"
    with caplog.at_level(logging.DEBUG):
        assert http.post(PATH, json={"user_id": 1}).status_code == 401
        assert http.post(PATH, json={"user_id": 1}, headers=bearer(wrong)).status_code == 403
        assert http.post(PATH, json={"user_id": True}, headers=bearer(OLD)).status_code == 422
        assert http.post(PATH, json={"user_id": 1}, headers=bearer(OLD)).status_code == 503
    assert "rejected" in caplog.text and "Redis" in caplog.text  # the failures were logged ...
    for token in (OLD, NEW, wrong):
        assert token not in caplog.text  # ... without a token


def test_token_verifier_compares_against_every_token():
    v = TokenVerifier([OLD, NEW])
    assert v.accepts(OLD) and v.accepts(NEW)
    assert not v.accepts("") and not v.accepts(OLD[:8]) and not v.accepts(OLD + NEW)
    with pytest.raises(ValueError):
        TokenVerifier([])


def test_config_and_env_tokens_merge(monkeypatch, tmp_path):
    settings = load_config().with_overrides(auth={"tokens": [OLD]}).auth
    assert accepted_tokens(settings) == (OLD,)
    monkeypatch.setenv(TOKENS_ENV, f" {NEW} ,, {OLD}")
    assert accepted_tokens(settings) == (OLD, NEW)
    assert client_token() == NEW  # clients send the first one of the environment
    assert not state_token_path(StateDir.from_env()).exists()  # configured tokens: no generated one


def test_state_token_is_generated_private_and_shared_with_clients(tmp_path):
    state = StateDir(tmp_path / "s")
    tokens = accepted_tokens(load_config().auth, state)
    path = state_token_path(state)
    assert len(tokens) == 1 and len(tokens[0]) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state_token(state) == tokens[0] == client_token(state)
    assert auth_headers(state) == bearer(tokens[0])
    assert accepted_tokens(load_config().with_overrides(auth={"enabled": False}).auth, state) == ()
    path.chmod(0o644)
    with pytest.raises(AuthConfigError, match="chmod 600"):
        state_token(state)


def test_unusable_tokens_are_refused_without_echoing_them(monkeypatch):
    monkeypatch.setenv(TOKENS_ENV, "short-secret")
    with pytest.raises(AuthConfigError, match=TOKENS_ENV) as e:
        accepted_tokens(load_config().auth)
    assert "short-secret" not in str(e.value)
    monkeypatch.delenv(TOKENS_ENV)
    with pytest.raises(ConfigError, match="auth.tokens") as e:
        parse_config({**_embedded(), "auth": {"tokens": ["has space in-it-0123456789"]}})
    assert "space in-it" not in str(e.value)


def test_config_tokens_are_secret_in_dumps_and_reprs():
    config = load_config().with_overrides(auth={"tokens": [OLD]})
    assert OLD not in repr(config) and OLD not in str(config.model_dump()) and OLD not in config.model_dump_json()
    assert config.auth.tokens[0].get_secret_value() == OLD


def _embedded() -> dict:
    import yaml

    from mixer.config import default_config_text

    return yaml.safe_load(default_config_text())

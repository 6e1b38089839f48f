"""The HTTP contract of ``POST /v1/home-timeline`` without servers: request validation (strict
JSON integers for ``user_id``, ``limit`` and ``surface``), the response echo and the OpenAPI schema
(every status documented). Authentication: ``tests/unit/test_mixer_auth.py``.

The app's resources are a stub pipeline (no Redis, no models): the lifespan does not run without
``with TestClient(...)``, so ``app.state.resources`` is set by hand.
"""

from __future__ import annotations

import dataclasses
import time

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from core.schema import HOME_SURFACE, KNOWN_SURFACES
from mixer.api import create_app
from mixer.candidate import Query
from mixer.components import TimelineResult
from mixer.config import load_config
from mixer.pipeline import HomeTimelinePipeline
from mixer.selectors import PageCursor


class StubPipeline:
    """Runs nothing: records the arguments and returns an empty page with the query they make
    (it takes ``total_ms`` of wall time, its ``total`` stage time)."""

    def __init__(self, total_ms: float = 0.0):
        self.calls: list[dict] = []
        self.total_ms = total_ms

    def run(self, user_id, page_size=None, cursor=None, surface=HOME_SURFACE, quality_factor=1.0):
        self.calls.append({"user_id": user_id, "page_size": page_size, "cursor": cursor, "surface": surface,
                           "quality_factor": quality_factor})
        time.sleep(self.total_ms / 1000.0)
        query = Query(user_id=user_id, page_size=page_size, now_s=0.0, request_id="r", surface=surface, arm="control",
                      quality_factor=quality_factor)
        return TimelineResult(query=query, items=[], next_cursor=None, timings_ms={"total": self.total_ms},
                              source_results=[], filtered={}, counts={}, model_versions={}, scoring_paths={})


TOKEN = "unit-test-token-0123456789"


@pytest.fixture()
def api():
    app = create_app(load_config(), api_tokens=(TOKEN,))
    pipeline = StubPipeline()
    app.state.resources = SimpleNamespace(pipeline=pipeline)
    return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}), pipeline


def test_surface_defaults_to_home_and_is_echoed(api):
    http, pipeline = api
    r = http.post("/v1/home-timeline", json={"user_id": 1})
    assert r.status_code == 200, r.text
    assert r.json()["surface"] == HOME_SURFACE == 1
    assert pipeline.calls[-1]["surface"] == HOME_SURFACE


@pytest.mark.parametrize("surface", [*KNOWN_SURFACES, 3, 99])  # unknown ids are valid, ranked as "other"
def test_given_surface_reaches_the_pipeline_and_is_echoed(api, surface):
    http, pipeline = api
    r = http.post("/v1/home-timeline", json={"user_id": 1, "surface": surface})
    assert r.status_code == 200, r.text
    assert r.json()["surface"] == surface
    assert pipeline.calls[-1]["surface"] == surface and type(pipeline.calls[-1]["surface"]) is int


@pytest.mark.parametrize("surface", [True, False, -1, "1", 1.0, 1.5, None, [1]])
def test_surface_is_strictly_a_non_negative_int(api, surface):
    http, pipeline = api
    r = http.post("/v1/home-timeline", json={"user_id": 1, "surface": surface})
    assert r.status_code == 422, (surface, r.text)
    assert "surface" in r.json()["message"]
    assert not pipeline.calls


@pytest.mark.parametrize("body, field", [
    ({"user_id": False}, "user_id"),  # the user's report: a bool was served as user 0
    ({"user_id": True}, "user_id"),
    ({"user_id": "1"}, "user_id"),
    ({"user_id": 1.0}, "user_id"),
    ({"user_id": -1}, "user_id"),
    ({"user_id": 2**63}, "user_id"),  # past int64
    ({"user_id": 1, "limit": True}, "limit"),
    ({"user_id": 1, "limit": "5"}, "limit"),
    ({"user_id": 1, "limit": 5.0}, "limit"),
    ({"user_id": 1, "cursor": 7}, "cursor"),
    ({"user_id": 1, "cursor": "x" * 70_000}, "cursor"),
])
def test_ids_and_sizes_are_strict_json_integers(api, body, field):
    http, pipeline = api
    r = http.post("/v1/home-timeline", json=body)
    assert r.status_code == 422, (body, r.text[:300])
    assert field in r.json()["message"]
    assert not pipeline.calls


def test_largest_int64_user_id_is_accepted(api):
    http, pipeline = api
    r = http.post("/v1/home-timeline", json={"user_id": 2**63 - 1, "limit": 3})
    assert r.status_code == 200, r.text
    assert pipeline.calls[-1]["user_id"] == 2**63 - 1 and pipeline.calls[-1]["page_size"] == 3


@pytest.mark.parametrize("content, status", [
    (b"{not json", 422),          # FastAPI's JSON decode error
    (b'{"user_id": 1', 422),
    (b"\xff\xfe\x00", 400),       # not UTF-8: the body cannot be read at all
])
def test_unreadable_bodies_are_documented_errors(api, content, status):
    http, pipeline = api
    r = http.post("/v1/home-timeline", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["message"]
    assert not pipeline.calls


def test_openapi_documents_every_status_and_the_metrics_content_type(api):
    http, _ = api
    spec = http.get("/openapi.json").json()
    timeline = spec["paths"]["/v1/home-timeline"]["post"]
    assert set(timeline["responses"]) == {"200", "400", "401", "403", "422", "503"}
    assert timeline["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"] == {**spec["components"]["securitySchemes"]["bearer"],
                                                              "type": "http", "scheme": "bearer"}
    link = timeline["responses"]["200"]["links"]["NextPage"]
    assert link["operationId"] == timeline["operationId"]
    assert link["requestBody"]["cursor"] == "$response.body#/next_cursor"
    user_id = spec["components"]["schemas"]["TimelineRequest"]["properties"]["user_id"]
    assert (user_id["type"], user_id["minimum"], user_id["maximum"]) == ("integer", 0, 2**63 - 1)
    metrics = spec["paths"]["/metrics"]["get"]["responses"]
    assert set(metrics["200"]["content"]) == {"text/plain"}
    assert "security" not in spec["paths"]["/metrics"]["get"]  # open by default (auth.protect_metrics)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "503" in spec["paths"]["/healthz"]["get"]["responses"]


def test_openapi_documents_surface(api):
    http, _ = api
    schema = http.get("/openapi.json").json()["components"]["schemas"]
    field = schema["TimelineRequest"]["properties"]["surface"]
    assert field["type"] == "integer" and field["default"] == HOME_SURFACE and field["minimum"] == 0
    assert "tab" in field["description"] and "other" in field["description"]
    assert "surface" in schema["TimelineResponse"]["required"]


def test_pipeline_run_puts_the_surface_on_the_query():
    """``HomeTimelinePipeline.run`` validates the surface and carries it on ``Query`` (Python callers)."""
    seen = []

    class Runner:
        def run(self, query):
            seen.append(query)
            return query

    pipeline = HomeTimelinePipeline.__new__(HomeTimelinePipeline)
    pipeline._serving = SimpleNamespace(runner=Runner(), config=load_config())
    assert pipeline.run(1, 5).surface == HOME_SURFACE
    assert pipeline.run(1, 5, PageCursor(1, (7,)), surface=6).surface == 6
    for bad, error in ((True, TypeError), (-2, ValueError), (1.0, TypeError)):
        with pytest.raises(error, match="surface"):
            pipeline.run(1, 5, surface=bad)
    assert len(seen) == 2


def test_slow_requests_lower_the_quality_factor_of_the_next_ones():
    """The worker's p95 over target (timed from arrival): the next requests run with less work and the
    response says so."""
    config = load_config().with_overrides(quality_factor={"target_p95_ms": 50, "step": 0.25, "min_factor": 0.5,
                                                          "window": 10, "update_every": 2})
    app = create_app(config, api_tokens=(TOKEN,))
    pipeline = StubPipeline(total_ms=60.0)
    app.state.resources = SimpleNamespace(pipeline=pipeline)
    http = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    factors = [http.post("/v1/home-timeline", json={"user_id": 1}).json()["quality_factor"] for _ in range(6)]
    assert factors == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5]
    assert [c["quality_factor"] for c in pipeline.calls] == factors
    assert "hm_mixer_quality_factor 0.5" in http.get("/metrics").text


class DegradedStubPipeline(StubPipeline):
    """An empty page whose candidate sources all failed open."""

    def run(self, *args, **kwargs):
        result = super().run(*args, **kwargs)
        return dataclasses.replace(result, degraded=["candidate_sources"])


def test_an_empty_degraded_page_is_503_and_counted_unavailable_not_degraded():
    """Every stage failed open and nothing was left to serve: not a 200 with no posts. The request
    metrics (run inside the pipeline) and the answer agree."""
    from mixer.metrics import MixerMetrics
    from mixer.side_effects import RequestMetricsSideEffect

    app = create_app(load_config(), api_tokens=(TOKEN,))
    app.state.resources = SimpleNamespace(pipeline=DegradedStubPipeline())
    http = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    r = http.post("/v1/home-timeline", json={"user_id": 1})
    assert r.status_code == 503
    assert "no candidates could be served" in r.json()["message"] and "candidate_sources" in r.json()["message"]

    metrics = MixerMetrics()
    effect = RequestMetricsSideEffect(metrics)
    empty = DegradedStubPipeline().run(1, 10)
    effect.apply(empty)
    effect.apply(dataclasses.replace(empty, degraded=[]))  # an empty page of a healthy request: ok
    assert metrics.registry.get_sample_value("hm_mixer_requests_total", {"status": "unavailable"}) == 1
    assert metrics.registry.get_sample_value("hm_mixer_requests_total", {"status": "degraded"}) is None
    assert metrics.registry.get_sample_value("hm_mixer_requests_total", {"status": "ok"}) == 1


@pytest.mark.parametrize("section,threshold,frozen", [
    ({}, (20_000, 50, 100), True),  # the embedded defaults
    ({"thresholds": None, "freeze_at_start": False}, None, False),  # Python's own, left alone
])
def test_start_up_sets_the_collector_as_configured(monkeypatch, section, threshold, frozen):
    import gc

    from mixer import api as api_module

    closed = []
    monkeypatch.setattr(api_module, "open_resources", lambda *a, **k: SimpleNamespace(
        pipeline=SimpleNamespace(model_versions={}), close=lambda: closed.append(1)))
    data = load_config().model_dump(mode="json")
    data["gc"] = {**data["gc"], **section}
    from mixer.config import MixerConfig

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()  # whatever an earlier test froze: the count below is this start-up's
    try:
        with TestClient(create_app(MixerConfig.model_validate(data), api_tokens=(TOKEN,))):
            assert gc.get_threshold() == (threshold or (700, 10, 10))
            assert (gc.get_freeze_count() > 0) == frozen
        assert closed == [1]
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_collector_thresholds_must_be_positive():
    from pydantic import ValidationError

    from mixer.config import GcSettings

    with pytest.raises(ValidationError, match="gc.thresholds must be three integers >= 1"):
        GcSettings(thresholds=(0, 10, 10))
    with pytest.raises(ValidationError):
        GcSettings(thresholds=(700, 10))

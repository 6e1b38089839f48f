"""The HTTP contract of ``POST /v1/home-timeline`` without servers: request validation (the
``surface`` field's strict typing and default), the response echo and the OpenAPI schema.

The app's resources are a stub pipeline (no Redis, no models): the lifespan does not run without
``with TestClient(...)``, so ``app.state.resources`` is set by hand.
"""

from __future__ import annotations

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
    """Runs nothing: records the arguments and returns an empty page with the query they make."""

    def __init__(self):
        self.calls: list[dict] = []

    def run(self, user_id, page_size=None, cursor=None, surface=HOME_SURFACE):
        self.calls.append({"user_id": user_id, "page_size": page_size, "cursor": cursor, "surface": surface})
        query = Query(user_id=user_id, page_size=page_size, now_s=0.0, request_id="r", surface=surface, arm="control")
        return TimelineResult(query=query, items=[], next_cursor=None, timings_ms={}, source_results=[],
                              filtered={}, counts={}, model_versions={}, scoring_paths={})


@pytest.fixture()
def api():
    app = create_app(load_config())
    pipeline = StubPipeline()
    app.state.resources = SimpleNamespace(pipeline=pipeline)
    return TestClient(app), pipeline


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
    pipeline.config = load_config()
    pipeline._serving = SimpleNamespace(runner=Runner())
    assert pipeline.run(1, 5).surface == HOME_SURFACE
    assert pipeline.run(1, 5, PageCursor(1, (7,)), surface=6).surface == 6
    for bad, error in ((True, TypeError), (-2, ValueError), (1.0, TypeError)):
        with pytest.raises(error, match="surface"):
            pipeline.run(1, 5, surface=bad)
    assert len(seen) == 2

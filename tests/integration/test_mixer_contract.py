"""The mixer's API contract, checked by schemathesis against the live server.

The mixer of ``test_mixer_api.py`` (a real uvicorn process on real Redis, KuaiRand candidate index,
tiny real rankers; the fixtures are reused) is fuzzed from its own ``/openapi.json``: valid and
invalid requests to every operation, with the state folder's bearer token. Every response must be
documented: no 5xx, a status and a content type the OpenAPI lists, a body that matches its schema.
Then schemathesis's stateful testing follows the OpenAPI link ``NextPage`` (``next_cursor`` ->
``cursor``) and every chain of pages must be free of repeated posts.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from mixer.auth import auth_headers
from tests.integration.test_mixer_api import known_users, mixer_server, mixer_state  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# invalid input must be refused (4xx), not served: `{"user_id": false}` once came back as user 0
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]
EXAMPLES = {"POST /v1/home-timeline": 100}  # other operations take no input: a few calls each
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(mixer_server, mixer_state):
    """(the live mixer's loaded OpenAPI schema, its base URL, the auth headers)."""
    http, _ = mixer_server
    base = str(http.base_url).rstrip("/")
    headers = auth_headers(mixer_state)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=headers)
    schema.config.update(base_url=base, headers=headers)
    return schema, base, headers


def _has_input(operation) -> bool:
    return operation.body is not None and len(operation.body) > 0 or any(True for _ in operation.iter_parameters())


def test_every_response_is_documented(live):
    """Positive and negative cases of every operation: zero 5xx, no undocumented status or content
    type, every body valid against its response schema, and no invalid request served."""
    schema, _, headers = live
    seen: dict[str, dict[int, int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if _has_input(operation) else [])
        for mode in modes:
            statuses = seen.setdefault(f"{operation.label} {mode.value}", {})

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES.get(operation.label, 5), **SETTINGS)
            def check(case):
                response = case.call(headers=headers, timeout=30)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=NEGATIVE_CHECKS if mode.is_negative else CHECKS)

            check()
    print(seen)
    assert set(seen) >= {"POST /v1/home-timeline positive", "POST /v1/home-timeline negative",
                         "GET /metrics positive", "GET /healthz positive"}
    assert seen["POST /v1/home-timeline positive"].get(200), seen  # valid requests were served, not only refused
    assert seen["POST /v1/home-timeline negative"].get(422), seen


# JSON values that are not integers (floats with an integral value included: 1.0 is not 1 here)
NOT_INTEGERS = st.one_of(st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=8), st.lists(st.integers(0, 9), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


@given(field=st.sampled_from(["user_id", "limit", "surface"]), value=NOT_INTEGERS)
@settings(max_examples=60, **SETTINGS)
def test_ids_and_sizes_accept_only_json_integers(mixer_server, field, value):
    """The user's report, as a property: `{"user_id": false}` was served as user 0. The generic fuzz
    above rarely sends exactly that, so every integer field gets non-integer JSON here."""
    http, _ = mixer_server
    r = http.post("/v1/home-timeline", json={"user_id": 1, "limit": 5, field: value})
    assert r.status_code == 422, (field, value, r.text[:300])
    assert field in r.json()["message"]


def test_paging_through_next_cursor_is_stateful_and_never_repeats_a_post(live):
    """Schemathesis chains requests through the OpenAPI link ``NextPage``; along every chain the
    pages are disjoint and every response conforms."""
    schema, _, headers = live
    served_before: dict[str, set[int]] = {}  # next_cursor issued -> posts of the pages that led to it
    followed: list[int] = []

    class Paging(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": headers, "timeout": 30}

        def after_call(self, response, case):
            if response.status_code != 200 or case.operation.label != "POST /v1/home-timeline":
                return
            page = response.json()
            posts = {item["post_id"] for item in page["items"]}
            cursor = case.body.get("cursor") if isinstance(case.body, dict) else None
            before = served_before.get(cursor, set()) if isinstance(cursor, str) else set()
            if isinstance(cursor, str) and cursor in served_before:
                followed.append(len(before))
                assert not before & posts, f"posts served again on the next page: {sorted(before & posts)}"
            if page["next_cursor"]:
                served_before[page["next_cursor"]] = before | posts

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Paging.run(settings=settings(max_examples=40, stateful_step_count=6, **SETTINGS))
    assert followed, "no request followed a next_cursor: the NextPage link is not used"
    print(f"{len(followed)} requests followed a next_cursor (pages before them: up to {max(followed)} posts)")

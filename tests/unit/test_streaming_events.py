"""The event schema: round trips, UTC normalisation, and clear reasons for invalid payloads."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from core.schema import HEADS
from pipelines.streaming.events import (
    EngagementEvent,
    EventValidationError,
    PostCreatedEvent,
    SocialGraphEvent,
    encode_event,
    parse_event,
)

TS = datetime(2022, 5, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)


def _events():
    out = [EngagementEvent(event_id=f"e-{k}", kind=k, user_id=1, post_id=2, author_id=3, event_ts=TS)
           for k in ("impression", *HEADS)]
    out.append(PostCreatedEvent(event_id="p-1", post_id=2, author_id=3, event_ts=TS, duration_ms=15000, tags=(4, 7)))
    out.append(PostCreatedEvent(event_id="p-2", post_id=5, author_id=3, event_ts=TS))
    out += [SocialGraphEvent(event_id=f"s-{a}", action=a, user_id=1, author_id=3, event_ts=TS)
            for a in ("follow", "unfollow", "block", "mute")]
    return out


@pytest.mark.parametrize("event", _events(), ids=lambda e: e.event_id)
def test_every_event_type_round_trips_through_stream_fields_json_and_dict(event):
    fields = encode_event(event)
    assert set(fields) == {b"event", b"type"}
    assert fields[b"type"] == event.type.encode()
    assert parse_event(fields) == event
    assert parse_event(fields[b"event"]) == event
    assert parse_event(fields[b"event"].decode()) == event
    assert parse_event(event.model_dump(mode="json")) == event
    assert parse_event({k.decode(): v for k, v in fields.items()}) == event  # str-keyed fields too


def test_event_ts_is_normalised_to_utc_and_keeps_microseconds():
    local = TS.astimezone(timezone(timedelta(hours=8)))
    e = EngagementEvent(event_id="x", kind="click", user_id=1, post_id=2, author_id=3, event_ts=local)
    assert e.event_ts == TS and e.event_ts.utcoffset() == timedelta(0)
    assert parse_event(encode_event(e)).event_ts.microsecond == 123456


def _valid() -> dict:
    return EngagementEvent(event_id="x", kind="click", user_id=1, post_id=2, author_id=3,
                           event_ts=TS).model_dump(mode="json")


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(event_ts="2022-05-01T12:00:00"), r"event_ts: .*timezone"),
    (lambda d: d.update(kind="share"), r"kind: .*'impression'"),
    (lambda d: d.update(user_id=-1), r"user_id: .*greater than or equal to 0"),
    (lambda d: d.update(post_id="12"), r"post_id: .*valid integer"),
    (lambda d: d.update(author_id=True), r"author_id: .*valid integer"),
    (lambda d: d.pop("event_id"), r"event_id: Field required"),
    (lambda d: d.update(event_id=""), r"event_id: .*at least 1"),
    (lambda d: d.update(schema_version=2), r"schema_version: Input should be 1"),
    (lambda d: d.pop("schema_version"), r"schema_version: missing"),
    (lambda d: d.update(type="retweet"), r"type: 'retweet' is not one of"),
    (lambda d: d.pop("type"), r"type: None is not one of"),
    (lambda d: d.update(surprise=1), r"surprise: Extra inputs are not permitted"),
])
def test_invalid_engagement_is_rejected_naming_the_field(mutate, expected):
    d = _valid()
    mutate(d)
    with pytest.raises(EventValidationError, match=expected) as info:
        parse_event(json.dumps(d).encode())
    assert info.value.reason == str(info.value)


@pytest.mark.parametrize("payload, expected", [
    (b"{not json", r"not valid JSON"),
    (b"\xff\xfe", r"not UTF-8"),
    (b"[1, 2]", r"must be a JSON object, got list"),
    ({b"payload": b"{}"}, r"no 'event' field .*'payload'"),
    (42, r"must be bytes or str|JSON object"),
])
def test_malformed_payloads_are_rejected_with_a_reason(payload, expected):
    with pytest.raises(EventValidationError, match=expected):
        parse_event(payload)


def test_stream_type_field_must_agree_with_the_json():
    fields = encode_event(SocialGraphEvent(event_id="s", action="follow", user_id=1, author_id=2, event_ts=TS))
    fields[b"type"] = b"engagement"
    with pytest.raises(EventValidationError, match="stream field says 'engagement' but the event JSON says 'social'"):
        parse_event(fields)


def test_social_event_on_oneself_and_bad_action_are_rejected():
    base = dict(type="social", schema_version=1, event_id="s", user_id=4, author_id=4,
                event_ts="2022-05-01T00:00:00Z")
    with pytest.raises(EventValidationError, match="cannot follow themselves"):
        parse_event({**base, "action": "follow"})
    with pytest.raises(EventValidationError, match="action: .*'follow', 'unfollow', 'block' or 'mute'"):
        parse_event({**base, "action": "like", "author_id": 5})


def test_post_created_rejects_negative_duration_and_bad_tags():
    base = dict(type="post_created", schema_version=1, event_id="p", post_id=1, author_id=2,
                event_ts="2022-05-01T00:00:00+08:00")
    assert parse_event(base).event_ts == datetime(2022, 4, 30, 16, tzinfo=timezone.utc)
    with pytest.raises(EventValidationError, match="duration_ms"):
        parse_event({**base, "duration_ms": -5})
    with pytest.raises(EventValidationError, match=r"tags\.1"):
        parse_event({**base, "tags": [3, "x"]})


def test_events_are_immutable_and_encode_refuses_dicts():
    e = _events()[0]
    with pytest.raises(Exception):
        e.user_id = 9
    with pytest.raises(TypeError, match="expected an event model"):
        encode_event(_valid())


_GOOD = {"schema_version": 1, "event_id": "e1", "event_ts": "2022-04-25T08:00:00.123456Z", "type": "engagement",
         "kind": "click", "user_id": 1, "post_id": 2, "author_id": 3}
_EDGE_JSON = [  # stream-entry JSON the fast path (validate_json) and the general path must judge alike
    json.dumps(_GOOD).encode(),
    json.dumps(_GOOD | {"schema_version": 1.0}).encode(),
    json.dumps(_GOOD | {"schema_version": True}).encode(),
    json.dumps(_GOOD | {"schema_version": "1"}).encode(),
    json.dumps({k: v for k, v in _GOOD.items() if k != "schema_version"}).encode(),
    json.dumps(_GOOD | {"user_id": 1.0}).encode(),
    json.dumps(_GOOD | {"user_id": True}).encode(),
    json.dumps(_GOOD | {"user_id": "1"}).encode(),
    json.dumps(_GOOD | {"user_id": 2 ** 63}).encode(),
    json.dumps(_GOOD | {"user_id": -1}).encode(),
    json.dumps(_GOOD | {"event_ts": 1650000000}).encode(),
    json.dumps(_GOOD | {"event_ts": "1650000000"}).encode(),
    json.dumps(_GOOD | {"event_ts": "2022-04-25T08:00:00"}).encode(),
    json.dumps(_GOOD | {"event_ts": "2022-04-25T08:00:00+08:00"}).encode(),
    json.dumps(_GOOD | {"event_id": ""}).encode(),
    json.dumps(_GOOD | {"event_id": "é" * 128}).encode(),
    json.dumps(_GOOD | {"event_id": "x" * 129}).encode(),
    json.dumps(_GOOD | {"event_id": "a\"b\\c\u2028"}).encode(),
    json.dumps(_GOOD).replace('"e1"', '"\\ud800"').encode(),  # a lone surrogate
    json.dumps(_GOOD).replace('"event_id": "e1"', '"event_id": "e1", "event_id": "e2"').encode(),
    json.dumps(_GOOD).replace('"2022-04-25T08:00:00.123456Z"', "NaN").encode(),
    json.dumps(_GOOD).encode() + b" x",
    json.dumps(_GOOD).encode() + b" \n",
    b"\xef\xbb\xbf" + json.dumps(_GOOD).encode(),
    json.dumps(_GOOD).encode().replace(b'"e1"', b'"e\xff"'),
    json.dumps(_GOOD | {"extra": 1}).encode(),
    json.dumps(_GOOD | {"kind": "share"}).encode(),
    json.dumps(_GOOD).replace('"user_id": 1', '"user_id": 1e2').encode(),
    json.dumps(_GOOD).replace('"user_id": 1', '"user_id": -0').encode(),
    json.dumps({"schema_version": 1, "event_id": "s", "event_ts": "2022-04-25T08:00:00Z", "type": "social",
                "action": "follow", "user_id": 1, "author_id": 1}).encode(),
    json.dumps({"schema_version": 1, "event_id": "p", "event_ts": "2022-04-25T08:00:00Z", "type": "post_created",
                "post_id": 1, "author_id": 1, "tags": [1, 2], "duration_ms": 1.0}).encode(),
    b"[1, 2]",
]


def _general_path(raw: bytes):
    """``parse_event``'s general path (json.loads + validate_python), the reference of the fast one."""
    try:
        return parse_event(raw)
    except EventValidationError:
        return None


@pytest.mark.parametrize("raw", _EDGE_JSON, ids=range(len(_EDGE_JSON)))
def test_the_stream_entry_fast_path_accepts_exactly_what_the_general_path_accepts(raw):
    from pipelines.streaming.events import _parse_entry_fast

    want = _general_path(raw)
    for t in ("engagement", "social", "post_created"):  # the stream's type field: agreeing or not
        fields = {b"event": raw, b"type": t.encode()}
        fast = _parse_entry_fast(fields)
        general = want if want is not None and want.type == t else None
        assert fast == general  # None where the general path rejects (it then names the problem)
        if general is not None:
            assert parse_event(fields) == general

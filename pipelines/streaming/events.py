"""The versioned event schema of the streaming pipeline (pydantic v2, one discriminated union).

Four event types, told apart by ``type``; every event carries ``schema_version`` (only ``1``
exists: a change that old consumers cannot read gets a new version, never a silent reinterpretation)
and an ``event_id`` chosen by the producer (consumers use it to make their writes idempotent, since
a stream delivers at least once).

- ``EngagementEvent`` (``type="engagement"``): an impression or one engagement of a user with a post.
  ``kind`` is ``"impression"`` or one of ``core.schema.HEADS``.
- ``PostCreatedEvent`` (``type="post_created"``): a post was published.
- ``PostDeletedEvent`` (``type="post_deleted"``): its author (or moderation) deleted a post.
- ``SocialGraphEvent`` (``type="social"``): follow / unfollow / block / mute of ``author_id`` by
  ``user_id`` (the canonical social-edge column names, ``schema.SOCIAL_EDGES_COLUMNS``).

Ids are non-negative int64 (``schema`` convention). ``event_ts`` must carry a timezone and is stored
in UTC (microsecond precision, like the tables); a naive timestamp is rejected because its instant
is unknown.

On the wire (a Redis stream entry) an event is two fields: ``b"event"`` = the event's JSON (UTF-8)
and ``b"type"`` = its type, so an entry can be routed without parsing the JSON.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator,
)

from core.realtime import ENGAGEMENT_KINDS

SCHEMA_VERSION: Literal[1] = 1
EVENT_FIELD = b"event"
TYPE_FIELD = b"type"

# core.realtime.ENGAGEMENT_KINDS: "impression" plus every engagement head (schema.HEADS).
EngagementKind = Literal[ENGAGEMENT_KINDS]  # type: ignore[valid-type]
SocialAction = Literal["follow", "unfollow", "block", "mute"]

Id = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]
EventId = Annotated[str, Field(min_length=1, max_length=128)]


class EventValidationError(ValueError):
    """A payload is not a valid event. ``reason`` says which field is wrong and why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: EventId
    event_ts: AwareDatetime

    @field_validator("event_ts")
    @classmethod
    def _to_utc(cls, v: datetime) -> datetime:
        # One representation per instant: equal events serialise to equal bytes.
        return v.astimezone(timezone.utc)


class EngagementEvent(_EventBase):
    """An impression (``kind="impression"``) or one engagement (``kind`` in ``schema.HEADS``) of
    ``user_id`` with ``post_id`` written by ``author_id`` at ``event_ts`` (UTC)."""

    type: Literal["engagement"] = "engagement"
    kind: EngagementKind
    user_id: Id
    post_id: Id
    author_id: Id


class PostCreatedEvent(_EventBase):
    """``author_id`` published ``post_id`` at ``event_ts`` (UTC); ``duration_ms`` (ms, >= 0) and
    ``tags`` (tag ids) as in the canonical posts table, both optional."""

    type: Literal["post_created"] = "post_created"
    post_id: Id
    author_id: Id
    duration_ms: Annotated[int, Field(strict=True, ge=0)] | None = None
    tags: tuple[Id, ...] = ()


class PostDeletedEvent(_EventBase):
    """``post_id`` of ``author_id`` was deleted at ``event_ts`` (UTC). Fan-out workers apply it
    (``pipelines.graph.fanout``): a tombstone the home-timeline read honours, the post out of its
    author's timeline, and a fan-out not yet done stopped."""

    type: Literal["post_deleted"] = "post_deleted"
    post_id: Id
    author_id: Id


class SocialGraphEvent(_EventBase):
    """``user_id`` did ``action`` (follow / unfollow / block / mute) to ``author_id`` at
    ``event_ts`` (UTC). A user cannot act on themselves."""

    type: Literal["social"] = "social"
    action: SocialAction
    user_id: Id
    author_id: Id

    @model_validator(mode="after")
    def _not_self(self) -> "SocialGraphEvent":
        if self.user_id == self.author_id:
            raise ValueError(f"user_id and author_id are both {self.user_id}: a user cannot {self.action} themselves")
        return self


AnyEvent = Union[EngagementEvent, PostCreatedEvent, PostDeletedEvent, SocialGraphEvent]
Event = Annotated[AnyEvent, Field(discriminator="type")]
EVENT_TYPES: tuple[str, ...] = ("engagement", "post_created", "post_deleted", "social")
_ADAPTER: TypeAdapter = TypeAdapter(Event)


def _reason(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "<event>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _decode(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventValidationError(f"{what} is not UTF-8: {exc}") from None
    raise EventValidationError(f"{what} must be bytes or str, got {type(value).__name__}")


def _parse_entry_fast(fields: dict) -> "AnyEvent | None":
    """The event of a stream entry as ``encode_event`` writes it (``{b"event": json, b"type": type}``,
    bytes), validated straight from the JSON bytes by pydantic-core (about 2.5x faster than
    ``json.loads`` + ``validate_python``, the consumers' hottest line); ``None`` when the entry is
    not valid or not in that form, and ``parse_event``'s general path then decides and names the
    problem. It accepts exactly what that path accepts, with equal values
    (``tests/unit/test_streaming_events.py`` checks edge payloads on both): the JSON parser rejects
    invalid UTF-8, a BOM and trailing data as ``json.loads`` does, and the two checks that path
    makes besides the model's (``schema_version`` present on the wire, the ``type`` field agreeing
    with the JSON) are made here too."""
    raw, declared = fields.get(EVENT_FIELD), fields.get(TYPE_FIELD)
    if type(raw) is not bytes or type(declared) is not bytes or len(fields) != 2:
        return None
    try:
        event = _ADAPTER.validate_json(raw)
    except ValidationError:
        return None
    if "schema_version" not in event.model_fields_set or event.type.encode("ascii") != declared:
        return None
    return event


def parse_event(payload: bytes | str | dict) -> "AnyEvent":
    """Validate one event.

    ``payload`` is one of: the event's JSON (bytes or str); the event as a dict; or the fields of a
    stream entry (``{b"event": json, b"type": type}``, keys bytes or str), as ``encode_event`` writes.

    Raises:
        EventValidationError: not JSON, not an object, unknown ``type`` or ``schema_version``, a
            missing / extra / out-of-range field, a naive timestamp, or stream fields whose
            ``type`` disagrees with the JSON. ``reason`` names the field(s) and the problem.
    """
    if isinstance(payload, dict):
        fast = _parse_entry_fast(payload)
        if fast is not None:
            return fast
    declared_type: str | None = None
    if isinstance(payload, dict) and (EVENT_FIELD in payload or "event" in payload):
        # Stream-entry fields, not an event dict (an event has no "event" field: extra="forbid").
        raw = payload.get(EVENT_FIELD, payload.get("event"))
        t = payload.get(TYPE_FIELD, payload.get("type"))
        declared_type = None if t is None else _decode(t, "stream field 'type'")
        payload = _decode(raw, "stream field 'event'")
    elif isinstance(payload, dict) and any(isinstance(k, (bytes, bytearray)) for k in payload):
        names = sorted(_decode(k, "field name") if isinstance(k, (bytes, str)) else repr(k) for k in payload)
        raise EventValidationError(f"stream entry has no 'event' field (fields: {names}); publish with encode_event()")
    if isinstance(payload, (bytes, bytearray, str)):
        text = _decode(payload, "payload")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EventValidationError(f"payload is not valid JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(payload, dict):
        raise EventValidationError(f"event must be a JSON object, got {type(payload).__name__}")
    if payload.get("type") not in EVENT_TYPES:
        raise EventValidationError(f"type: {payload.get('type')!r} is not one of {list(EVENT_TYPES)}")
    if "schema_version" not in payload:
        # Required on the wire: a producer that omits it has not declared which schema it wrote.
        raise EventValidationError(f"schema_version: missing (this consumer reads version {SCHEMA_VERSION})")
    if declared_type is not None and declared_type != payload["type"]:
        raise EventValidationError(
            f"type: stream field says {declared_type!r} but the event JSON says {payload['type']!r}"
        )
    try:
        return _ADAPTER.validate_python(payload)
    except ValidationError as exc:
        raise EventValidationError(_reason(exc)) from None


def encode_event(event: AnyEvent) -> dict[bytes, bytes]:
    """Stream-entry fields of ``event``: ``{b"event": <JSON, UTF-8>, b"type": <type>}``.

    ``parse_event(encode_event(e)) == e`` for every valid event.

    Raises:
        TypeError: ``event`` is not one of the event models (build it with the model, which
            validates it, rather than passing a dict).
    """
    if not isinstance(event, (EngagementEvent, PostCreatedEvent, PostDeletedEvent, SocialGraphEvent)):
        raise TypeError(f"expected an event model, got {type(event).__name__}; build e.g. EngagementEvent(...)")
    return {EVENT_FIELD: event.model_dump_json().encode("utf-8"), TYPE_FIELD: event.type.encode("ascii")}

"""Streaming events: the versioned event schema (``events``) and the event bus (``bus``).

Producers ``publish`` validated events to topic streams; consumers read them in consumer groups,
acknowledge after their feature write and reclaim what a crashed consumer left pending. Invalid
entries go to a dead-letter stream, never silently away.
"""

from pipelines.streaming.bus import Delivery, EventBus, RedisStreamsBus
from pipelines.streaming.events import (
    EngagementEvent,
    Event,
    EventValidationError,
    PostCreatedEvent,
    PostDeletedEvent,
    SocialGraphEvent,
    encode_event,
    parse_event,
)

__all__ = [
    "Delivery", "EventBus", "RedisStreamsBus",
    "EngagementEvent", "Event", "EventValidationError", "PostCreatedEvent", "PostDeletedEvent",
    "SocialGraphEvent",
    "encode_event", "parse_event",
]

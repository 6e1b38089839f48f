"""Settings of the social graph and the fan-out (``fanout:`` in YAML), validated by pydantic.

The embedded default is ``pipelines/graph/fanout.yaml`` (package data). ``load_fanout_config(path)``
reads another file's ``fanout:`` mapping over the defaults; unknown keys are errors (a typo must not
be silently ignored).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_CONFIG_NAME = "fanout.yaml"


class FanoutConfigError(ValueError):
    """The ``fanout:`` settings are invalid; the message names the key and what to change."""


class FanoutSettings(BaseModel):
    """How posts reach home timelines (Twitter's hybrid push / pull).

    Attributes:
        celebrity_threshold: authors with more followers than this are not pushed (their posts
            go only to their own timeline; the read path pulls them). Twitter's design discussions
            put it in the 10^4-10^6 range; 10,000 here, see ``bench/fanout.py`` for the trade-off.
        timeline_length: entries kept per home timeline (Twitter keeps 800, Krikorian, "Timelines
            at Scale", QCon 2013).
        user_posts_length: entries kept in an author's own timeline (celebrity pulls, follow backfill).
        page_size: followers read per ``SSCAN`` page and written per pipeline.
        max_celebrity_pulls: at read, pull the latest posts of at most this many followed
            celebrities (the strongest edges first; the read path).
        backfill_posts: a new follow copies this many of the followee's latest posts.
        post_topic: bus topic of ``PostCreatedEvent``; group: the workers' consumer group.
        reclaim_idle_ms: a post pending this long is taken over from a crashed worker.
        progress_ttl_s: lifetime of a post's fan-out checkpoint after its last page (s).
        seen_ttl_s: lifetime of the graph's per-user idempotency markers (s).
        page_pause_ms: throttle: pause between pages (0 = none), so a burst leaves Redis room for reads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    celebrity_threshold: int = Field(10_000, ge=1)
    timeline_length: int = Field(800, ge=1)
    user_posts_length: int = Field(800, ge=1)
    page_size: int = Field(500, ge=1, le=100_000)
    max_celebrity_pulls: int = Field(50, ge=0)
    backfill_posts: int = Field(20, ge=0)
    post_topic: str = "posts"
    group: str = "fanout"
    reclaim_idle_ms: int = Field(30_000, ge=0)
    progress_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    seen_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    page_pause_ms: float = Field(0.0, ge=0)


def load_fanout_config(path: str | Path | None = None, **overrides) -> FanoutSettings:
    """The ``fanout:`` settings: the embedded default, then the file at ``path`` (its ``fanout:``
    mapping), then ``overrides`` (keyword = field).

    Raises:
        FanoutConfigError: the file is missing or not YAML, has no ``fanout:`` mapping, or a value
            is out of range / unknown (the message names the key).
    """
    merged = dict(_read(resources.files("pipelines.graph").joinpath(DEFAULT_CONFIG_NAME).read_text(),
                        DEFAULT_CONFIG_NAME))
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise FanoutConfigError(f"cannot read fanout config {path}: {exc}") from None
        merged.update(_read(text, str(path)))
    merged.update(overrides)
    try:
        return FanoutSettings(**merged)
    except ValidationError as exc:
        parts = [f"fanout.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise FanoutConfigError("; ".join(parts)) from None


def _read(text: str, where: str) -> dict:
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise FanoutConfigError(f"{where} is not valid YAML: {exc}") from None
    section = doc.get("fanout") if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise FanoutConfigError(f"{where} has no 'fanout:' mapping; write e.g. 'fanout: {{celebrity_threshold: 10000}}'")
    return section

"""The opaque cursor of a home timeline: which posts earlier pages served.

Token = base64url(zlib(JSON {"v": 1, "p": page_index, "s": [post ids served so far]})), no padding.
Clients treat it as opaque and send it back to get the next page; the next page excludes the
posts in ``s`` (besides the per-user served record kept in Redis, which has a TTL and may be off).
At most ``MAX_SERVED`` ids are carried (the newest), bounding the token at a few kB.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass

MAX_SERVED = 2000
_VERSION = 1


class CursorError(ValueError):
    """The cursor is not one this service issued (malformed, truncated or from another version)."""


@dataclass(frozen=True)
class PageCursor:
    """Position in a timeline: the index of the next page and the posts served before it."""

    page_index: int
    served: tuple[int, ...]

    def encode(self) -> str:
        """The opaque token (URL-safe base64, no padding)."""
        payload = {"v": _VERSION, "p": self.page_index, "s": list(self.served[-MAX_SERVED:])}
        raw = zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 6)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> "PageCursor":
        """Parse a token from ``encode``.

        Raises:
            CursorError: the token is not a valid cursor (send the ``next_cursor`` of the previous
                response unchanged, or no cursor for the first page).
        """
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            payload = json.loads(zlib.decompress(raw))
            if payload.get("v") != _VERSION:
                raise CursorError(f"cursor version {payload.get('v')!r} is not supported")
            page, served = payload["p"], payload["s"]
            if not isinstance(page, int) or page < 1 or not all(isinstance(p, int) for p in served):
                raise CursorError("cursor content is malformed")
            return cls(page_index=page, served=tuple(served))
        except CursorError:
            raise
        except (binascii.Error, zlib.error, ValueError, KeyError, TypeError, AttributeError):
            raise CursorError("cursor is not a token issued by this service; send the previous "
                              "response's next_cursor unchanged, or null for the first page") from None

    def next(self, page_posts: list[int]) -> "PageCursor":
        """The cursor after serving ``page_posts`` on this page."""
        return PageCursor(self.page_index + 1, (self.served + tuple(page_posts))[-MAX_SERVED:])


FIRST_PAGE = PageCursor(page_index=0, served=())

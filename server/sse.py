"""Server-sent-events framing: every byte of the SSE wire format is written here."""

from __future__ import annotations

from typing import Any

import orjson

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and similar proxies must not buffer the stream
}
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One `data:` event holding `payload` as compact JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"

"""Server-sent-events framing: every byte of the SSE wire format is written here."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson

from server.core.errors import APIError
from server.core.streaming import Event

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


async def frames(events: AsyncGenerator[Event, None]) -> AsyncIterator[bytes]:
    """Frame a generation's events: chunks as `data:` events, pings for silences, an error
    after the stream started as one event, then [DONE].
    Leaving this generator for any reason (client gone included) closes `events`, which stops
    the generation at its next step."""
    async with aclosing(events):
        async for item in events:
            if item is None:
                yield PING
            elif isinstance(item, APIError):  # headers are gone: report in-band, then end
                yield event(item.body())
            else:
                yield event(item)
    yield DONE


async def typed_frames(events: AsyncGenerator[Event, None]) -> AsyncIterator[bytes]:
    """Frame events that carry their own `type` (the Responses and Messages APIs): each as
    `event: TYPE` and its `data:`, pings for silences, and no [DONE]: those protocols end
    with their own last event. An error that reaches here is framed as an `error` event."""
    async with aclosing(events):
        async for item in events:
            if item is None:
                yield PING
                continue
            payload = item.body() if isinstance(item, APIError) else item
            kind = "error" if isinstance(item, APIError) else str(item["type"])
            yield b"event: " + kind.encode() + b"\n" + event(payload)

"""Request bodies in, responses out: JSON serialised with orjson (which handles dataclasses
and numpy natively), and SSE streams of a generation's events."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson
from quart import Response, make_response, request

from server import sse
from server.generation import Event
from server.protocol import parse_json_body


async def json_body() -> dict[str, Any]:
    """The request's body, which must be a JSON object."""
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    return parse_json_body(raw)


async def event_stream(events: AsyncGenerator[Event, None], include_usage: bool) -> Response:
    """A streamed SSE response of a generation's events (see `sse.frames`)."""
    response = await make_response(sse.frames(events, include_usage), 200, sse.HEADERS)
    assert isinstance(response, Response)
    response.timeout = None  # a stream lasts as long as the generation does
    return response


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(payload), status=status, headers=headers,
                    content_type="application/json")

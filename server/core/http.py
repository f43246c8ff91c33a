"""Request bodies in, responses out: JSON serialised with orjson (which handles dataclasses
and numpy natively), and SSE streams of a generation's events."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from http import HTTPStatus
from typing import Any

import orjson
from quart import Response, make_response, request

from server.core import sse
from server.core.errors import bad_request
from server.core.streaming import Event


async def json_body() -> dict[str, Any]:
    """The request's body, which must be a JSON object."""
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    return parse_json_body(raw)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


async def event_stream(events: AsyncGenerator[Event, None], *, typed: bool = False
                       ) -> Response:
    """A streamed SSE response of a generation's events (see `sse.frames`; `typed`: events
    named by their `type`, `sse.typed_frames`)."""
    framing = sse.typed_frames if typed else sse.frames
    response = await make_response(framing(events), HTTPStatus.OK, sse.HEADERS)
    assert isinstance(response, Response)
    response.timeout = None  # a stream lasts as long as the generation does
    return response


def json_response(payload: Any, status: int = HTTPStatus.OK, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(payload), status=status, headers=headers,
                    content_type="application/json")

"""`POST /v1/chat/completions`, streamed over SSE or returned whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from quart import Blueprint, Response, make_response, request

from inference.chat.engine import ChatDelta
from inference.errors import InferenceError
from server import sse
from server.errors import APIError, to_api_error
from server.metrics import MeteredStream
from server.protocol import parse_json_body
from server.responses import json_response
from server.serving_chat import ChunkWriter
from server.state import app_state

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    state = app_state()
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    req = state.chat.parse(parse_json_body(raw))
    stream = await state.chat.start(req, "sse" if req.stream else "chat")
    if not req.stream:
        return json_response(await state.chat.complete(req, stream))
    writer = ChunkWriter(model=req.model, include_usage=req.include_usage())
    body = _events(stream, writer, state.settings.sse_ping_interval_s)
    response = await make_response(body, 200, sse.HEADERS)
    assert isinstance(response, Response)
    response.timeout = None  # a stream lasts as long as the generation does
    return response


async def _events(stream: MeteredStream, writer: ChunkWriter, ping_s: float
                  ) -> AsyncIterator[bytes]:
    # Leaving this generator for any reason (client gone included) closes the stream, which
    # stops the generation at its next decode step.
    async with stream:
        yield sse.event(writer.role())
        while True:
            item: ChatDelta | APIError | None = None
            with anyio.move_on_after(ping_s) as silence:
                item = await _next(stream)
            if silence.cancelled_caught:
                yield sse.PING
                continue
            if item is None:
                break
            if isinstance(item, APIError):  # headers are gone: report in-band, then end
                yield sse.event(item.body())
                break
            for chunk in writer.deltas(item):
                yield sse.event(chunk)
    yield sse.DONE


async def _next(stream: MeteredStream) -> ChatDelta | APIError | None:
    try:
        return await stream.receive()
    except anyio.EndOfStream:
        return None
    except InferenceError as exc:
        return to_api_error(exc)

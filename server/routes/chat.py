"""`POST /v1/chat/completions`, streamed over SSE or returned whole."""

from __future__ import annotations

from quart import Blueprint, Response, make_response, request

from server import sse
from server.protocol import parse_json_body
from server.responses import json_response
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
    events = state.chat.events(req, stream, include_usage=req.include_usage(),
                               idle_s=state.settings.sse_ping_interval_s)
    response = await make_response(sse.frames(events, req.include_usage()), 200, sse.HEADERS)
    assert isinstance(response, Response)
    response.timeout = None  # a stream lasts as long as the generation does
    return response

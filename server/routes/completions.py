"""`POST /v1/completions` (legacy text completions), streamed over SSE or returned whole."""

from __future__ import annotations

from quart import Blueprint, Response, make_response, request

from server import sse
from server.protocol import parse_json_body
from server.responses import json_response
from server.state import app_state

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
async def completions() -> Response:
    state = app_state()
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    req = state.completions.parse(parse_json_body(raw))
    stream, echo = await state.completions.start(req)
    if not req.stream:
        return json_response(await state.completions.complete(req, stream, echo))
    events = state.completions.events(req, stream, echo, include_usage=req.include_usage(),
                                      idle_s=state.settings.sse_ping_interval_s)
    response = await make_response(sse.frames(events, req.include_usage()), 200, sse.HEADERS)
    assert isinstance(response, Response)
    response.timeout = None  # a stream lasts as long as the generation does
    return response

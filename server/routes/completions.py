"""`POST /v1/completions` (legacy text completions), streamed over SSE or returned whole."""

from __future__ import annotations

from quart import Blueprint, Response, g

from server.responses import event_stream, json_body, json_response
from server.state import app_state

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
async def completions() -> Response:
    state = app_state()
    req = state.completions.parse(await json_body())
    stream, echo = await state.completions.start(req, g.cache_scope)
    if not req.stream:
        return json_response(await state.completions.complete(req, stream, echo))
    return await event_stream(state.completions.events(
        req, stream, echo, include_usage=req.include_usage(),
        idle_s=state.settings.sse_ping_interval_s), req.include_usage())

"""`POST /v1/chat/completions`, streamed over SSE or returned whole."""

from __future__ import annotations

from quart import Blueprint, Response, g

from server.responses import event_stream, json_body, json_response
from server.state import app_state

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    state = app_state()
    req = state.chat.parse(await json_body())
    stream = await state.chat.start(req, "sse" if req.stream else "chat", g.cache_scope)
    if not req.stream:
        return json_response(await state.chat.complete(req, stream))
    return await event_stream(state.chat.events(
        req, stream, include_usage=req.include_usage(),
        idle_s=state.settings.sse_ping_interval_s), req.include_usage())

"""The Messages API's routes: `POST /v1/messages` (streamed over SSE with Anthropic's typed
events, or returned whole) and `POST /v1/messages/count_tokens`, on the chat-completions
service. Every error on these paths, the edge's included (a wrong key, a large body), has
Anthropic's shape and status: `{"type": "error", "error": {"type", "message"}}`, 529 where
the OpenAI side says 503."""

from __future__ import annotations

from contextlib import aclosing

from quart import Blueprint, Response, g

from server.core.access import install_error_handlers
from server.core.errors import anthropic_error
from server.core.http import event_stream, json_body, json_response
from server.core.state import app_state
from server.messages.events import MessageWriter
from server.messages.wire import CountTokensRequest, MessagesRequest
from server.openai.services import services
from server.openai.wire import parse_model

bp = Blueprint("messages", __name__)


@bp.post("/v1/messages")
async def create() -> Response:
    req = parse_model(MessagesRequest, await json_body())
    req.check_supported()
    chat = services().chat
    chat_req = chat.parse(req.chat_body())
    stream = await chat.start(chat_req, "messages", g.tenant)
    writer = MessageWriter(model=req.model, prompt_tokens=stream.prompt_tokens)
    events = writer.translate(chat.events(
        chat_req, stream, include_usage=True, stop_sequences=True,
        idle_s=app_state().settings.sse_ping_interval_s if req.stream else None))
    if req.stream:
        return await event_stream(events, typed=True)
    async with aclosing(events):
        async for _ in events:
            pass
    if writer.failure is not None:
        raise writer.failure
    return json_response(writer.message)


@bp.post("/v1/messages/count_tokens")
async def count_tokens() -> Response:
    req = parse_model(CountTokensRequest, await json_body())
    req.check_supported()
    chat = services().chat
    return json_response({"input_tokens": await chat.count_prompt(
        chat.parse(req.chat_body(stream=False)), g.tenant)})


# every error on these paths, the edge's included, in Anthropic's shape and status
install_error_handlers(bp, anthropic_error)

"""`/v1/ws`: the WebSocket endpoint. One task receives, one sends, and each conversation runs
in its own task, all in one task group per connection; closing the socket cancels them all."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream
from quart import Blueprint, websocket

from server.serving_ws import SocketLimits, SocketSession
from server.state import app_state

bp = Blueprint("ws", __name__)


@bp.websocket("/v1/ws")
async def chat_socket() -> None:
    state = app_state()
    settings = state.settings
    await websocket.accept()
    # Bounded: a slow reader stalls its own conversations (they stop pulling tokens), never
    # another connection.
    send, outbox = anyio.create_memory_object_stream[dict[str, Any]](
        max_buffer_size=settings.ws_send_queue)
    session = SocketSession(state.chat, state.embeddings, send,
                            SocketLimits(max_message_bytes=settings.ws_max_message_bytes,
                                         max_conversations=settings.ws_max_conversations))
    async with anyio.create_task_group() as tg, send:
        tg.start_soon(_sender, outbox)
        while True:
            raw = await websocket.receive()
            await session.dispatch(raw, tg)


async def _sender(outbox: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
    async with outbox:
        async for message in outbox:
            await websocket.send(orjson.dumps(message).decode())
